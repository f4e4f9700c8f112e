"""The two stages every pipeline has: ``encode`` (the frozen encoder) and ``rank``
(any qshift index; full search, re-ranking of a transform, or whole-gallery rows)."""

from __future__ import annotations

from typing import Any

import numpy as np

from qshift.errors import InputError
from qshift.metrics import sort_hits
from qshift.pipeline.batch import QueryBatch
from qshift.pipeline.stage import Stage, register_stage

# Re-ranked candidates are lifted above every other gallery item in whole-gallery rows:
# scores here are cosines in [-1, 1], so +4 / −4 keeps the two groups apart.
RERANK_OFFSET = 4.0


@register_stage("encode", "frozen")
class FrozenEncode(Stage):
    """Embeddings of ``batch.queries`` and of every view, by the frozen encoder; then the
    batch's ``fuse`` rule, if a refine stage set one (e.g. confidence-guided fusion).

    Rows already present (the benchmark passes embeddings from the store) are kept.
    """

    kind = "encode"

    def __init__(self, batch_size: int | None = None) -> None:
        if batch_size is not None and batch_size < 1:
            raise InputError(f"encode stage: batch_size must be >= 1, got {batch_size}")
        self.encode_batch_size = batch_size

    def setup(self, ctx: Any) -> None:
        self.ctx = ctx

    def encode(self, queries: list[Any]) -> np.ndarray:
        enc = self.ctx.encoder
        if self.ctx.query_modality == "text":
            return enc.encode_text(queries, batch_size=self.encode_batch_size)
        return enc.encode_images(queries, batch_size=self.encode_batch_size)

    def __call__(self, batch: QueryBatch) -> QueryBatch:
        if batch.embeddings is None:
            batch.embeddings = self.encode(batch.queries)
        for name, view in batch.views.items():
            if name not in batch.view_embeddings:
                batch.view_embeddings[name] = self.encode(view)
        if batch.fuse is not None:
            batch.fuse(batch, self.ctx)
        return batch


@register_stage("rank", "index")
class IndexRank(Stage):
    """Top-k from the context's index, or whole-gallery score rows when ``batch.k`` is None.

    With a transform on the batch: ``rerank`` re-scores the index's top ``rerank_k`` (in
    whole-gallery rows the re-ranked candidates sit above the rest, which keep the
    first-stage order); ``full`` searches the index with the transform's search vectors,
    fetches ``overfetch`` × k candidates and re-scores them exactly (whole-gallery rows
    are the transform's exact scores). Ties are ordered by gallery position.
    """

    kind = "rank"

    def __init__(self, overfetch: int = 10) -> None:
        if overfetch < 1:
            raise InputError(f"rank stage: overfetch must be >= 1, got {overfetch}")
        self.overfetch = int(overfetch)

    def setup(self, ctx: Any) -> None:
        self.ctx = ctx

    def __call__(self, batch: QueryBatch) -> QueryBatch:
        if batch.embeddings is None:
            raise InputError("rank stage: the batch has no embeddings (is there an encode stage?)")
        if batch.k is None:
            batch.scores, batch.labels = self.rows(batch), None
        else:
            batch.scores, batch.labels = self.top_k(batch, batch.k)
        return batch

    def rows(self, batch: QueryBatch) -> np.ndarray:
        t = batch.transform
        if t is not None and t.mode == "full":
            return np.asarray(t.score(None), dtype=np.float32)
        gallery = self.ctx.gallery_vectors()
        base = np.asarray(batch.embeddings, dtype=np.float32) @ gallery.T
        if t is None:
            return base
        k = min(t.rerank_k, base.shape[1])
        cand = np.argpartition(-base, k - 1, axis=1)[:, :k]
        out = base - RERANK_OFFSET
        np.put_along_axis(out, cand, np.asarray(t.score(cand), dtype=np.float32) + RERANK_OFFSET, axis=1)
        return out

    def top_k(self, batch: QueryBatch, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = self.ctx.get_index()
        n = len(index)
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
            raise InputError(f"k={k!r} must be an integer in 1..{n} (the gallery has {n} items)")
        t = batch.transform
        if t is None:
            return index.search(batch.embeddings, k)
        if t.mode == "rerank":
            _, cand = index.search(batch.embeddings, min(n, max(k, t.rerank_k)))
        else:
            _, cand = index.search(t.search_vectors(), min(n, k * self.overfetch))
        missing = cand < 0  # an ANN index may return fewer than asked
        safe = np.where(missing, 0, cand)
        scores = np.where(missing, -np.inf, np.asarray(t.score(safe), dtype=np.float32))
        s, lab = sort_hits(scores, safe)
        s, lab = s[:, :k], lab[:, :k]
        return s, np.where(np.isfinite(s), lab, -1)
