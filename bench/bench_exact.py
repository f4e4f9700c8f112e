"""Exact search benchmark (issue 8): qshift Exact vs FAISS IndexFlatIP vs torch matmul+topk.

    .venv/bin/python bench/bench_exact.py [--sizes 100000 1000000] [--quick]

Reports ms/query, achieved GFLOP/s (2·N·d per query) as a share of the measured SGEMM
peak, whether the top-k equals FAISS flat's, and the peak extra resident memory of one
search call. Writes bench/results/exact_search.{json,md} and a PNG of ms/query vs batch.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, PeakMemory, md_table, timeit, write_results  # noqa: E402

from qshift.index import build_index  # noqa: E402


def gemm_peak(n: int = 4096) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    t = timeit(lambda: a @ a, reps=3)
    return 2 * n**3 / t / 1e9


def run(sizes: list[int], d: int, batches: list[int], ks: list[int], peak: float) -> list[dict]:
    import faiss

    rows = []
    rng = np.random.default_rng(0)
    for n in sizes:
        g = rng.standard_normal((n, d), dtype=np.float32)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        queries = rng.standard_normal((max(batches), d), dtype=np.float32)
        flat = faiss.IndexFlatIP(d)
        flat.add(g)
        exact = {name: build_index(d, name) for name in ("Exact", "Exact,fp16", "Exact,bf16")}
        for idx in exact.values():
            idx.add(g)
            _ = idx.gallery  # consolidate outside the timings
        gt = torch.from_numpy(g)
        methods = {"faiss IndexFlatIP": lambda q, k: flat.search(q, k),
                   "torch matmul+topk": lambda q, k: torch.topk(torch.from_numpy(q) @ gt.T, k, dim=1),
                   **{f"qshift {name}": (lambda ix: lambda q, k: ix.search(q, k))(ix) for name, ix in exact.items()}}
        for batch in batches:
            q = queries[:batch]
            for k in ks:
                ref = flat.search(q, k)[1]
                base = None
                for name, fn in methods.items():
                    gc.collect()
                    with PeakMemory() as mem:
                        res = fn(q, k)
                    labels = res[1].numpy() if isinstance(res[1], torch.Tensor) else res[1]
                    t = timeit(lambda: fn(q, k), reps=3, warmup=0, min_time=0.5)
                    ms = 1e3 * t / batch
                    gflops = 2 * n * d * batch / t / 1e9
                    if name.startswith("faiss"):
                        base = ms
                    row = {"N": n, "batch": batch, "k": k, "method": name, "ms_per_query": ms,
                           "GFLOP/s": gflops, "pct_of_peak": 100 * gflops / peak,
                           "speedup_vs_faiss": base / ms,
                           "same_topk_set": bool(all(set(a) == set(b) for a, b in zip(labels, ref))),
                           "identical_order": bool(np.array_equal(labels, ref)),
                           "topk_overlap": float(np.mean([len(set(a) & set(b)) / k for a, b in zip(labels, ref)])),
                           "peak_extra_MB": mem.extra_mb}
                    rows.append(row)
                    print({c: (round(v, 3) if isinstance(v, float) else v) for c, v in row.items()}, flush=True)
        del flat, exact, gt, g
        gc.collect()
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["N"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["batch"], r["ms_per_query"]) for r in rows if r["N"] == n and r["method"] == method
                         and r["k"] == 10)
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel="batch size (queries)", ylabel="ms / query",
               title=f"exact top-10, N={n:,}, d=512")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sizes = [20_000] if args.quick else args.sizes
    peak = gemm_peak(2048 if args.quick else 4096)
    print(f"SGEMM peak: {peak:.1f} GFLOP/s", flush=True)
    rows = run(sizes, 512, [1, 8, 64, 256], [10, 100], peak)
    name = "exact_search" + ("_quick" if args.quick else "")
    cols = ["N", "batch", "k", "method", "ms_per_query", "GFLOP/s", "pct_of_peak", "speedup_vs_faiss",
            "same_topk_set", "identical_order", "peak_extra_MB"]
    fmt = {"ms_per_query": ".3f", "GFLOP/s": ".1f", "pct_of_peak": ".0f", "speedup_vs_faiss": ".2f",
           "peak_extra_MB": ".0f"}
    md = ["# Exact search: qshift Exact vs FAISS IndexFlatIP vs torch matmul+topk", "",
          f"Command: `.venv/bin/python bench/bench_exact.py{' --quick' if args.quick else ''}`; d = 512, "
          f"float32 queries; measured SGEMM peak **{peak:.0f} GFLOP/s** (numpy, 2 threads).", "",
          "`same_topk_set`: every query's top-k set equals FAISS flat's; `identical_order`: the label "
          "lists are equal element for element (two GEMM implementations round differently, so items "
          "whose scores differ by ~1e-7 can swap places). fp16/bf16 rows store the gallery in half "
          "precision, so their top-k may differ where scores are within that rounding.", "",
          f"![ms/query vs batch]({name}.png)", "", md_table(rows, cols, fmt)]
    write_results(name, {"gemm_peak_gflops": peak, "rows": rows}, "\n".join(md))
    plot(rows, RESULTS / f"{name}.png")  # after the tables, so a plotting failure loses no result


if __name__ == "__main__":
    main()
