"""The query pipeline: ``refine → encode → adapt → transform → rank`` over a stream.

::

    pipe = Pipeline.from_config([{"adapt": "rest"}], encoder=enc, direction="t2i", index=idx)
    results = pipe.search(["a red circle left of a star"], k=5)   # online: adapts as it goes
    pipe.save_state("session.pt")                                 # resume later with load_state
    pipe.close()                                                  # the encoder as it was

``search`` returns top-k hits per query; ``score`` returns whole-gallery score rows
(what the benchmark's metrics need). Both feed the queries through every stage in
batches, in stream order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qshift.errors import InputError, StoreMismatchError
from qshift.io import stable_hash
from qshift.pipeline.batch import QueryBatch
from qshift.pipeline.config import StageSpec, parse_pipeline
from qshift.pipeline.context import PipelineContext
from qshift.pipeline.stage import Stage, create_stage
from qshift.progress import progress_bar

STATE_FORMAT = "qshift-pipeline-state"
STATE_VERSION = 1


@dataclass
class SearchResult:
    """One query's hits (``rank``, ``id``, ``score``, gallery ``index``), what the stages
    noted about it (e.g. the repaired text) and the seconds per stage of its batch."""

    query: Any
    hits: list[dict]
    meta: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"query": str(self.query), "results": self.hits, "meta": self.meta, "timings": self.timings}


class Pipeline:
    """Stages bound to one :class:`PipelineContext` (encoder, direction, gallery)."""

    def __init__(self, stages: Sequence[Stage], ctx: PipelineContext, specs: Sequence[StageSpec] | None = None
                 ) -> None:
        self.stages, self.ctx = list(stages), ctx
        self.specs = list(specs) if specs is not None else [StageSpec(s.kind, s.name) for s in self.stages]
        self.timings: dict[str, float] = {}  # seconds per stage, summed over every batch so far
        self.info: dict = {}                  # the last batch's notes (e.g. adaptation counters)
        for i, s in enumerate(self.stages):
            s.check_chain(self.stages[:i])
        done: list[Stage] = []
        try:
            for s in self.stages:
                s.setup(ctx)
                done.append(s)
        except BaseException:
            for s in reversed(done):
                s.close()
            raise

    @classmethod
    def from_config(cls, config: Any = None, ctx: PipelineContext | None = None, **context: Any) -> "Pipeline":
        """Build from a stage list / mapping / YAML file (:mod:`qshift.pipeline.config`);
        the context is given, or built from keyword arguments (``encoder``, ``direction``,
        ``gallery`` and/or ``index``, …)."""
        specs = parse_pipeline(config)
        stages = [create_stage(s.kind, s.name, s.options) for s in specs]
        return cls(stages, ctx if ctx is not None else PipelineContext(**context), specs)

    @classmethod
    def from_method(cls, method: Any, ctx: PipelineContext | None = None, **context: Any) -> "Pipeline":
        """A named method (``"rest"``, ``{"name": "quari", "checkpoint": …}``) as a pipeline."""
        from qshift.methods import method_stages

        return cls.from_config(method_stages(method), ctx, **context)

    # -- identity ---------------------------------------------------------------------
    def config(self) -> list[dict]:
        return [s.to_config() for s in self.specs]

    @property
    def key(self) -> str:
        """What a saved state depends on: the stages and their options, the direction and
        the encoder."""
        return stable_hash({"stages": self.config(), "direction": self.ctx.direction,
                            "encoder": self.ctx.encoder.fingerprint()})[:16]

    @property
    def stateful(self) -> bool:
        return any(s.stateful for s in self.stages)

    @property
    def batch_size(self) -> int:
        return next((int(s.batch_size) for s in self.stages if s.batch_size), self.ctx.batch_size)

    def __repr__(self) -> str:
        return "Pipeline(" + " → ".join(f"{s.kind}:{s.name}" for s in self.stages) + f", {self.ctx.direction})"

    # -- running ----------------------------------------------------------------------
    def run_batch(self, queries: Sequence[Any], *, k: int | None = 10, embeddings: np.ndarray | None = None,
                  positions: np.ndarray | None = None, index: int = 0) -> QueryBatch:
        """Feed one batch through every stage (``k=None``: whole-gallery score rows)."""
        queries = list(queries)
        if not queries:
            raise InputError("pipeline: a batch of size 0")
        batch = QueryBatch(queries, self.ctx.query_modality,
                           np.arange(len(queries)) if positions is None else np.asarray(positions),
                           index=index, k=k, embeddings=embeddings)
        for s in self.stages:
            t0 = time.perf_counter()
            batch = s(batch)
            dt = time.perf_counter() - t0
            key = f"{s.kind}:{s.name}"
            batch.timings[key] = dt
            self.timings[key] = self.timings.get(key, 0.0) + dt
        self.info = batch.info
        return batch

    def _batches(self, n: int, order: Sequence[int] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        if n == 0:
            raise InputError("pipeline: no queries")
        order = np.arange(n) if order is None else np.asarray(order)
        if order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
            raise InputError("pipeline: order must be a permutation of the query positions")
        bs = self.batch_size
        return order, [order[s:s + bs] for s in range(0, n, bs)]

    def score(self, queries: Sequence[Any], order: Sequence[int] | None = None, *,
              embeddings: np.ndarray | None = None, progress: bool = False) -> np.ndarray:
        """Whole-gallery scores (Q × N, rows in the given query order) after streaming the
        queries through the pipeline along ``order``. ``embeddings`` are the frozen
        encoder's embeddings of ``queries`` when the caller has them (e.g. from the store)."""
        queries = list(queries)
        if embeddings is not None and len(embeddings) != len(queries):
            raise InputError(f"pipeline: {len(embeddings)} embeddings for {len(queries)} queries")
        _, batches = self._batches(len(queries), order)
        out = np.empty((len(queries), len(self.ctx)), np.float32)
        with progress_bar(f"pipeline ({self!r})", len(queries), progress) as bar:
            for b, idx in enumerate(batches):
                batch = self.run_batch([queries[i] for i in idx], k=None, positions=idx, index=b,
                                       embeddings=None if embeddings is None else embeddings[idx])
                out[idx] = batch.scores
                bar.advance(len(idx))
        return out

    def search(self, queries: Sequence[Any], k: int = 10, *, embeddings: np.ndarray | None = None
               ) -> list[SearchResult]:
        """Top-k hits per query, in the given order (queries stream through in batches);
        ``embeddings``: the frozen encoder's embeddings of the queries, when known."""
        queries = list(queries)
        if embeddings is not None and len(embeddings) != len(queries):
            raise InputError(f"pipeline: {len(embeddings)} embeddings for {len(queries)} queries")
        _, batches = self._batches(len(queries), None)
        ids = self.ctx.ids
        results: list[SearchResult] = [None] * len(queries)  # type: ignore[list-item]
        for b, idx in enumerate(batches):
            batch = self.run_batch([queries[i] for i in idx], k=k, positions=idx, index=b,
                                   embeddings=None if embeddings is None else embeddings[idx])
            for row, pos in enumerate(idx):
                hits = [{"rank": r + 1, "id": ids[j], "score": float(s), "index": int(j)}
                        for r, (s, j) in enumerate(zip(batch.scores[row], batch.labels[row])) if j >= 0]
                results[pos] = SearchResult(queries[pos], hits, batch.meta[row], dict(batch.timings))
        return results

    # -- state ------------------------------------------------------------------------
    def _gallery_signature(self) -> str:
        g = self.ctx.gallery_vectors()
        import hashlib

        return f"{g.shape[0]}x{g.shape[1]}:" + hashlib.sha256(np.ascontiguousarray(g).tobytes()).hexdigest()[:16]

    def state_dict(self) -> dict:
        """Everything the stateful stages learnt, with what it is valid for."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "key": self.key,
                "pipeline": self.config(), "direction": self.ctx.direction,
                "encoder": self.ctx.encoder.fingerprint(),
                "gallery": self._gallery_signature() if self.stateful else None,
                "stages": {f"{i}:{s.kind}:{s.name}": s.state_dict() for i, s in enumerate(self.stages) if s.stateful}}

    def load_state_dict(self, state: dict, where: str = "state") -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise InputError(f"{where}: not a qshift pipeline state")
        if state.get("version") != STATE_VERSION:
            raise InputError(f"{where}: state format version {state.get('version')}, this qshift reads "
                             f"{STATE_VERSION}")
        fp = self.ctx.encoder.fingerprint()
        if state.get("encoder") != fp:
            raise StoreMismatchError(f"{where}: written by encoder {state.get('encoder')}, not {fp}")
        if state.get("key") != self.key:
            raise StoreMismatchError(f"{where}: written by another pipeline ({state.get('direction')}, "
                                     f"{state.get('pipeline')}), not this one ({self.ctx.direction}, {self.config()})")
        if self.stateful and state.get("gallery") != self._gallery_signature():
            raise StoreMismatchError(f"{where}: written against another gallery ({state.get('gallery')}, "
                                     f"this one is {self._gallery_signature()})")
        for i, s in enumerate(self.stages):
            if s.stateful:
                s.load_state_dict(state["stages"][f"{i}:{s.kind}:{s.name}"])

    def save_state(self, path: str | Path) -> None:
        """Write the state atomically (temp file + rename)."""
        import torch

        from qshift.io import atomic_path

        with atomic_path(Path(path), suffix=".pt") as tmp:
            torch.save(self.state_dict(), tmp)

    def load_state(self, path: str | Path) -> None:
        import pickle

        import torch

        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: state file not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable qshift state file ({str(exc).splitlines()[0][:200]})") from None
        self.load_state_dict(state, str(path))

    def reset(self) -> None:
        for s in self.stages:
            s.reset()

    def close(self) -> None:
        """Close every stage (adaptation stages restore the encoder exactly)."""
        for s in reversed(self.stages):
            s.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
