"""Distributed encoding on Ray Data, into the same embedding store as the local path.

``EmbeddingStore.encode(..., runner=ray_runner(...))`` keeps the plan, the manifest and
the shard names of the local path: only the missing shards become rows of a Ray
Dataset, and ``map_batches`` runs them on a pool of ``workers`` actors of
:class:`ShardEncoder` (one model load per actor; a GPU each where the cluster has them).
Each actor writes its shard with :meth:`EmbeddingStore.write_shard` (temp file + rename,
named by its content hash) and returns the shard's record; the driver rewrites the
manifest as records arrive. A killed actor is restarted and its shard redone (the same
file again, never half of one), so a job finishes with every shard exactly once, and a
later local run is a cache hit. The store must be on storage every worker sees (one
machine, or a shared file system on a cluster).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


class ShardEncoder:
    """A Ray Data actor: builds the encoder once, then encodes and writes shards."""

    def __init__(self, spec: str, fingerprint: str, modality: str, on_error: str, batch_size: int | None,
                 entry: str, threads: int, device: str) -> None:
        import torch

        from qshift.encoders import create_encoder
        from qshift.errors import StoreMismatchError

        torch.set_num_threads(max(1, threads))
        self.encoder = create_encoder(spec, **({"device": device} if device != "cpu" else {}))
        if self.encoder.fingerprint() != fingerprint:
            raise StoreMismatchError(f"Ray worker built {self.encoder.fingerprint()} from {spec!r}, the driver has "
                                     f"{fingerprint}: every worker needs the same weights")
        self.modality, self.on_error, self.batch_size, self.entry = modality, on_error, batch_size, Path(entry)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from qshift.store import EmbeddingStore

        out: dict[str, list] = {"content": [], "record": [], "pid": []}
        for content, units in zip(batch["content"], batch["units"]):
            vecs, skipped = EmbeddingStore._encode_shard(self.encoder, [str(u) for u in units], self.modality,
                                                         self.on_error, self.batch_size)
            record = EmbeddingStore.write_shard(self.entry, str(content), vecs, skipped)
            out["content"].append(str(content))
            out["record"].append(json.dumps(record))
            out["pid"].append(os.getpid())
        return out


def ray_runner(encoder: Any, modality: str, *, workers: int = 2, address: str | None = None,
               on_error: str = "raise", batch_size: int | None = None,
               on_shard: Callable[[dict], None] | None = None) -> Callable[..., Iterator[tuple[str, dict]]]:
    """A ``runner`` for :meth:`EmbeddingStore.encode` that encodes the missing shards on Ray."""
    from qshift.errors import InputError
    from qshift.scale.cluster import connect

    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")

    def run(tasks: list[tuple[str, list]], entry: Path) -> Iterator[tuple[str, dict]]:
        if not tasks:
            return
        ray = connect(address)
        gpus = ray.cluster_resources().get("GPU", 0)
        cpus = ray.cluster_resources().get("CPU", 1)
        per_gpu = 1 if gpus >= workers else (gpus / workers if gpus else 0)
        threads = max(1, int(cpus // workers))
        ds = ray.data.from_items([{"content": c, "units": [str(u) for u in units]} for c, units in tasks],
                                 override_num_blocks=len(tasks))
        ds = ds.map_batches(ShardEncoder, batch_size=1, concurrency=min(workers, len(tasks)),
                            num_cpus=threads if not gpus else 1, num_gpus=per_gpu,
                            fn_constructor_args=(encoder.spec, encoder.fingerprint(), modality, on_error, batch_size,
                                                 str(entry), threads, "cuda" if gpus else "cpu"),
                            max_restarts=-1, max_task_retries=-1)
        for row in ds.iter_rows():
            record = json.loads(row["record"])
            if on_shard is not None:
                on_shard({**record, "pid": int(row["pid"])})
            yield row["content"], record

    return run
