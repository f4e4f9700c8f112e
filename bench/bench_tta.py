"""Online test-time adaptation under query shift (issue 6).

    .venv/bin/python bench/bench_tta.py grid --config bench/configs/tta-world-t2i.yaml
    .venv/bin/python bench/bench_tta.py grid --config bench/configs/tta-world-t2i-tuned.yaml
    .venv/bin/python bench/bench_tta.py grid --config bench/configs/tta-world-batch.yaml
    .venv/bin/python bench/bench_tta.py forgetting --encoder world:mini-clip
    .venv/bin/python bench/bench_tta.py forgetting --config bench/configs/tta-world-t2i-tuned.yaml --max-queries 5000
    .venv/bin/python bench/bench_tta.py cost --encoder world:mini-clip

``grid`` runs a config through the benchmark runner (resumable; report + PNGs in the run
folder) and summarises it: R@1 per corruption at severity 5, the mean, the streams, and
the issue's targets. ``forgetting`` adapts along the mixed stream, then scores the clean
queries with the adapted encoder (the authors' settings, or those of a config's methods).
``cost`` times one adaptation step against the forward-only encode of the same 64-query
batch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import previous_results, RESULTS, md_table, timeit, write_results  # noqa: E402


METHODS = ["tent", "eata", "sar", "read", "deyo", "tcr", "rest"]
COMPACT = 20  # a grid with more methods than this is rendered one line per method
TUNED = "-val-tuned"  # label suffix of a method run with its best setting on the val split
ORACLE = "oracle"  # label prefix of the ceiling row (trained with the true positives; not a method)


def bench_grid(config: Path) -> dict:
    import json

    from qshift.benchmark import load_config, run_benchmark
    from qshift.report import write_report

    cfg = load_config(config)
    out = run_benchmark(cfg, progress=True)
    write_report([out], out)
    if len(cfg.methods) <= COMPACT:  # a tuning grid's plots have one line per setting: unreadable
        for png in out.glob("*.png"):
            shutil.copy(png, RESULTS / f"tta_{cfg.name}_{png.name}")
    cells = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    table: dict[str, dict[str, float]] = {}  # R@1 at the highest severity (and clean)
    per_sev: dict[str, dict[int, dict[str, float]]] = {}
    streams: dict[str, dict] = {}
    top = max(cfg.severities, default=0)
    for c in cells:
        if c["shift"].startswith("stream:"):
            streams.setdefault(c["shift"], {})[c["method"]] = {
                "R@1": c["metrics"]["R@1"], "curve_r1": c["curve_r1"], "per_shift_r1": c.get("per_shift_r1", {}),
                "queries_per_s": c["queries_per_s"], "clean_r1_after": c.get("clean_r1_after")}
            continue
        if c["severity"] in (0, top):
            table.setdefault(c["method"], {})[c["shift"]] = c["metrics"]["R@1"]
        if c["shift"] != "clean":
            per_sev.setdefault(c["method"], {}).setdefault(c["severity"], {})[c["shift"]] = c["metrics"]["R@1"]
    corrs = sorted({c["shift"] for c in cells if not c["shift"].startswith("stream:") and c["shift"] != "clean"})
    summary: dict = {"config": str(config), "run": str(out), "r1": table, "streams": streams, "corruptions": corrs,
                     "severity": top}
    if not corrs and len(streams) == 1 and len(cfg.stream_severities) == 1:
        # a stream-only grid (the COCO full-length protocol): R@1 per corruption type is read
        # off the one continual pass, each type scored on the queries that came under it
        (name, per), = streams.items()
        table.update({m: dict(v["per_shift_r1"]) for m, v in per.items()})
        corrs = sorted({k for v in table.values() for k in v})
        summary.update(corruptions=corrs, severity=cfg.stream_severities[0], per_type_from=name)
    if len(cfg.severities) > 1:  # mean R@1 over the corruption types at each severity, and over severities
        summary["by_severity"] = {
            m: {**{str(sv): float(np.mean(list(r.values()))) for sv, r in sorted(v.items())},
                "mean": float(np.mean([x for r in v.values() for x in r.values()]))}
            for m, v in per_sev.items() if all(len(v.get(sv, {})) == len(corrs) for sv in cfg.severities)}
    if corrs and "zero-shot" in table:
        means = {m: float(np.mean([v[c] for c in corrs])) for m, v in table.items() if all(c in v for c in corrs)}
        summary["mean_r1"] = means
        zs = table["zero-shot"]
        if "rest" in table:
            rest = table["rest"]
            baselines = [m for m in means
                         if m not in ("zero-shot", "tcr") and not m.startswith("rest") and not m.endswith(TUNED)]
            summary["targets"] = {
                "rest_minus_zero_shot_mean": means["rest"] - means["zero-shot"],
                "rest_ge_every_baseline_mean": all(means["rest"] >= means[m] for m in baselines),
                "worst_rest_minus_zero_shot": min(rest[c] - zs[c] for c in corrs),
                "corruptions_where_rest_loses_over_1": [c for c in corrs if rest[c] < zs[c] - 1],
            }

        vs_zs = {m: {"minus_zero_shot_mean": means[m] - means["zero-shot"],
                     "worst_minus_zero_shot": min(table[m][c] - zs[c] for c in corrs)} for m in means}
        summary["vs_zero_shot"] = vs_zs
        tuned = [m for m in means if m.endswith(TUNED)]
        if f"rest{TUNED}" in tuned and len(tuned) > 1:  # every method with its own best setting on val
            summary["val_tuned"] = {m: vs_zs[m] for m in tuned}
            rivals = [m for m in tuned if m.split(TUNED)[0] not in ("rest", "tcr")]
            summary["rest_val_tuned_ge_every_tuned_baseline"] = (  # None: no baseline in the config
                all(means[f"rest{TUNED}"] >= means[m] for m in rivals) if rivals else None)
        summary["rest_variants"] = {  # REST with other settings (e.g. chosen on the val split)
            m: vs_zs[m] for m in means
            if m.startswith("rest") and m != "rest" and m not in summary.get("val_tuned", {})}
        if (c := ceiling(means, vs_zs)) is not None:
            summary["ceiling"] = c
    return summary


def _method_order(names) -> list[str]:
    """Zero-shot, then the methods in ``METHODS`` order, then the rest sorted: the JSON is
    written with sorted keys, so a table read back from it would otherwise be alphabetical."""
    rank = {m: i for i, m in enumerate(["zero-shot", *METHODS, "epcl", "rest+epcl"])}
    return sorted(names, key=lambda m: (rank.get(m.split(TUNED)[0], len(rank)), m))


def ceiling(means: dict[str, float], vs_zs: dict[str, dict]) -> dict | None:
    """The oracle row against the best val-tuned method (issue 17), or None without both."""
    oracle = [m for m in means if m.startswith(ORACLE)]
    tuned = [m for m in means if m.endswith(TUNED)]
    if not (oracle and tuned):
        return None
    best = max(tuned, key=lambda m: means[m])
    gain = vs_zs[oracle[0]]["minus_zero_shot_mean"]
    return {"oracle": oracle[0], "oracle_minus_zero_shot_mean": gain,
            "best_tuned": best, "best_tuned_minus_zero_shot_mean": vs_zs[best]["minus_zero_shot_mean"],
            "best_tuned_worst_minus_zero_shot": vs_zs[best]["worst_minus_zero_shot"],
            "share_of_ceiling": vs_zs[best]["minus_zero_shot_mean"] / max(gain, 1e-9)}


def bench_forgetting(encoder: str, max_queries: int, methods: list[str | dict], collection: str = "world:test",
                     source: object = "auto", direction: str = "t2i", shifts: list[str] | None = None,
                     min_similarity: float | None = None, out: Path = Path("runs/bench/tta-forgetting")) -> dict:
    """Adapt (continual mode) along the mixed text stream, then score the clean queries:
    each method's ``stream:mixed`` cell of a benchmark grid (:func:`qshift.benchmark.run_benchmark`,
    so cells resume from ``out``; a cell records ``clean_r1_after``). A method is a name or a
    config mapping (``name``, ``label``, options); ``collection``, ``source``, ``direction``
    (a text-query one: t2i or t2t), ``shifts`` (default: every text corruption) and
    ``min_similarity`` as a config's (a val config measures forgetting on the val split)."""
    from qshift.benchmark import BenchConfig, run_benchmark

    cfg = BenchConfig(name="tta-forgetting", encoder=encoder, collection=collection, direction=direction,
                      shifts=[s for s in (shifts or ["text"]) if s != "clean"], severities=[], streams=["mixed"],
                      methods=["zero-shot", *methods], max_queries=max_queries, source=source,
                      min_similarity=min_similarity)
    cells = {r["method"]: r for r in map(json.loads, (run_benchmark(cfg, out, progress=False) / "cells.jsonl")
                                          .read_text().splitlines())}
    zs = cells["zero-shot"]["clean_r1_after"]  # nothing adapts: the clean queries' zero-shot R@1
    result = {}
    for m, r in cells.items():
        result[m] = {"clean_r1_after": r["clean_r1_after"], "stream_r1": r["metrics"]["R@1"]}
        if m != "zero-shot":
            result[m]["resets"] = r["stage_info"].get("adapt", {}).get("resets", 0)
            result[m]["forgetting"] = zs - r["clean_r1_after"]
    return result


def bench_cost(encoder: str, reps: int = 5) -> dict:
    """Seconds for one 64-query batch: frozen forward vs one adaptation step (per method),
    the step as the pipeline runs it (the encode stage hands it the frozen embeddings), for
    both ``rank_with`` modes, and the whole adapted batch (encode + step)."""
    import torch

    from qshift.adapt import create_adapter
    from qshift.benchmark import BenchConfig, Grid
    from qshift.paths import cache_dir
    from qshift.store import EmbeddingStore

    cfg = BenchConfig(name="tta-cost", encoder=encoder, collection="world:test", direction="t2i", max_queries=256)
    grid = Grid(cfg, Path("runs/bench/tta-cost"), EmbeddingStore(cache_dir() / "store"), progress=False)
    texts = list(grid.raw_queries[:64])
    rows = []
    ad0 = create_adapter(grid.encoder, grid.gallery, "t2i", "tent")
    batch = ad0.prepare(texts)
    with torch.no_grad():
        q0 = ad0.forward(batch.inputs)

    def forward_only() -> None:
        with torch.no_grad():
            q = ad0.forward(batch.inputs)
            _ = q @ ad0.gallery.T

    t_fwd = timeit(forward_only, reps=reps * 2)
    ad0.close()
    for m in METHODS:
        for mode in ("updated", "last-step"):
            ad = create_adapter(grid.encoder, grid.gallery, "t2i", m, source_texts=grid.source_texts, steps=1,
                                rank_with=mode)
            try:
                b = ad.prepare(texts)
                ad.step(b, q0)  # warm-up (fills TCR/REST queues)
                t_step = timeit(lambda: ad.step(b, q0) @ ad.gallery.T, reps=reps)
            finally:
                ad.close()
            rows.append({"method": m, "rank_with": mode, "step_s": t_step, "step_vs_forward": t_step / t_fwd,
                         "batch_vs_zero_shot": (t_fwd + t_step) / t_fwd})
    return {"batch": 64, "forward_s": t_fwd, "zero_shot_queries_per_s": 64 / t_fwd, "rows": rows,
            "threads": torch.get_num_threads()}


def render_md(data: dict) -> str:
    md = ["# Online TTA under query shift (issue 6)", ""]
    for key, g in data.get("grids", {}).items():
        md += [f"## {key}", "", f"`.venv/bin/python bench/bench_tta.py grid --config {g['config']}` "
               f"(report with plots: `{g['run']}/report.md`)", ""]
        corrs = g["corruptions"]
        if corrs and len(g["r1"]) > COMPACT:  # a tuning grid: one line per setting, best first
            rows = sorted(({"setting": m, "mean": g["mean_r1"][m], **v} for m, v in g["vs_zero_shot"].items()),
                          key=lambda r: -r["mean"])
            md += [f"Mean R@1 over {len(corrs)} corruptions at severity 5, per setting (best first)", "",
                   md_table(rows, ["setting", "mean", "minus_zero_shot_mean", "worst_minus_zero_shot"],
                            {"mean": ".2f", "minus_zero_shot_mean": "+.2f", "worst_minus_zero_shot": "+.1f"}), ""]
        elif corrs:
            rows = [{"method": m, **{c[:10]: v.get(c, float('nan')) for c in corrs},
                     "mean": g.get("mean_r1", {}).get(m, float("nan")), "clean": v.get("clean", float("nan"))}
                    for m, v in g["r1"].items()]
            has_clean = any("clean" in v for v in g["r1"].values())
            cols = ["method", *[c[:10] for c in corrs], "mean", *(["clean"] if has_clean else [])]
            src = f"; each type's R@1 over its queries in `{g['per_type_from']}`" if g.get("per_type_from") else ""
            md += [f"R@1 at severity {g.get('severity', 5)} (columns: corruption types{src})", "",
                   md_table(rows, cols, {c: ".1f" for c in cols[1:]}), ""]
        if g.get("by_severity"):
            sevs = [k for k in next(iter(g["by_severity"].values())) if k != "mean"]
            md += [f"Mean R@1 over the {len(corrs)} corruption types at each severity, and over severities "
                   f"{sevs[0]}–{sevs[-1]}", "",
                   md_table([{"method": m, **v} for m, v in g["by_severity"].items()], ["method", *sevs, "mean"],
                            {k: ".2f" for k in [*sevs, "mean"]}), ""]
        png = f"tta_{key}_r1_per_type.png"
        if corrs and (RESULTS / png).is_file():
            md += [f"![per type]({png})", ""]
        for s, per in g["streams"].items():
            zs_clean = per.get("zero-shot", {}).get("clean_r1_after")
            after = zs_clean is not None and all(v.get("clean_r1_after") is not None for v in per.values())
            rows = [{"method": m, "R@1": v["R@1"], "curve": " ".join(f"{x:.0f}" for x in v["curve_r1"]),
                     "queries/s": v["queries_per_s"],
                     **({"clean_after": v["clean_r1_after"], "forgetting": zs_clean - v["clean_r1_after"]}
                        if after else {})} for m, v in per.items()]
            cols = ["method", "R@1", "curve", "queries/s", *(["clean_after", "forgetting"] if after else [])]
            md += [f"Stream `{s}` (R@1 over the whole stream; curve = R@1 in 10 windows along the stream"
                   + ("; clean_after = R@1 of every clean query by the tower as the stream left it, forgetting = "
                      "zero-shot's clean R@1 minus it" if after else "") + "):", "",
                   md_table(rows, cols, {"R@1": ".2f", "queries/s": ".0f", "clean_after": ".2f",
                                         "forgetting": "+.2f"}), ""]
        png = f"tta_{key}_adaptation_curve.png"
        if (RESULTS / png).is_file():
            md += [f"![curve]({png})", ""]
        if "targets" in g:
            t = g["targets"]
            md += [f"Targets: REST − zero-shot on the mean = {t['rest_minus_zero_shot_mean']:+.2f} (goal ≥ +3); "
                   f"REST ≥ every baseline on the mean: {t['rest_ge_every_baseline_mean']}; worst corruption "
                   f"REST − zero-shot = {t['worst_rest_minus_zero_shot']:+.2f} (goal ≥ −1; losing more on: "
                   f"{', '.join(t['corruptions_where_rest_loses_over_1']) or 'none'})", ""]
        for m, v in ({} if len(g["r1"]) > COMPACT or "val_tuned" in g else g.get("rest_variants", {})).items():
            md += [f"`{m}` − zero-shot on the mean = {v['minus_zero_shot_mean']:+.2f}; worst corruption "
                   f"{v['worst_minus_zero_shot']:+.2f}.", ""]
        if "val_tuned" in g:
            ge = g["rest_val_tuned_ge_every_tuned_baseline"]
            if ge is None or not any(m.split(TUNED)[0] in METHODS[:5] for m in g["val_tuned"]):
                ge = "not measured (no tuned baseline in this config)"
            md += ["Every method with its own best setting on the val split (the same (τ, lr) grid each):", "",
                   md_table([{"method": m, **v} for m, v in g["val_tuned"].items()],
                            ["method", "minus_zero_shot_mean", "worst_minus_zero_shot"],
                            {"minus_zero_shot_mean": "+.2f", "worst_minus_zero_shot": "+.2f"}), "",
                   f"REST ≥ every tuned baseline (Tent, EATA, SAR, READ, DeYO) on the mean: {ge}.", ""]
            others = {m: v for m, v in g.get("vs_zero_shot", {}).items() if m not in g["val_tuned"] and m != "zero-shot"}
            if others:
                md += ["Other rows (options measured at a tuned setting, the ceiling):", "",
                       md_table([{"method": m, **v} for m, v in others.items()],
                                ["method", "minus_zero_shot_mean", "worst_minus_zero_shot"],
                                {"minus_zero_shot_mean": "+.2f", "worst_minus_zero_shot": "+.2f"}), ""]
        if (c := g.get("ceiling") or (ceiling(g["mean_r1"], g["vs_zero_shot"]) if "vs_zero_shot" in g else None)):
            md += [f"Ceiling: the oracle (same parameters, steps and learning rate, trained with the true positives) "
                   f"wins {c['oracle_minus_zero_shot_mean']:+.2f} R@1 on the mean; the best val-tuned method "
                   f"(`{c['best_tuned']}`) {c['best_tuned_minus_zero_shot_mean']:+.2f}, "
                   f"{100 * c['share_of_ceiling']:.0f} % of it (worst type {c['best_tuned_worst_minus_zero_shot']:+.2f}).", ""]
    for key in [k for k in data if k.startswith("forgetting")]:
        f, settings = data[key], key.partition(":")[2] or "the authors' settings"
        md += [f"## Forgetting: clean R@1 after adapting along the mixed stream (continual mode; {settings})", "",
               md_table([{"method": m, **f[m]} for m in _method_order(f)],
                        ["method", "stream_r1", "clean_r1_after", "forgetting", "resets"],
                        {"stream_r1": ".2f", "clean_r1_after": ".2f", "forgetting": "+.2f"}), ""]
    if "cost" in data:
        c = data["cost"]
        md += [f"## Cost (64-query batch; frozen forward + score: {1e3 * c['forward_s']:.1f} ms, "
               f"{c['zero_shot_queries_per_s']:.0f} queries/s, {c.get('threads', '?')} threads)", "",
               "`Adapter.step` with one step, handed the frozen embeddings as the pipeline's encode stage does: "
               "one update (forward, backward, optimizer step), plus a ranking forward when `rank_with` is "
               "`updated`. `step_vs_forward` = the step over the forward-only encode; `batch_vs_zero_shot` = "
               "encode + step over encode alone.", "",
               md_table(c["rows"], ["method", "rank_with", "step_s", "step_vs_forward", "batch_vs_zero_shot"],
                        {"step_s": ".4f", "step_vs_forward": ".2f", "batch_vs_zero_shot": ".2f"}),
               "", "The queries/s columns of the stream tables give the end-to-end rate with the default "
               "3 steps.", ""]
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["grid", "forgetting", "cost"])
    ap.add_argument("--config", type=Path)
    ap.add_argument("--encoder", default="world:mini-clip")
    ap.add_argument("--max-queries", type=int, default=1000)
    args = ap.parse_args()
    t0 = time.perf_counter()
    key = args.what
    if args.what == "grid":
        part = bench_grid(args.config)
    elif args.what == "forgetting" and args.config:
        from qshift.benchmark import load_config

        cfg = load_config(args.config)
        part = bench_forgetting(cfg.encoder, args.max_queries, [  # not the ceiling rows: they need the labels
            m for m in cfg.methods if m != "zero-shot" and not (isinstance(m, dict) and m.get("labels"))],
            collection=cfg.collection, source=cfg.source, direction=cfg.direction, shifts=cfg.shifts,
            min_similarity=cfg.min_similarity, out=Path(f"runs/bench/tta-forgetting-{Path(args.config).stem}"))
        key = f"forgetting:{Path(args.config).stem}"
    elif args.what == "forgetting":
        part = bench_forgetting(args.encoder, args.max_queries, ["tent", "eata", "sar", "tcr", "rest"])
    else:
        part = bench_cost(args.encoder)
    data = previous_results("tta")  # read after the run: another part may have finished meanwhile
    if args.what == "grid":
        data.setdefault("grids", {})[Path(args.config).stem] = part
    else:
        data[key] = part
    write_results("tta", data, render_md(data))
    print(render_md(data))
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
