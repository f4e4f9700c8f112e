"""Online test-time adaptation of the query tower under query shift.

Each objective (``tent``, ``eata``, ``sar``, ``read``, ``deyo``, ``tcr``, ``rest``,
``epcl``, ``distill``) is
registered with ``@register_objective`` in its own module, which also makes it an adapt
stage (``{adapt: {method: NAME, **options}}``) and a method of the same name (encode +
adapt + rank) for ``qshift bench``, ``qshift search`` and the service.
``create_adapter(encoder, gallery, direction, method, **options)`` builds the engine
directly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qshift.adapt.engine import OBJECTIVES, AdaptConfig, Adapter, Objective, Predictions, register_objective
from qshift.adapt import deyo, distill, eata, epcl, oracle, read, rest, sar, tcr, tent  # noqa: F401  (register them)
from qshift.adapt.stage import AdaptStage, create_objective, split_options


def create_adapter(encoder: Any, gallery: np.ndarray, direction: str, method: str = "rest", *,
                   source_texts: list[str] | None = None, gallery_fingerprint: str | None = None,
                   **options: Any) -> Adapter:
    cfg, obj_opts = split_options(method, options)
    return Adapter(encoder, gallery, direction, cfg, create_objective(method, obj_opts),
                   source_texts=source_texts, gallery_fingerprint=gallery_fingerprint)


__all__ = ["AdaptConfig", "AdaptStage", "Adapter", "Objective", "Predictions", "OBJECTIVES", "create_adapter",
           "register_objective"]
