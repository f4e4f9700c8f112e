"""QuARI and the TA baseline as ``transform`` stages of the query pipeline.

``{transform: {quari: {checkpoint: DIR, mode: full|rerank, k: 100}}}`` predicts each
query's transform from its embedding and hands the rank stage a
:class:`~qshift.pipeline.batch.QueryTransform`: ``full`` scores every gallery item by
cos(q', T d) (full search on an index: MIPS with w = Tᵀq', over-fetched and re-scored
exactly); ``rerank`` re-scores the first stage's top ``k``. ``{transform: {ta: FILE}}``
is the static projection score cos(P q, P d). A checkpoint trained on another encoder's
embeddings is refused. (Registered in :mod:`qshift.quari`, lazily: no torch at start-up.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qshift.errors import CheckpointMismatchError, InputError
from qshift.pipeline.batch import QueryBatch
from qshift.pipeline.stage import Stage
from qshift.quari.scoring import lowrank_scores, search_vectors
from qshift.quari.search import load_ta
from qshift.quari.train import load_quari, project

MODES = ("full", "rerank")


class LowRankTransform:
    """One batch's QuARI transforms: q' and the low-rank factors U, V per query. ``base``
    (a ``static_rank`` model): the gallery through the static part T₀, with ``rows`` the
    per-query rows of U, V that scoring then needs."""

    def __init__(self, qp: torch.Tensor, u: torch.Tensor, v: torch.Tensor, gallery: torch.Tensor,
                 anchor: float | None, mode: str, rerank_k: int, base: torch.Tensor | None = None,
                 rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.qp, self.u, self.v, self.gallery, self.anchor = qp, u, v, gallery, anchor
        self.mode, self.rerank_k, self.base, self.rows = mode, rerank_k, base, rows or (u, v)

    @torch.inference_mode()
    def score(self, candidates: np.ndarray | None) -> np.ndarray:
        pick = (lambda x: x) if candidates is None else (lambda x: x[torch.from_numpy(np.asarray(candidates))])
        base = None if self.base is None else pick(self.base)
        return lowrank_scores(self.qp, *self.rows, pick(self.gallery), self.anchor, base=base).numpy()

    @torch.inference_mode()
    def search_vectors(self) -> np.ndarray:
        return search_vectors(self.qp, self.u, self.v, self.anchor).numpy()


class ProjectedTransform:
    """TA: cos(P q, P d) with the projected gallery precomputed."""

    def __init__(self, pq: np.ndarray, pg: np.ndarray, p: np.ndarray, mode: str, rerank_k: int) -> None:
        self.pq, self.pg, self.p, self.mode, self.rerank_k = pq, pg, p, mode, rerank_k

    def score(self, candidates: np.ndarray | None) -> np.ndarray:
        if candidates is None:
            return self.pq @ self.pg.T
        return np.einsum("bd,bkd->bk", self.pq, self.pg[candidates])

    def search_vectors(self) -> np.ndarray:
        return self.pq @ self.p  # w·d = (P q̂)·(P d): the numerator of the cosine


def _check_mode(what: str, mode: str, k: int) -> None:
    if mode not in MODES:
        raise InputError(f"{what}: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if k < 1:
        raise InputError(f"{what}: k must be >= 1, got {k}")


class QuARIStage(Stage):
    kind = "transform"
    primary_option = "checkpoint"

    def __init__(self, checkpoint: str, mode: str = "full", k: int = 100) -> None:
        from pathlib import Path

        _check_mode("quari", mode, k)
        path = Path(checkpoint)
        if not (path / "quari.json").is_file() and not path.with_name("quari.json").is_file():
            raise InputError(f"quari: {checkpoint} is not a trained QuARI folder (no quari.json)")
        self.checkpoint, self.mode, self.k = str(checkpoint), mode, int(k)

    def setup(self, ctx: Any) -> None:
        self.model, self.proj, _ = load_quari(self.checkpoint, expect_backbone=ctx.encoder.fingerprint())
        g = ctx.gallery_vectors()
        if g.shape[1] != self.model.cfg.dim:
            raise CheckpointMismatchError(f"quari: {self.checkpoint} expects {self.model.cfg.dim}-d embeddings, "
                                          f"the gallery has {g.shape[1]}")
        g = g if self.proj is None else project(g, self.proj)
        self.gallery = torch.from_numpy(np.ascontiguousarray(g, dtype=np.float32))
        with torch.inference_mode():                    # the static part, applied to the gallery once
            self.base = self.model.static_map(self.gallery) if self.model.cfg.static_rank else None

    @torch.inference_mode()
    def __call__(self, batch: QueryBatch) -> QueryBatch:
        q = batch.embeddings if self.proj is None else project(batch.embeddings, self.proj)
        qp, u, v = self.model(torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)))
        batch.transform = LowRankTransform(qp, u, v, self.gallery, self.model.cfg.anchor, self.mode, self.k,
                                           self.base, self.model.per_query_rows(u, v))
        return batch


class TAStage(Stage):
    kind = "transform"
    primary_option = "checkpoint"

    def __init__(self, checkpoint: str, mode: str = "full", k: int = 100) -> None:
        _check_mode("ta", mode, k)
        self.p = load_ta(checkpoint)
        self.checkpoint, self.mode, self.k = str(checkpoint), mode, int(k)

    def setup(self, ctx: Any) -> None:
        self.p = load_ta(self.checkpoint, expect_backbone=ctx.encoder.fingerprint())
        g = ctx.gallery_vectors()
        if g.shape[1] != self.p.shape[1]:
            raise CheckpointMismatchError(f"ta: {self.checkpoint} maps {self.p.shape[1]}-d embeddings, "
                                          f"the gallery has {g.shape[1]}")
        self.pg = project(g, self.p)

    def __call__(self, batch: QueryBatch) -> QueryBatch:
        batch.transform = ProjectedTransform(project(batch.embeddings, self.p), self.pg, self.p, self.mode, self.k)
        return batch
