"""ReEx benchmarks (issue 16): query repair, confidence-guided fusion and EPCL, alone and
combined with REST, through the benchmark runner.

    .venv/bin/python bench/bench_refine.py grid --config bench/configs/reex-coco-t2t.yaml
    .venv/bin/python bench/bench_refine.py grid --config bench/configs/reex-coco-t2t-tta.yaml
    .venv/bin/python bench/bench_refine.py grid --config bench/configs/reex-world-t2i-mini-clip.yaml
    .venv/bin/python bench/bench_refine.py grid --config bench/configs/reex-world-t2i-lit-minilm.yaml
    .venv/bin/python bench/bench_refine.py latency
    .venv/bin/python bench/bench_refine.py epcl-cost

``grid`` runs (or resumes) a config and tabulates R@1 per corruption and severity, the
mean of the six character-level types, the mean of all and the worst loss against
zero-shot, plus the share of queries each adaptation method learnt from. ``latency``
times each repair backend per query at batch 1 and 64 and the cache hit rate of a
second run. ``epcl-cost`` times one EPCL step against TCR's on a 64-query batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import md_table, previous_results, timeit, write_results  # noqa: E402

CHAR = ("char_delete", "char_insert", "char_substitute", "char_swap", "keyboard", "ocr")


def bench_grid(config: Path) -> dict:
    from qshift.benchmark import load_config, run_benchmark
    from qshift.report import write_report

    cfg = load_config(config)
    out = run_benchmark(cfg, progress=True)
    write_report([out], out)
    cells = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    per_seed: dict = {}  # method → severity → shift → R@1 of each seed
    share: dict = {}
    for c in cells:
        per_seed.setdefault(c["method"], {}).setdefault(str(c["severity"]), {}).setdefault(c["shift"], []).append(
            c["metrics"]["R@1"])
        a = c.get("stage_info", {}).get("adapt")
        if a:
            share.setdefault(c["method"], []).append(a.get("learning_share", 1.0))
    r1 = {m: {sev: {t: float(np.mean(v)) for t, v in by.items()} for sev, by in sevs.items()}
          for m, sevs in per_seed.items()}  # the mean over the config's seeds
    from qshift.methods import method_label

    summary: dict = {"config": str(config), "run": str(out), "queries": cells[0]["queries"] if cells else 0,
                     "encoder": cfg.encoder, "collection": cfg.collection, "r1": r1, "seeds": list(cfg.seeds),
                     "methods": [method_label(m) for m in cfg.methods],
                     "learning_share": {m: float(np.mean(v)) for m, v in share.items()}, "severities": {}}
    zs = r1.get("zero-shot", {})
    for sev in sorted({s for v in r1.values() for s in v}):
        types = sorted(zs.get(sev, {}))
        if not types:
            continue
        rows = {}
        for m, by in r1.items():
            v = by.get(sev, {})
            if not all(t in v for t in types):
                continue
            rows[m] = {"char_mean": float(np.mean([v[t] for t in CHAR if t in v])),
                       "mean": float(np.mean([v[t] for t in types])),
                       "worst_vs_zero_shot": float(min(v[t] - zs[sev][t] for t in types)),
                       "worst_type": min(types, key=lambda t: v[t] - zs[sev][t])}
        summary["severities"][sev] = {"types": types, "rows": rows}
    return summary


def bench_latency(n: int = 512) -> dict:
    """Seconds per query of each backend (batch 1 and 64), and the cache hit rate of a
    second pass over the same queries."""
    import tempfile

    from qshift.data.corruptions.text import corrupt_texts
    from qshift.data.collection import load_collection
    from qshift.paths import shared_data_dir
    from qshift.refine import BACKENDS

    root = shared_data_dir()
    dev = load_collection(root / "coco-5k-dev" / "captions.txt", captions_per_item=5)
    test = load_collection(root / "coco-5k-test" / "captions.txt", captions_per_item=5)
    clean = [c[0] for c in test.captions[:n]]
    noisy = corrupt_texts(clean, "keyboard", 5, 0).texts
    rows = []
    for name, opts in (("spell", {"vocabulary": dev.texts()}), ("llm", {"vocabulary": dev.texts()})):
        factory = BACKENDS.get(name)[0]
        t0 = time.perf_counter()
        rep = factory(**opts)
        build = time.perf_counter() - t0
        m = 64 if name == "llm" else n  # the local LLM is slow on 2 cores: fewer queries
        one = timeit(lambda: rep.repair(noisy[:1]), reps=3 if name == "llm" else 20)
        t0 = time.perf_counter()
        for s in range(0, m, 64):
            rep.repair(noisy[s:s + 64])
        batch = (time.perf_counter() - t0) / m
        rows.append({"backend": name, "build_s": build, "ms_per_query_batch1": 1e3 * one,
                     "ms_per_query_batch64": 1e3 * batch, "queries_timed": m})
    # the rewrite cache: a second pass reads every rewrite
    from qshift.refine.base import RefineStage

    from types import SimpleNamespace

    with tempfile.TemporaryDirectory() as tmp:
        stats = []
        for _ in range(2):
            stage = RefineStage("spell", vocabulary=dev.texts(), cache=tmp)
            stage.setup(SimpleNamespace(query_modality="text"))
            stage._repair(noisy)
            stats.append(dict(stage.stats))
            stage.close()
    hits = stats[1]["cache_hits"] / max(1, stats[1]["cache_hits"] + stats[1]["cache_misses"])
    return {"queries": n, "rows": rows, "second_run_cache_hit_rate": hits}


def bench_epcl_cost(reps: int = 5) -> dict:
    from qshift.adapt import create_adapter
    from qshift.benchmark import BenchConfig, Grid
    from qshift.paths import cache_dir
    from qshift.store import EmbeddingStore

    cfg = BenchConfig(name="epcl-cost", encoder="world:mini-clip", collection="world:test", direction="t2i",
                      max_queries=256)
    grid = Grid(cfg, Path("runs/bench/epcl-cost"), EmbeddingStore(cache_dir() / "store"), progress=False)
    texts = list(grid.raw_queries[:64])
    rows = []
    for label, method, opts in (("tcr", "tcr", {}), ("epcl", "epcl", {}),
                                ("tcr+epcl", "rest", {"use_consistency": False, "decouple": False,
                                                      "epcl_weight": 1.0})):
        ad = create_adapter(grid.encoder, grid.gallery, "t2i", method, source_texts=grid.source_texts, steps=1,
                            **opts)
        try:
            b = ad.prepare(texts)
            ad.step(b)
            rows.append({"method": label, "step_s": timeit(lambda: ad.step(b), reps=reps)})
        finally:
            ad.close()
    base = rows[0]["step_s"]
    for r in rows:
        r["vs_tcr"] = r["step_s"] / base
    return {"batch": 64, "rows": rows}


def _ordered(names, order: list[str]) -> list[str]:
    """``names`` in the config's method order (JSON is written with sorted keys), any
    others after them sorted; sections from before the order was recorded fall back to
    zero-shot first."""
    order = order or ["zero-shot"]
    rank = {m: i for i, m in enumerate(order)}
    return sorted(names, key=lambda m: (rank.get(m, len(rank)), m))


def render(data: dict) -> str:
    md = ["# ReEx: query repair, confidence-guided fusion, EPCL (issue 16)", ""]
    for key, g in data.get("grids", {}).items():
        md += [f"## {key} — {g['encoder']} on {g['collection']} ({g['queries']} queries)", "",
               f"`.venv/bin/python bench/bench_refine.py grid --config {g['config']}` (per-cell results and plots: "
               f"`{g['run']}/`)", ""]
        for sev, part in g["severities"].items():
            types = part["types"]
            rows = [{"method": m, **{t[:9]: g["r1"][m][sev][t] for t in types}, **part["rows"][m]}
                    for m in _ordered(part["rows"], g.get("methods", []))]
            cols = ["method", *[t[:9] for t in types], "char_mean", "mean", "worst_vs_zero_shot"]
            seeds = g.get("seeds", [0])
            over = f"; each cell the mean over corruption seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""
            fmt = ".2f" if len(seeds) > 1 else ".1f"
            md += [f"R@1 at severity {sev} (columns: corruption types; char_mean: the six character-level types{over})",
                   "", md_table(rows, cols, {c: fmt for c in cols[1:]} | {"worst_vs_zero_shot": "+" + fmt}), ""]
        if g["learning_share"]:
            md += ["Share of queries each adaptation method learnt from (mean over batches and cells): " +
                   ", ".join(f"{m} {g['learning_share'][m]:.2f}"
                             for m in _ordered(g["learning_share"], g.get("methods", []))), ""]
    if "latency" in data:
        lat = data["latency"]
        md += ["## Repair latency (COCO test queries with keyboard noise at severity 5)", "",
               "`.venv/bin/python bench/bench_refine.py latency`", "",
               md_table(lat["rows"], list(lat["rows"][0]), {"build_s": ".1f", "ms_per_query_batch1": ".1f",
                                                            "ms_per_query_batch64": ".1f"}), "",
               f"Rewrite cache, second run over the same {lat['queries']} queries: hit rate "
               f"{100 * lat['second_run_cache_hit_rate']:.0f} %.", ""]
    if "epcl_cost" in data:
        c = data["epcl_cost"]
        md += ["## Cost of an EPCL step (64-query batch, world:mini-clip)", "",
               "`.venv/bin/python bench/bench_refine.py epcl-cost`", "",
               md_table(c["rows"], ["method", "step_s", "vs_tcr"], {"step_s": ".4f", "vs_tcr": ".2f"}), ""]
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["grid", "latency", "epcl-cost"])
    ap.add_argument("--config", type=Path)
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.what == "grid":
        part = bench_grid(args.config)
    elif args.what == "latency":
        part = bench_latency()
    else:
        part = bench_epcl_cost()
    data = previous_results("refine")
    if args.what == "grid":
        data.setdefault("grids", {})[Path(args.config).stem] = part
    else:
        data[args.what.replace("-", "_")] = part
    write_results("refine", data, render(data))
    print(render(data))
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
