"""Retrieval confidence of a query over a gallery — one definition for every stage that
asks "how sure is the ranking?" (the fusion of a repair with its original,
:mod:`qshift.refine.fusion`, and the adapter's frozen gate, :mod:`qshift.adapt.engine`).

``top1``: the top-1 probability of softmax(s / τ) over the query's score row s;
``margin``: top-1 minus top-2 cosine, clipped to [0, 1] (1 with a one-item gallery);
``entropy``: 1 − H(softmax(s / τ)) / ln N (1 with a one-item gallery).
"""

from __future__ import annotations

import numpy as np
import torch

from qshift.errors import InputError

CONFIDENCES = ("top1", "margin", "entropy")


def score_confidence(sims: torch.Tensor, kind: str = "top1", temperature: float = 0.05) -> torch.Tensor:
    """Per-row confidence in [0, 1] of a B × N tensor of query–gallery cosines."""
    if kind not in CONFIDENCES:
        raise InputError(f"confidence must be one of {', '.join(CONFIDENCES)}, got {kind!r}")
    sims = sims.float()
    if kind == "margin":
        if sims.shape[1] < 2:
            return torch.ones(len(sims), device=sims.device)
        top = sims.topk(2, dim=1).values
        return (top[:, 0] - top[:, 1]).clamp(0.0, 1.0)
    p = torch.softmax(sims / temperature, dim=1)
    if kind == "top1":
        return p.max(dim=1).values
    if sims.shape[1] < 2:
        return torch.ones(len(sims), device=sims.device)
    h = -(p * p.clamp_min(1e-30).log()).sum(1)
    return 1.0 - h / float(np.log(sims.shape[1]))


def confidence(emb: np.ndarray, gallery: np.ndarray, kind: str = "top1", temperature: float = 0.05) -> np.ndarray:
    """:func:`score_confidence` of embeddings ``emb`` (B × d) against ``gallery`` (N × d), in numpy."""
    sims = torch.from_numpy(np.asarray(emb, dtype=np.float32) @ np.asarray(gallery, dtype=np.float32).T)
    return score_confidence(sims, kind, temperature).numpy()
