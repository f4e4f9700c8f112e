"""Online test-time adaptation of the query tower under query shift.

``create_adapter(encoder, gallery, direction, method="rest", **options)`` builds an
:class:`Adapter`; ``adapter.run(queries)`` adapts along the stream and returns scores.
Every method is also registered with :mod:`qshift.methods` (``tent``, ``eata``, ``sar``,
``read``, ``deyo``, ``tcr``, ``rest``), so ``qshift bench`` and the CLI take them by name
with any :class:`AdaptConfig` field or objective option as a parameter.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from qshift.adapt.engine import AdaptConfig, Adapter, Objective, Predictions
from qshift.adapt.objectives import EATA, READ, SAR, DeYO, Tent
from qshift.adapt.rest import REST
from qshift.adapt.tcr import TCR
from qshift.errors import InputError
from qshift.methods import RunContext, register_method

OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "tent": Tent, "eata": EATA, "sar": SAR, "read": READ, "deyo": DeYO, "tcr": TCR, "rest": REST,
}
# what the baselines use unless told otherwise (TCR's code: τ = 0.01 for CLIP baselines)
DEFAULTS: dict[str, dict[str, Any]] = {name: {} for name in OBJECTIVES}


def split_options(method: str, options: dict[str, Any]) -> tuple[AdaptConfig, dict[str, Any]]:
    """Separate engine settings (AdaptConfig fields) from the objective's own options."""
    if method not in OBJECTIVES:
        raise InputError(f"unknown adaptation method {method!r}; known: {', '.join(OBJECTIVES)}")
    names = {f.name for f in dataclasses.fields(AdaptConfig)} - {"method", "options"}
    merged = {**DEFAULTS[method], **options}
    engine = {k: v for k, v in merged.items() if k in names}
    rest = {k: v for k, v in merged.items() if k not in names}
    return AdaptConfig(method=method, options=rest, **engine), rest


def create_objective(method: str, options: dict[str, Any]) -> Objective:
    try:
        return OBJECTIVES[method](**options)
    except TypeError as exc:
        raise InputError(f"{method}: {exc}") from None


def create_adapter(encoder: Any, gallery: np.ndarray, direction: str, method: str = "rest", *,
                   source_texts: list[str] | None = None, gallery_fingerprint: str | None = None,
                   **options: Any) -> Adapter:
    cfg, obj_opts = split_options(method, options)
    return Adapter(encoder, gallery, direction, cfg, create_objective(method, obj_opts),
                   source_texts=source_texts, gallery_fingerprint=gallery_fingerprint)


class AdaptMethod:
    """A TTA method as a benchmark/CLI method (see :mod:`qshift.methods`)."""

    def __init__(self, method: str, **options: Any) -> None:
        self.name = method
        self.options = options
        cfg, obj_opts = split_options(method, options)  # validate now, before any work
        create_objective(method, obj_opts)
        self.batch_size_set = "batch_size" in options

    def run(self, ctx: RunContext) -> np.ndarray:
        opts = dict(self.options)
        if not self.batch_size_set:
            opts["batch_size"] = ctx.batch_size
        opts.setdefault("seed", ctx.seed)
        adapter = create_adapter(ctx.encoder, ctx.gallery, ctx.direction, self.name,
                                 source_texts=ctx.source_texts, **opts)
        try:
            scores = adapter.run(ctx.queries, ctx.order)
        finally:
            adapter.close()
        ctx.meta["adapt_stats"] = dict(adapter.stats)
        return scores


for _name in OBJECTIVES:
    register_method(_name, lambda _n=_name, **kw: AdaptMethod(_n, **kw))

__all__ = ["AdaptConfig", "Adapter", "AdaptMethod", "Objective", "Predictions", "OBJECTIVES", "create_adapter"]
