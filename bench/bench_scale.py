"""Scale-out on Ray (issue 20): encoding throughput and sharded search, on this machine.

    .venv/bin/python bench/bench_scale.py encode [--images 20000]   # local vs Ray, 1 and 2 workers
    .venv/bin/python bench/bench_scale.py search [--n 1000000]     # sharded vs single Exact search
    .venv/bin/python bench/bench_scale.py memory [--n 1000000]     # index memory per million vectors
    .venv/bin/python bench/bench_scale.py all

``encode`` embeds the world train images with ``world:mini-clip`` into a fresh store
each time: in-process (torch on every core, and on one), then on a local Ray instance
whose every worker has one CPU, with 1 and 2 workers (a worker = a core, so the ratio
is the scale-out's parallel efficiency). Ray's start-up is timed apart from the encode;
the actors' start is inside it, as a user meets it. ``search`` holds ``--n`` random unit
vectors of 512 dims in 1, 2 and 4 shards (one Ray actor each, Exact) and compares
queries/s and the top-10 with one in-process ExactIndex (identical ids expected); the
fan-out overhead per batch is the sharded search's time on a gallery so small that the
search itself costs nothing, minus the in-process one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import md_table, previous_results, timeit, write_results  # noqa: E402


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def bench_encode(images: int, shard_size: int = 500) -> dict:
    import ray
    import torch

    from qshift.benchmark import resolve_collection
    from qshift.encoders import create_encoder
    from qshift.scale.cluster import connect
    from qshift.scale.encode import ray_runner
    from qshift.store import EmbeddingStore

    coll = resolve_collection("world:train")[1].subset(images)
    enc = create_encoder("world:mini-clip")
    rows = []

    arrivals: list[tuple[float, int]] = []

    def run(label: str, runner=None) -> None:  # noqa: ANN001
        arrivals.clear()
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            emb = EmbeddingStore(d).encode(enc, coll, "image", shard_size=shard_size, progress=False, runner=runner)
            sec = time.perf_counter() - t0
        row = {"run": label, "images": len(emb.ids), "seconds": sec, "images_per_s": len(emb.ids) / sec}
        if len(arrivals) > 2:  # steady state: from the first shard written to the last (actors started)
            span = arrivals[-1][0] - arrivals[0][0]
            row["steady_images_per_s"] = sum(n for _, n in arrivals[1:]) / span
        rows.append(row)
        print(rows[-1], flush=True)

    def on_shard(record: dict) -> None:
        arrivals.append((time.perf_counter(), int(record.get("n", shard_size))))

    threads = torch.get_num_threads()
    run(f"in-process, torch {threads} threads")
    torch.set_num_threads(1)
    run("in-process, torch 1 thread")
    torch.set_num_threads(threads)
    for workers in (1, 2):
        t0 = time.perf_counter()
        connect(num_cpus=workers)
        start = time.perf_counter() - t0
        run(f"Ray, {workers} worker{'s' * (workers > 1)} × 1 CPU",
            ray_runner(enc, "image", workers=workers, on_shard=on_shard))
        rows[-1]["ray_start_s"] = start
        ray.shutdown()
    one = next(r for r in rows if r["run"].startswith("Ray, 1"))
    two = next(r for r in rows if r["run"].startswith("Ray, 2"))
    return {"images": images, "shard_size": shard_size, "rows": rows,
            "speedup_2_vs_1_worker": two["images_per_s"] / one["images_per_s"],
            "steady_speedup_2_vs_1_worker": two.get("steady_images_per_s", np.nan) / one.get("steady_images_per_s", np.nan)}


def bench_search(n: int, dim: int = 512, k: int = 10, batch: int = 64) -> dict:
    import ray

    from qshift.index import ExactIndex
    from qshift.scale.cluster import connect
    from qshift.scale.search import ShardedIndex

    rng = np.random.default_rng(0)
    gallery = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        gallery[s:s + 100_000] = _unit(rng.standard_normal((min(100_000, n - s), dim)))
    queries = _unit(rng.standard_normal((batch, dim)))
    single = ExactIndex(dim)
    single.add(gallery)
    _ = single.gallery
    want_s, want_i = single.search(queries, k)
    t = timeit(lambda: single.search(queries, k), reps=5)
    rows = [{"index": "ExactIndex (in-process)", "shards": 1, "qps": batch / t, "ms_per_batch": 1e3 * t,
             "identical_top_k": True, "recall_at_10": 1.0}]
    connect()
    try:
        for shards in (1, 2, 4):
            ix = ShardedIndex(dim, shards=shards)
            ix.add(gallery)
            got_s, got_i = ix.search(queries, k)
            t = timeit(lambda: ix.search(queries, k), reps=5)
            rec = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got_i, want_i)]))
            rows.append({"index": "ShardedIndex (Ray actors, Exact)", "shards": shards, "qps": batch / t,
                         "ms_per_batch": 1e3 * t, "identical_top_k": bool(np.array_equal(got_i, want_i)),
                         "recall_at_10": rec})
            print(rows[-1], flush=True)
            ix.close()
        small = gallery[:1000]
        local = ExactIndex(dim)
        local.add(small)
        _ = local.gallery
        over = []
        time.sleep(5)  # let the big shards' actors exit and free their memory
        for shards in (1, 2, 4):
            ix = ShardedIndex(dim, shards=shards)
            ix.add(small)
            for _ in range(10):
                ix.search(queries, k)
            walls, fan = [], []
            for _ in range(200):  # fan-out = the call's wall time minus the slowest shard's own search
                t0 = time.perf_counter()
                ix.search(queries, k)
                walls.append(time.perf_counter() - t0)
                fan.append(walls[-1] - ix.last_shard_seconds)
            tl = timeit(lambda: local.search(queries, k), reps=50, warmup=5)
            over.append({"shards": shards, "sharded_ms": 1e3 * float(np.median(walls)), "local_ms": 1e3 * tl,
                         "overhead_ms": 1e3 * float(np.median(fan)), "overhead_p90_ms": 1e3 * float(np.percentile(fan, 90))})
            ix.close()
    finally:
        ray.shutdown()
    return {"n": n, "dim": dim, "k": k, "batch": batch, "rows": rows, "overhead": over}


def bench_memory(n: int, dim: int = 512, host_gb: float = 64.0) -> dict:
    """Resident memory and file size per million vectors of each index kind, and the shards
    (one per host of ``host_gb`` with half of it for the index) that 100M vectors need."""
    import math

    from common import PeakMemory

    from qshift.index import build_index

    rng = np.random.default_rng(1)
    gallery = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        gallery[s:s + 100_000] = _unit(rng.standard_normal((min(100_000, n - s), dim)))
    rows = []
    for factory in ("Exact", "Exact,fp16", "IVF1024,PQ32"):
        with PeakMemory() as mem:
            ix = build_index(dim, factory)
            ix.add(gallery)
            if hasattr(ix, "gallery"):
                _ = ix.gallery
        with tempfile.TemporaryDirectory() as d:
            ix.save(Path(d) / "ix")
            size = sum(f.stat().st_size for f in (Path(d) / "ix").rglob("*") if f.is_file())
        per_m = size / 2**20 / (n / 1e6)
        rows.append({"factory": factory, "file_mb_per_million": per_m, "peak_build_mb_per_million":
                     mem.extra_mb / (n / 1e6), "hosts_for_100M": math.ceil(100 * per_m / 1024 / (host_gb / 2))})
        print(rows[-1], flush=True)
        del ix
    return {"n": n, "dim": dim, "host_gb": host_gb, "rows": rows}


def markdown(data: dict) -> str:
    mach = data["machine"]
    md = ["# Scale-out on Ray (issue 20)", "", f"Machine: {mach['cpu']}, {mach['cores']} cores.", ""]
    if "encode" in data:
        e = data["encode"]
        md += [f"## Encoding — `python bench/bench_scale.py encode --images {e['images']}`", "",
               f"world train images with world:mini-clip, shards of {e['shard_size']}, a fresh store each run.", "",
               md_table(e["rows"], ["run", "images", "seconds", "images_per_s", "steady_images_per_s", "ray_start_s"],
                        {"seconds": ".1f", "images_per_s": ".1f", "steady_images_per_s": ".1f", "ray_start_s": ".1f"}),
               "", f"Ray with 2 workers / 1 worker: **{e['speedup_2_vs_1_worker']:.2f}×** end to end (the actors' "
               f"start included), **{e['steady_speedup_2_vs_1_worker']:.2f}×** in the steady state (from the first "
               "shard written to the last). `ray_start_s` is `ray.init`, outside the run's seconds.", ""]
    if "search" in data:
        s = data["search"]
        md += [f"## Sharded search — `python bench/bench_scale.py search --n {s['n']}`", "",
               f"{s['n']:,} random unit vectors × {s['dim']}, batches of {s['batch']} queries, top-{s['k']}.", "",
               md_table(s["rows"], ["index", "shards", "qps", "ms_per_batch", "identical_top_k", "recall_at_10"],
                        {"qps": ".0f", "ms_per_batch": ".1f", "recall_at_10": ".3f"}), "",
               "Fan-out overhead per batch of 64 queries (1,000-vector gallery): the sharded call's wall time minus "
               "its slowest shard's own search (median and 90th percentile of 200 calls); `local_ms` is one "
               "in-process ExactIndex over the same vectors.", "",
               md_table(s["overhead"], ["shards", "sharded_ms", "local_ms", "overhead_ms", "overhead_p90_ms"],
                        {"sharded_ms": ".2f", "local_ms": ".2f", "overhead_ms": ".2f", "overhead_p90_ms": ".2f"}),
               ""]
    if "memory" in data:
        m = data["memory"]
        md += [f"## Memory per million vectors — `python bench/bench_scale.py memory --n {m['n']}`", "",
               f"{m['dim']}-d vectors; file = the saved index; peak = resident memory added while building it "
               f"(the float32 input not counted). Hosts for 100M vectors: one shard per host of {m['host_gb']:g} GB "
               "with half of it for the index.", "",
               md_table(m["rows"], ["factory", "file_mb_per_million", "peak_build_mb_per_million", "hosts_for_100M"],
                        {"file_mb_per_million": ".0f", "peak_build_mb_per_million": ".0f"}), ""]
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["encode", "search", "memory", "all"])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--n", type=int, default=1_000_000)
    args = ap.parse_args()
    from common import machine

    data = {k: v for k, v in previous_results("scale").items() if k in ("encode", "search", "memory")}
    if args.what in ("encode", "all"):
        data["encode"] = bench_encode(args.images)
    if args.what in ("search", "all"):
        data["search"] = bench_search(args.n)
    if args.what in ("memory", "all"):
        data["memory"] = bench_memory(args.n)
    write_results("scale", data, markdown({**data, "machine": machine()}))


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()
