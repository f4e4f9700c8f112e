"""What flows through the query pipeline: one batch of queries and what the stages
have made of it so far."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class QueryTransform(Protocol):
    """Per-query scoring set by a ``transform`` stage (QuARI, TA) for the rank stage.

    ``mode`` is ``full`` (every gallery item is scored this way) or ``rerank`` (only the
    first stage's top ``rerank_k`` are re-scored; the rest keep the first-stage order).
    """

    mode: str
    rerank_k: int

    def score(self, candidates: np.ndarray | None) -> np.ndarray:
        """B × N scores over the whole gallery (``None``), or B × K for the given
        gallery positions (B × K int64)."""
        ...

    def search_vectors(self) -> np.ndarray:
        """B × d vectors w whose inner products with gallery rows rank like the transformed
        scores (a first stage on the index, re-scored exactly after over-fetching)."""
        ...


@dataclass
class QueryBatch:
    """One batch of queries in stream order.

    ``raw`` never changes; ``queries`` is what the encoder sees (a ``refine`` stage may
    replace it) and ``views`` holds alternative versions of each query (e.g. a repaired
    text) with their embeddings in ``view_embeddings``; a refine stage may set ``fuse``, the
    rule the encode stage applies once the views are encoded. ``k`` is how many results the
    rank stage keeps (``None``: score rows over the whole gallery, as the benchmark
    needs). ``meta`` has one dict per query (what a stage changed, confidences);
    ``info`` batch-level notes (adaptation counters); ``timings`` seconds per stage.
    """

    raw: list[Any]
    modality: str
    positions: np.ndarray
    index: int = 0
    k: int | None = 10
    queries: list[Any] = field(default_factory=list)
    views: dict[str, list[Any]] = field(default_factory=dict)
    embeddings: np.ndarray | None = None
    view_embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    fuse: Any = None              # fuse(batch, ctx, weights=None): set by a refine stage, applied by the encode stage
    transform: QueryTransform | None = None
    scores: np.ndarray | None = None
    labels: np.ndarray | None = None
    meta: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.queries:
            self.queries = list(self.raw)
        if not self.meta:
            self.meta = [{} for _ in self.raw]

    def __len__(self) -> int:
        return len(self.raw)
