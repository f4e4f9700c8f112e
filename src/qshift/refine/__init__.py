"""Query repair (ReEx's Generative Semantic Refinement) as ``refine`` stages.

Backends, each also a refine stage of the same name: ``llm`` (the local GGUF model, the
default for LLM repair), ``openai`` (any OpenAI-compatible endpoint) and ``spell`` (the
noisy-channel spell corrector: the cheap fallback and baseline). See :mod:`.base` for
the stage (guards, cache, fallbacks, modes) and :mod:`.fusion` for confidence-guided
fusion. Backends import their libraries (symspellpy, transformers, httpx) only when built.
"""

from __future__ import annotations

import inspect
from qshift.refine.base import BACKENDS, RefineStage, guard, register_backend
from qshift.refine.fusion import ConfidenceFusion, confidence, repair_weight
from qshift.refine.llm import LLMRepairer
from qshift.refine.openai import OpenAIRepairer
from qshift.refine.spell import SpellRepairer, spell_repairer


def _options(cls: type) -> frozenset[str]:
    return frozenset(n for n in inspect.signature(cls.__init__).parameters if n != "self")


register_backend("spell", _options(SpellRepairer))(spell_repairer)
register_backend("llm", _options(LLMRepairer))(LLMRepairer)
register_backend("openai", _options(OpenAIRepairer))(OpenAIRepairer)

__all__ = ["BACKENDS", "ConfidenceFusion", "RefineStage", "confidence", "guard", "register_backend", "repair_weight"]
