"""Query repair by any OpenAI-compatible chat endpoint (a stronger hosted or local model).

``base_url`` (e.g. ``http://127.0.0.1:8080/v1``), ``model`` and ``api_key`` come from the
options or the environment (``QSHIFT_LLM_BASE_URL`` / ``OPENAI_BASE_URL``,
``QSHIFT_LLM_MODEL`` / ``OPENAI_MODEL``, ``QSHIFT_LLM_API_KEY`` / ``OPENAI_API_KEY``).
Requests go out ``workers`` at a time with a per-call ``timeout``; a failure raises, and
the refine stage falls back to its next backend. Decoding is greedy (temperature 0).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from qshift.errors import InputError
from qshift.io import stable_hash
from qshift.refine.llm import INSTRUCTION, EXAMPLES, conversation


class OpenAIRepairer:
    name = "openai"

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                 timeout: float = 10.0, workers: int = 4, temperature: float = 0.0, max_tokens: int = 64,
                 vocabulary: Any = None, instruction: str = INSTRUCTION) -> None:
        self.base_url = (base_url or os.environ.get("QSHIFT_LLM_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
                         or "").rstrip("/")
        self.model = model or os.environ.get("QSHIFT_LLM_MODEL") or os.environ.get("OPENAI_MODEL")
        if not self.base_url or not self.model:
            raise InputError("refine backend 'openai' needs base_url and model (options, or QSHIFT_LLM_BASE_URL "
                             "and QSHIFT_LLM_MODEL)")
        if not self.base_url.startswith(("http://", "https://")):
            raise InputError(f"refine backend 'openai': base_url must be http(s)://…, got {self.base_url!r}")
        self.api_key = api_key or os.environ.get("QSHIFT_LLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.timeout, self.workers, self.temperature, self.max_tokens = timeout, workers, temperature, max_tokens
        self.instruction = instruction
        self.snap = None
        if vocabulary is not None:
            from qshift.refine.spell import spell_repairer

            self.snap = spell_repairer(vocabulary)
        self.identity = stable_hash({"backend": "openai", "base_url": self.base_url, "model": self.model,
                                     "instruction": instruction, "examples": EXAMPLES, "temperature": temperature,
                                     "snap": None if self.snap is None else self.snap.identity})

    def _one(self, client: Any, text: str) -> str:
        from qshift.llm import clean_output

        r = client.post(f"{self.base_url}/chat/completions",
                        json={"model": self.model, "messages": conversation(text, self.instruction),
                              "temperature": self.temperature, "max_tokens": self.max_tokens})
        r.raise_for_status()
        try:
            content = r.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise RuntimeError(f"{self.base_url}: not an OpenAI chat completion reply ({exc})") from None
        return clean_output(str(content), text)

    def repair(self, texts: list[str]) -> list[str]:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        with httpx.Client(timeout=self.timeout, headers=headers) as client, \
                ThreadPoolExecutor(max(1, self.workers)) as pool:
            out = list(pool.map(lambda t: self._one(client, t), texts))
        return self.snap.repair(out) if self.snap is not None else out
