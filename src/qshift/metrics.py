"""Retrieval metrics with several positives per query.

- ``R@K``: share of queries (in %) whose best-ranked positive is in the top K — the
  standard COCO/Flickr protocol (I2T: any of an image's 5 captions counts).
- ``MRR``: mean of 1 / rank of the first positive (1-based); 0 when it is not within
  the ranking given (then it is MRR@k).
- ``MedR``: median 1-based rank of the first positive (needs full ranks).
- ``mAP@k``: AP@k = Σ_{i≤k} P(i)·rel(i) / min(k, |positives|), averaged over queries.
- ``nDCG@k``: binary gains, DCG = Σ_{i≤k} rel(i) / log2(i + 1), normalised by the
  DCG of an ideal ranking of min(k, |positives|) positives.

Rankings are "best first"; ties in a full ranking are broken by lower gallery index,
as a stable sort on descending score would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from qshift.errors import InputError


@dataclass(frozen=True)
class Qrels:
    """Positive gallery indices per query, in CSR form."""

    indptr: np.ndarray
    indices: np.ndarray

    @classmethod
    def from_labels(cls, labels: Sequence[int] | np.ndarray) -> "Qrels":
        labels = np.asarray(labels, dtype=np.int64)
        return cls(np.arange(len(labels) + 1, dtype=np.int64), labels)

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[int]]) -> "Qrels":
        sizes = np.array([len(x) for x in lists], dtype=np.int64)
        if (sizes == 0).any():
            raise InputError(f"queries {np.flatnonzero(sizes == 0)[:10].tolist()} have no positive")
        flat = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists]) if lists else np.zeros(0, np.int64)
        return cls(np.concatenate([[0], np.cumsum(sizes)]), flat)

    def __len__(self) -> int:
        return len(self.indptr) - 1

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.indptr)

    def rows(self) -> np.ndarray:
        return np.repeat(np.arange(len(self)), self.counts)

    def take(self, rows: Sequence[int] | np.ndarray) -> "Qrels":
        """The qrels of ``rows``, in that order (a row may repeat)."""
        rows = np.asarray(rows, dtype=np.int64)
        counts = self.counts[rows]
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        at = np.repeat(self.indptr[rows] - indptr[:-1], counts) + np.arange(indptr[-1])
        return Qrels(indptr, self.indices[at])

    def __getitem__(self, sl: slice) -> "Qrels":
        start, stop, _ = sl.indices(len(self))
        lo, hi = self.indptr[start], self.indptr[stop]
        return Qrels(self.indptr[start:stop + 1] - lo, self.indices[lo:hi])


def first_positive_rank(scores: np.ndarray, qrels: Qrels) -> np.ndarray:
    """0-based rank of each query's best positive in the full ranking of ``scores``."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] != len(qrels):
        raise InputError(f"scores of shape {scores.shape} do not match {len(qrels)} queries")
    if qrels.indices.size and (qrels.indices.max() >= scores.shape[1] or qrels.indices.min() < 0):
        raise InputError(f"positive index out of range for a gallery of {scores.shape[1]}")
    rows = qrels.rows()
    pos_scores = scores[rows, qrels.indices]
    # best positive per query: highest score, then lowest index
    order = np.lexsort((qrels.indices, -pos_scores, rows))
    first = order[qrels.indptr[:-1]]
    best_s, best_j = pos_scores[first][:, None], qrels.indices[first][:, None]
    higher = (scores > best_s).sum(axis=1)
    tied_before = ((scores == best_s) & (np.arange(scores.shape[1])[None, :] < best_j)).sum(axis=1)
    return (higher + tied_before).astype(np.int64)


def sort_hits(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's hits by score (descending), equal scores by label (ascending)."""
    order = np.lexsort((labels, -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(labels.astype(np.int64), order, 1)


def top_k_and_ranks(scores: np.ndarray, qrels: Qrels, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top-k labels (best first, ties by lower index) and the 0-based rank of
    its best positive in the full ranking: what every metric here needs."""
    scores = np.asarray(scores)
    k = min(int(k), scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    labels = sort_hits(np.take_along_axis(scores, top, 1), top)[1]
    return labels, first_positive_rank(scores, qrels)


def relevance(labels: np.ndarray, qrels: Qrels) -> np.ndarray:
    """Boolean (nq, k): whether each retrieved label is a positive of its query."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 2 or labels.shape[0] != len(qrels):
        raise InputError(f"labels of shape {labels.shape} do not match {len(qrels)} queries")
    n = int(max(labels.max(initial=0), qrels.indices.max(initial=0))) + 1
    retrieved = np.arange(len(labels))[:, None] * n + labels
    positives = qrels.rows() * n + qrels.indices
    return np.isin(retrieved, positives) & (labels >= 0)


def ranks_from_topk(labels: np.ndarray, qrels: Qrels) -> np.ndarray:
    """0-based rank of the first positive in each top-k list; ``k`` where none is found."""
    rel = relevance(labels, qrels)
    k = rel.shape[1]
    return np.where(rel.any(axis=1), rel.argmax(axis=1), k).astype(np.int64)


def recall_at(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    return {f"R@{k}": float(100.0 * (ranks < k).mean()) for k in ks}


def average_precision_at(rel: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    rel = rel[:, :k].astype(np.float64)
    prec = np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)
    return (prec * rel).sum(axis=1) / np.minimum(counts, k)


def ndcg_at(rel: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    rel = rel[:, :k].astype(np.float64)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (rel * discounts[: rel.shape[1]]).sum(axis=1)
    ideal = np.concatenate([[0.0], np.cumsum(discounts)])[np.minimum(counts, k)]
    return dcg / ideal


def retrieval_metrics(labels: np.ndarray, qrels: Qrels, ks: Sequence[int] = (1, 5, 10),
                      k_map: int | None = None, full_ranks: np.ndarray | None = None) -> dict[str, float]:
    """R@K, MRR, mAP@k, nDCG@k (and MedR when ``full_ranks`` is given) from top-k labels."""
    labels = np.asarray(labels, dtype=np.int64)
    k_map = k_map or labels.shape[1]
    if k_map > labels.shape[1]:
        raise InputError(f"mAP@{k_map} needs top-{k_map} lists, got top-{labels.shape[1]}")
    if max(ks) > labels.shape[1] and full_ranks is None:
        raise InputError(f"R@{max(ks)} needs top-{max(ks)} lists or full ranks")
    rel = relevance(labels, qrels)
    ranks = full_ranks if full_ranks is not None else np.where(rel.any(1), rel.argmax(1), labels.shape[1])
    out = recall_at(ranks, ks)
    out["MRR"] = float(np.where(ranks < (labels.shape[1] if full_ranks is None else np.inf),
                                1.0 / (ranks + 1.0), 0.0).mean())
    if full_ranks is not None:
        out["MedR"] = float(np.median(full_ranks + 1))
    out[f"mAP@{k_map}"] = float(100.0 * average_precision_at(rel, qrels.counts, k_map).mean())
    out[f"nDCG@{k_map}"] = float(100.0 * ndcg_at(rel, qrels.counts, k_map).mean())
    return out
