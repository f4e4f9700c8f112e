"""One worker thread runs every query: requests are micro-batched (up to ``max_batch``
queries, or whatever arrived within ``window_ms`` of the first) per pipeline, and each
pipeline sees its batches in arrival order.

The single worker is the single writer of every adaptation state, so concurrent requests
never interleave inside an update; pipelines that share the encoder object see it
unadapted (their adapt stages swap their values in for their own batches only). Every
batch's outcome — hits or an error — goes back to each waiting request.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass
class Job:
    key: Any                      # which pipeline
    query: Any                    # text, image, or an item's raw query
    k: int
    embedding: np.ndarray | None = None
    future: Future = field(default_factory=Future)


class Worker:
    def __init__(self, resolve: Callable[[Any], Any], max_batch: int = 64, window_ms: float = 3.0,
                 on_batch: Callable[[Any, list[Job], Any, float], None] | None = None) -> None:
        self.resolve, self.max_batch, self.window = resolve, max_batch, window_ms / 1000.0
        self.on_batch = on_batch
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.batches = 0
        self.lock = threading.Lock()  # held while a batch runs (state save/reset wait for it)
        self.thread = threading.Thread(target=self._run, name="qshift-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Future:
        self.queue.put(job)
        return job.future

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` between batches (e.g. a reset or a state save)."""
        with self.lock:
            return fn()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)

    def _collect(self, first: Job) -> list[Job]:
        jobs = [first]
        deadline = time.perf_counter() + self.window
        while len(jobs) < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                job = self.queue.get(timeout=max(left, 0)) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)
                break
            jobs.append(job)
        return jobs

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            jobs = self._collect(first)
            groups: dict[tuple, list[Job]] = {}
            for j in jobs:  # one pipeline call per pipeline and kind of query, in arrival order
                groups.setdefault((j.key, j.embedding is not None), []).append(j)
            for (key, _), group in groups.items():
                self._run_group(key, group)

    def _run_group(self, key: Any, group: list[Job]) -> None:
        t0 = time.perf_counter()
        try:
            with self.lock:
                pipe = self.resolve(key)
                k = max(j.k for j in group)
                emb = None if group[0].embedding is None else np.stack([j.embedding for j in group])
                results = pipe.search([j.query for j in group], k, embeddings=emb)
                self.batches += 1
        except BaseException as exc:  # noqa: BLE001 - every waiting request learns what went wrong
            for j in group:
                if not j.future.done():
                    j.future.set_exception(exc)
            return
        for j, r in zip(group, results):
            r.hits = r.hits[: j.k]
            j.future.set_result(r)
        if self.on_batch is not None:
            self.on_batch(key, group, pipe, time.perf_counter() - t0)
