"""Merging per-domain adapters into one (for when routing is not wanted).

Task vectors are each adapter's trained tensors minus their common initialisation
(adapters are created from the same seed). ``average`` and ``task_arithmetic``
(init + λ Σ τ_d) follow Ilharco et al. (ICLR 2023); ``ties`` follows Yadav et al.
(NeurIPS 2023): trim each task vector to its top ``density`` share of magnitudes, elect a
sign per entry by the sign of the summed trimmed vectors, and average the entries that
agree with it (disjoint mean), as PEFT's ``merge_utils.ties`` does. Weights: a
per-domain list; an adapter of weight 0 takes no part, so a one-hot merge reproduces that
adapter exactly (TIES: at density 1; below it, the adapter trimmed).
"""

from __future__ import annotations

import torch

from qshift.errors import InputError

METHODS = ("average", "task_arithmetic", "ties")


def ties(task_vectors: list[torch.Tensor], weights: list[float], density: float = 0.2) -> torch.Tensor:
    """TIES on flat tensors of one parameter (Yadav et al. 2023, as PEFT computes it): keep
    each task vector's top ``density`` share by magnitude, elect each entry's sign by the
    sign of the summed kept values (ties: +), then the weighted mean of the kept values
    that agree with it."""
    kept = []
    for t in task_vectors:
        if density >= 1:
            kept.append(t)
            continue
        k = int(density * t.numel())
        mask = torch.zeros_like(t)
        if k > 0:
            mask[t.abs().topk(k).indices] = 1
        kept.append(t * mask)
    stacked = torch.stack(kept)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == elected
    w = torch.as_tensor(weights, dtype=stacked.dtype).view(-1, 1)
    return (stacked * w * agree).sum(0) / agree.sum(0).clamp_min(1)


def merge(init: dict[str, torch.Tensor], trained: list[dict[str, torch.Tensor]], method: str = "ties",
          weights: list[float] | None = None, density: float = 0.2, scale: float = 1.0) -> dict[str, torch.Tensor]:
    if method not in METHODS:
        raise InputError(f"merge: method must be one of {', '.join(METHODS)}, got {method!r}")
    if not trained:
        raise InputError("merge: no adapter to merge")
    weights = list(weights) if weights is not None else [1.0 / len(trained)] * len(trained)
    if len(weights) != len(trained):
        raise InputError(f"merge: {len(weights)} weights for {len(trained)} adapters")
    kept = [(w, t) for w, t in zip(weights, trained) if w != 0]  # a zero weight takes no part (TIES' vote too)
    if not kept:
        raise InputError("merge: every weight is zero")
    weights, trained = [w for w, _ in kept], [t for _, t in kept]
    out = {}
    for name, base in init.items():
        taus = [(t[name] - base).flatten() for t in trained]
        if method == "average":
            delta = sum(w * t for w, t in zip(weights, taus))
        elif method == "task_arithmetic":
            delta = scale * sum(w * t for w, t in zip(weights, taus))
        else:
            delta = scale * ties(taus, weights, density)
        out[name] = base + delta.view_as(base)
    return out
