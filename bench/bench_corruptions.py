"""Query-shift suites (issue 5): time per item of every corruption, and the zero-shot
R@1 drop per corruption type at severity 5 (read from `qshift bench` results).

    .venv/bin/python bench/bench_corruptions.py timing [--world W]
    .venv/bin/python bench/bench_corruptions.py drops RESULTS_DIR [RESULTS_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import previous_results, md_table, write_results  # noqa: E402



def timing(world: Path | None) -> dict:
    from PIL import Image

    from qshift.data.collection import load_collection
    from qshift.data.corruptions import IMAGE_NAMES, TEXT_CORRUPTIONS
    from qshift.data.corruptions.image import corrupt_image
    from qshift.data.corruptions.text import corrupt_text, corrupt_texts
    from qshift.paths import ASSETS, shared_data_dir

    coco = load_collection(ASSETS / "coco-dev-200" / "captions.txt", captions_per_item=5).texts()[:300]
    rows = []
    for name in TEXT_CORRUPTIONS:
        corrupt_text(coco[0], name, 5)  # warm-up: nlpaug models, WordNet
        t0 = time.perf_counter()
        corrupt_texts(coco, name, 5)
        rows.append({"corruption": name, "kind": "text", "ms_per_item": (time.perf_counter() - t0) / len(coco) * 1e3,
                     "input": "COCO caption"})
    images: list[tuple[str, Image.Image]] = []
    shared = shared_data_dir()
    if shared and (shared / "flickr8k-1k" / "images").is_dir():
        files = sorted((shared / "flickr8k-1k" / "images").iterdir())[:20]
        images = [("Flickr8k photo, 224 px", Image.open(f).convert("RGB").resize((224, 224))) for f in files]
    if world:
        files = sorted((world / "images" / "photo" / "test").glob("*.png"))[:50]
        images += [("world image, 64 px (corrupted at 224)", Image.open(f).convert("RGB")) for f in files]
    for name in IMAGE_NAMES:
        for label in sorted({lab for lab, _ in images}):
            batch = [im for lab, im in images if lab == label]
            corrupt_image(batch[0], name, 5)  # warm-up (numba compiles glass blur)
            t0 = time.perf_counter()
            for k, im in enumerate(batch):
                corrupt_image(im, name, 5, index=k)
            rows.append({"corruption": name, "kind": "image", "input": label,
                         "ms_per_item": (time.perf_counter() - t0) / len(batch) * 1e3})
    return {"rows": rows}


def drops(results: list[Path]) -> dict:
    out = {}
    for res in results:
        # the per-cell files (a grid still running has written some cells but no cells.jsonl yet)
        cells = [json.loads(f.read_text()) for f in sorted((res / "cells").glob("*/*.json"))]
        zs = [c for c in cells if c["method"] == "zero-shot"]
        clean = next(c["metrics"]["R@1"] for c in zs if c["shift"] == "clean")
        per = {c["shift"]: c["metrics"]["R@1"] for c in zs if c["severity"] == 5}
        streams = {c["shift"]: c["metrics"]["R@1"] for c in zs if c["shift"].startswith("stream:")}
        name = zs[0]["name"]
        out[name] = {"clean_r1": clean, "severity5_r1": per, "drop": {k: clean - v for k, v in per.items()},
                     "mean_drop": float(np.mean([clean - v for v in per.values()])) if per else None,
                     "streams_r1": streams, "queries": zs[0]["queries"], "gallery": zs[0]["gallery"],
                     "encoder": zs[0]["encoder"]}
    return out


def render(data: dict) -> str:
    md = ["# Query-shift suites (issue 5)", ""]
    if "timing" in data:
        rows = data["timing"]["rows"]
        md += ["## Time per item, severity 5", "", "`.venv/bin/python bench/bench_corruptions.py timing --world W`", "",
               md_table(rows, ["corruption", "kind", "input", "ms_per_item"], {"ms_per_item": ".3f"}), ""]
    if "drops" in data:
        md += ["## Zero-shot R@1 under each corruption at severity 5", "",
               "`qshift bench bench/configs/<name>.yaml --severities 5`, then "
               "`.venv/bin/python bench/bench_corruptions.py drops runs/bench/<name> ...`", ""]
        for name, d in data["drops"].items():
            rows = [{"corruption": k, "R@1": v, "drop": d["drop"][k]} for k, v in d["severity5_r1"].items()]
            md += [f"### {name} (`{d['encoder']}`, {d['queries']} queries × {d['gallery']} gallery)", "",
                   f"Clean R@1 {d['clean_r1']:.2f}; mean drop {d['mean_drop']:.2f} points.", "",
                   md_table(rows, ["corruption", "R@1", "drop"], {"R@1": ".2f", "drop": ".2f"}), ""]
            if d["streams_r1"]:
                md += ["Streams (severity 5 shifts): " + ", ".join(f"{k} R@1 {v:.2f}" for k, v in d["streams_r1"].items()), ""]
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["timing", "drops"])
    ap.add_argument("results", nargs="*", type=Path)
    ap.add_argument("--world", type=Path)
    args = ap.parse_args()
    data = previous_results("corruptions")
    if args.what == "timing":
        data["timing"] = timing(args.world)
    else:
        data["drops"] = {**data.get("drops", {}), **drops(args.results)}
    write_results("corruptions", data, render(data))


if __name__ == "__main__":
    main()
