"""Benchmark world (issue 4): generator throughput, training curves, clean recall of the
shipped models, and the per-domain recall matrix.

    .venv/bin/python bench/bench_world.py generator            # images/s per style, one core
    .venv/bin/python bench/bench_world.py models  --world W --mini-clip RUN --lit RUN
    .venv/bin/python bench/bench_world.py domains --world W --runs PREFIX   # PREFIX-<style> run folders
    .venv/bin/python bench/bench_world.py ship --world W --run RUN   # checkpoint + card into the package

The runs come from ``qshift world train`` (commands in bench/results/world.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import previous_results, RESULTS, md_table, write_results  # noqa: E402

from qshift.io import read_json  # noqa: E402


def bench_generator(n: int = 600) -> dict:
    import io

    from PIL import Image

    from qshift.world.captions import captions_for
    from qshift.world.render import STYLES, render
    from qshift.world.scene import sample_scene, scene_rng

    rows = []
    for style in STYLES:
        t0 = time.perf_counter()
        for i in range(n):  # everything a part costs: scene, captions, render, PNG encode
            scene = sample_scene(0, "test", i, ("flat",))
            captions_for(scene, 0, "test", i)
            buf = io.BytesIO()
            Image.fromarray(render(scene, style, scene_rng(0, "test", i, 2), 64)).save(buf, "PNG", compress_level=1)
        rows.append({"style": style, "images_per_s": n / (time.perf_counter() - t0)})
    return {"rows": rows, "min_images_per_s": min(r["images_per_s"] for r in rows)}


def plot_curves(runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    for name, run in runs.items():
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        ep = [r["epoch"] for r in log]
        axes[0].plot(ep, [r["loss"] for r in log], marker=".", label=name)
        axes[1].plot(ep, [r["val_t2i_R@1"] for r in log], marker=".", label=f"{name} T2I")
        axes[1].plot(ep, [r["val_i2t_R@1"] for r in log], marker=".", ls="--", label=f"{name} I2T")
    axes[0].set(xlabel="epoch", ylabel="contrastive loss (train)", title="training loss")
    axes[1].set(xlabel="epoch", ylabel="R@1 (%), val split (1k images)", title="validation recall")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluate(encoder_spec: str, collection: Path) -> dict:
    from qshift.data.collection import load_collection
    from qshift.encoders import create_encoder
    from qshift.paths import cache_dir
    from qshift.retrieval import build_task, evaluate as ev
    from qshift.store import EmbeddingStore

    enc = create_encoder(encoder_spec)
    coll = load_collection(collection)
    store = EmbeddingStore(cache_dir() / "store")
    return {d: ev(build_task(coll, enc, d, store, progress=False)) for d in ("t2i", "i2t")}


def bench_models(world: Path, runs: dict[str, Path]) -> dict:
    out = {}
    for name, run in runs.items():
        summary = read_json(run / "summary.json")
        cfg = read_json(run / "train_config.json")["train"]
        spec = f"world:{name}@{run / 'model.safetensors'}"
        test = evaluate(spec, world / "test.csv")
        heldout = evaluate(spec, world / "test-pixel.csv")
        out[name] = {"train_config": cfg, "train_seconds": summary["train_seconds"],
                     "checkpoint_mb": (run / "model.safetensors").stat().st_size / 2**20,
                     "test": test, "test_heldout_pixel": heldout}
    plot_curves(runs, RESULTS / "world_training.png")
    return out


def bench_domains(world: Path, prefix: str | None, styles: list[str], all_run: Path | None,
                  previous: dict | None = None) -> dict:
    """Rows for the runs found; rows of ``previous`` whose runs are absent now are kept
    (the single-style runs may have been trained and evaluated on another machine)."""
    from qshift.world.generate import open_world

    w = open_world(world)
    eval_styles = [*w.config.styles, *w.config.heldout]
    previous = previous or {}
    matrix, trained = dict(previous.get("matrix_t2i_r1", {})), dict(previous.get("train_seconds", {}))
    sources = {s: Path(f"{prefix}-{s}") for s in styles} if prefix else {}
    if all_run is not None:
        sources = {"all": all_run, **sources}
    for src, run in sources.items():
        if not (run / "model.safetensors").is_file():
            print(f"skip {src}: {run} has no model", file=sys.stderr)
            continue
        model = read_json(run / "train_config.json")["train"]["model"]
        spec = f"world:{model}@{run / 'model.safetensors'}"
        matrix[src] = {s: evaluate(spec, world / f"test-{s}.csv")["t2i"]["R@1"] for s in eval_styles}
        trained[src] = read_json(run / "summary.json")["train_seconds"]
    matrix = {k: matrix[k] for k in sorted(matrix, key=lambda k: k != "all")}  # the all-styles row first
    drops = {}
    for src in styles:
        if src in matrix:
            own = matrix[src][src]
            drops[src] = {s: own - v for s, v in matrix[src].items() if s != src}
    return {"matrix_t2i_r1": matrix, "train_seconds": trained, "drop_from_own_style": drops,
            "styles_losing_10_points": {s: sorted(k for k, d in v.items() if d >= 10) for s, v in drops.items()}}


def ship(run: Path, world: Path) -> dict:
    """Copy a run's checkpoint into the package (assets/world/NAME.safetensors) with its
    card: the command that reproduces it, its training time and its measured test recall."""
    import shutil

    from qshift.io import write_json
    from qshift.world.models import WORLD_ASSETS, shipped_checkpoint

    cfg = read_json(run / "train_config.json")["train"]
    summary = read_json(run / "summary.json")
    name = cfg["model"]
    WORLD_ASSETS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "model.safetensors", shipped_checkpoint(name))
    cmd = (f"qshift world train WORLD --model {name} -o RUN --epochs {cfg['epochs']} --batch-size "
           f"{cfg['batch_size']} --lr {cfg['lr']} --seed {cfg['seed']}")
    test = evaluate(f"world:{name}", world / "test.csv")
    card = {"model": name, "architecture": f"qshift-{name}", "world": "qshift world generate WORLD (seed 0, "
            "20k/1k/1k scenes, 5 training styles + held-out pixel)", "command": cmd, "train_config": cfg,
            "train_seconds": summary["train_seconds"], "train_images": summary["images"],
            "final_epoch": summary["final"],
            "test": {d: {k: test[d][k] for k in ("R@1", "R@5", "R@10")} for d in ("t2i", "i2t")},
            "checkpoint_mb": shipped_checkpoint(name).stat().st_size / 2**20}
    write_json(WORLD_ASSETS / f"{name}.json", card)
    return card


def plot_matrix(matrix: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(matrix)
    cols = list(next(iter(matrix.values())))
    data = np.array([[matrix[r][c] for c in cols] for r in rows])
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2, 0.6 * len(rows) + 1.6), dpi=120)
    im = ax.imshow(data, cmap="viridis")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), [f"trained on {r}" for r in rows])
    ax.set_xlabel("test style (pixel = held out)")
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, f"{data[i, j]:.1f}", ha="center", va="center", color="w" if data[i, j] < data.max() * 0.6 else "k",
                    fontsize=8)
    fig.colorbar(im, ax=ax, label="T2I R@1 (%)")
    ax.set_title("per-domain recall matrix (world test split, 1k images per style)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["generator", "models", "domains", "ship"])
    ap.add_argument("--run", type=Path, help="ship: the run folder whose checkpoint goes into the package")
    ap.add_argument("--world", type=Path)
    ap.add_argument("--mini-clip", type=Path)
    ap.add_argument("--lit", type=Path)
    ap.add_argument("--runs", help="prefix of per-style run folders (PREFIX-flat, ...)")
    ap.add_argument("--all-run", type=Path, help="the run trained on every style, for the matrix's first row")
    ap.add_argument("--styles", default="flat,photo,sketch,dark,cartoon")
    args = ap.parse_args()
    data = previous_results("world")
    if args.what == "ship":
        print(json.dumps(ship(args.run, args.world), indent=1))
        return
    if args.what == "generator":
        import os

        os.sched_setaffinity(0, {0})  # one core, as the target says
        data["generator"] = bench_generator()
    elif args.what == "models":
        runs = {k: v for k, v in (("mini-clip", args.mini_clip), ("lit-minilm", args.lit)) if v is not None}
        data["models"] = bench_models(args.world, runs)
    else:
        data["domains"] = bench_domains(args.world, args.runs, args.styles.split(","), args.all_run,
                                        data.get("domains"))
        plot_matrix(data["domains"]["matrix_t2i_r1"], RESULTS / "world_domains.png")
    write_results("world", data, render_md(data))


def render_md(data: dict) -> str:
    md = ["# Benchmark world (issue 4)", ""]
    if "generator" in data:
        g = data["generator"]
        md += ["## Generator throughput (one core, 64 px, scene + 5 captions + render + PNG)", "",
               "`.venv/bin/python bench/bench_world.py generator`", "",
               md_table(g["rows"], ["style", "images_per_s"], {"images_per_s": ".0f"}), ""]
    if "models" in data:
        md += ["## Shipped models: clean recall on the test split (1,000 images, 5,000 captions)", "",
               "![training curves](world_training.png)", ""]
        rows = []
        for name, m in data["models"].items():
            for split, key in (("test (training styles)", "test"), ("test, held-out pixel style", "test_heldout_pixel")):
                t, i = m[key]["t2i"], m[key]["i2t"]
                rows.append({"model": name, "split": split, "T2I R@1": t["R@1"], "T2I R@5": t["R@5"],
                             "T2I R@10": t["R@10"], "I2T R@1": i["R@1"], "I2T R@5": i["R@5"], "I2T R@10": i["R@10"],
                             "train min": m["train_seconds"] / 60, "MB": m["checkpoint_mb"]})
        md += [md_table(rows, list(rows[0]), {k: ".2f" for k in rows[0] if k not in ("model", "split")}), ""]
        for name, m in data["models"].items():
            c = m["train_config"]
            md += [f"- `{name}`: `qshift world train WORLD --model {name} -o RUN --epochs {c['epochs']} "
                   f"--batch-size {c['batch_size']} --lr {c['lr']} --seed {c['seed']}` "
                   f"({m['train_seconds'] / 60:.1f} min of training on this machine)"]
        md += [""]
    if "domains" in data:
        d = data["domains"]
        cols = list(next(iter(d["matrix_t2i_r1"].values())))
        rows = [{"trained on": k, **v} for k, v in d["matrix_t2i_r1"].items()]
        md += ["## Per-domain recall matrix (T2I R@1 on each style's test split)", "",
               "![matrix](world_domains.png)", "", md_table(rows, ["trained on", *cols], {c: ".2f" for c in cols}), "",
               "Styles on which a single-style model loses ≥ 10 R@1 points against its own style:", ""]
        md += [f"- {s}: {', '.join(v) or 'none'}" for s, v in d["styles_losing_10_points"].items()] + [""]
    return "\n".join(md)


if __name__ == "__main__":
    main()
