"""Sharded search on Ray actors, behind qshift's ``Index`` protocol.

The gallery is cut into ``shards`` contiguous row ranges; each is held by a Ray actor
with its own qshift index (``Exact`` or any FAISS factory string). A query batch fans
out to every shard, each returns its top-k, and the merge sorts the union by score and
then by global label — exactly as a single :class:`~qshift.index.ExactIndex` orders its
hits — so sharded Exact search returns the single index's ids in the same order. The
query pipeline's rank stage takes a :class:`ShardedIndex` like any other index.

An actor that dies is restarted by Ray (it rebuilds its index from its rows, which live
in the object store) and the call is retried; when that fails too the search raises —
never a result that silently lacks a shard.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qshift.errors import InputError, StoreMismatchError
from qshift.metrics import sort_hits


class ShardActor:
    """One shard: a qshift index over a slice of the gallery (runs as a Ray actor)."""

    def __init__(self, vectors: np.ndarray, factory: str, params: dict, threads: int = 1) -> None:
        import torch

        from qshift.index import build_index

        torch.set_num_threads(max(1, threads))
        self.index = build_index(vectors.shape[1], factory, **params)
        self.index.add(vectors)
        _ = getattr(self.index, "gallery", None)  # consolidate an exact index now

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
        """This shard's top-k, and the seconds its own search took (the rest is fan-out)."""
        import time

        t0 = time.perf_counter()
        s, lab = self.index.search(queries, min(k, len(self.index)))
        return s, lab, time.perf_counter() - t0

    def size(self) -> int:
        return len(self.index)

    def vectors(self) -> np.ndarray:
        from qshift.index import index_vectors

        return index_vectors(self.index)

    def pid(self) -> int:
        return os.getpid()


class ShardedIndex:
    """``add`` the gallery once (it is split over ``shards`` actors), then ``search``."""

    def __init__(self, dim: int, shards: int = 2, factory: str = "Exact", address: str | None = None,
                 timeout: float = 120.0, **params: float) -> None:
        if shards < 1:
            raise InputError(f"shards must be >= 1, got {shards}")
        self.dim, self.n_shards, self.inner, self.params = int(dim), int(shards), factory, params
        self.factory = f"Sharded{shards}({factory})"
        self.address, self.timeout = address, timeout
        self.ids: list[str] = []
        self.meta: dict = {}
        self.actors: list[Any] = []
        self.offsets: list[int] = []

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, vectors: np.ndarray, ids: Sequence[str] | None = None) -> None:
        from qshift.store import check_embeddings

        vecs = check_embeddings(vectors, self.dim, what="vectors added to the sharded index")
        if self.n_shards > len(vecs):
            raise InputError(f"{self.n_shards} shards for a gallery of {len(vecs)} vectors: give at most "
                             f"{len(vecs)} shards")
        bounds = np.linspace(0, len(vecs), self.n_shards + 1).astype(int)
        self._place([vecs[a:b] for a, b in zip(bounds[:-1], bounds[1:])], ids)

    def _place(self, chunks: list[np.ndarray], ids: Sequence[str] | None) -> None:
        """Start one actor per chunk (rows in order: chunk i holds the labels after chunk i-1's)."""
        from qshift.scale.cluster import connect

        if self.actors:
            raise InputError("a sharded index is built in one add() (its shards are placed then)")
        n = sum(len(c) for c in chunks)
        self.ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(n)]
        if len(self.ids) != n:
            raise InputError(f"add: {len(self.ids)} ids for {n} vectors")
        ray = connect(self.address)
        cpus = ray.cluster_resources().get("CPU", 1)
        per = max(0.01, min(1.0, cpus / len(chunks)))
        remote = ray.remote(ShardActor).options(num_cpus=per, max_restarts=-1, max_task_retries=-1)
        self.offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])[:-1]]).astype(int).tolist()
        threads = max(1, int(cpus // len(chunks)))
        # the driver keeps the rows' object refs: a restarted actor rebuilds its index from them
        self._rows = [ray.put(c) for c in chunks]
        self.actors = [remote.remote(ref, self.inner, self.params, threads) for ref in self._rows]
        sizes = self._get([a.size.remote() for a in self.actors])
        if sizes != [len(c) for c in chunks]:
            raise RuntimeError(f"sharded index: shards hold {sizes}, expected {[len(c) for c in chunks]}")

    def _get(self, refs: list) -> list:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            return ray.get(refs, timeout=self.timeout)
        except RayActorError as exc:
            raise RuntimeError(f"a shard of the sharded index died and could not be restarted ({exc}); "
                               "no partial result is returned") from None
        except GetTimeoutError:
            raise RuntimeError(f"a shard of the sharded index did not answer within {self.timeout:.0f} s; "
                               "no partial result is returned") from None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from qshift.index import _check_k, as_queries

        if not self.actors:
            raise InputError("the sharded index is closed (or was never built): add() the gallery first")
        q = as_queries(queries, self.dim)
        k = _check_k(k, len(self))
        import ray

        ref = ray.put(q) if len(self.actors) > 1 else q  # one copy in the object store, not one per shard
        parts = self._get([a.search.remote(ref, k) for a in self.actors])
        self.last_shard_seconds = max(t for _, _, t in parts)  # the slowest shard's own search
        scores = np.concatenate([s for s, _, _ in parts], axis=1)
        labels = np.concatenate([np.where(lab >= 0, lab + off, -1) for (_, lab, _), off in zip(parts, self.offsets)],
                                axis=1)
        scores = np.where(labels >= 0, scores, -np.inf).astype(np.float32)
        s, lab = sort_hits(scores, labels)
        return s[:, :k], lab[:, :k]

    def check_fingerprint(self, fingerprint: str) -> None:
        have = self.meta.get("fingerprint")
        if have and have != fingerprint:
            raise StoreMismatchError(f"sharded index holds {have} embeddings, not {fingerprint}")

    def vectors(self) -> np.ndarray:
        """The gallery in label order, gathered from the shards (adapt/transform stages need it)."""
        return np.concatenate(self._get([a.vectors.remote() for a in self.actors]))

    def save(self, path: str | Path) -> None:
        raise InputError("a sharded index is built from an index directory or store entries, not saved as one")

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors, self._rows = [], []

    @classmethod
    def from_indexes(cls, paths: Sequence[str | Path], address: str | None = None, factory: str = "Exact",
                     **params: float) -> "ShardedIndex":
        """One shard per saved index (e.g. built on different hosts); all must come from
        the same encoder."""
        from qshift.index import index_vectors, load_index

        parts = [load_index(p) for p in paths]
        fps = {str(p): ix.meta.get("fingerprint") for p, ix in zip(paths, parts)}
        if len(set(fps.values())) > 1:
            raise StoreMismatchError("shards built by different encoders: " +
                                     ", ".join(f"{p}: {fp}" for p, fp in fps.items()))
        dims = {ix.dim for ix in parts}
        if len(dims) > 1:
            raise InputError(f"shards of different dimensions {sorted(dims)}")
        out = cls(dims.pop(), len(parts), factory, address, **params)
        out.meta = {"fingerprint": next(iter(fps.values())), "modality": parts[0].meta.get("modality")}
        out._place([index_vectors(ix) for ix in parts], [i for ix in parts for i in ix.ids])
        return out
