"""Continual multi-domain retrieval (issue 18): the protocol's table, plus DAR's costs.

    .venv/bin/python bench/bench_continual.py [--config bench/configs/continual-world.yaml]
    .venv/bin/python bench/bench_continual.py --prepare --config bench/configs/continual-world-corrupt.yaml

Runs (or resumes) the config with ``qshift.continual.run_continual`` and writes
bench/results/continual.{json,md} (+ the matrix PNG): average R@1 after the last domain,
BWT, forgetting, FWT and OOD R@1 per method (mean over the orders), training seconds
per domain, and DAR's adapter parameters and memory; routing latency per query is timed
on the real prototypes (one per domain, from the frozen image embeddings of each
domain's training images) at batch 1 and 256, with the routed embedding's cost against
the frozen one.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, md_table, timeit, write_results  # noqa: E402


def routing_costs(cfg, out: Path) -> dict:  # noqa: ANN001 - a ContinualConfig
    import torch

    from qshift.continual.methods import DAR, TrainSettings
    from qshift.continual.protocol import DomainSet
    from qshift.encoders import create_encoder
    from qshift.paths import cache_dir
    from qshift.store import EmbeddingStore

    enc = create_encoder(cfg.encoder)
    # the settings of the config's (first) DAR entry: its adapter kind sets the size and cost
    over = next((o for _, base, o in map(cfg.method_entry, cfg.methods) if base == "dar"), {})
    dar = DAR(enc, TrainSettings.from_dict({**cfg.settings, **over}))
    data = DomainSet(cfg, enc, EmbeddingStore(cache_dir() / "store"))
    if dar.needs_source:
        dar.use_source(data.source())
    for spec in cfg.domains:
        d = data.training(spec)
        dar.bank.add_domain(d.name)
        dar.router.add(d.name, dar.route_features(d.pixels))
        dar.seen.append(d)
    pixels = data.testing(cfg.ood[0] if cfg.ood else cfg.domains[0])["pixels"][:256]
    feats = dar.route_features(pixels)  # what the router reads: frozen embeddings or pixel statistics
    rows = []
    for b in (1, 256):
        t = timeit(lambda: dar.router.weights(feats[:b]), reps=50, warmup=5)
        rows.append({"batch": b, "route_us_per_query": 1e6 * t / b})
    with torch.no_grad():
        t_frozen = timeit(lambda: dar.base_features(pixels), reps=3)
        t_routed = timeit(lambda: dar.embed(pixels), reps=3)
    per = dar.bank.n_parameters(cfg.domain_name(cfg.domains[0]))
    tower = sum(p.numel() for p in dar.tower.parameters())
    dar.close()
    return {"routing": rows, "frozen_ms_per_image": 1e3 * t_frozen / len(pixels),
            "routed_ms_per_image": 1e3 * t_routed / len(pixels), "adapter_parameters_per_domain": per,
            "adapter_mb_per_domain": per * 4 / 2**20, "tower_parameters": tower, "domains": len(cfg.domains)}


CORRUPT = ("fog", "snow", "frost", "contrast", "gaussian_noise")
VAL_OOD = ("defocus_blur", "jpeg_compression", "zoom_blur", "elastic_transform")


def prepare(folder: Path = Path("runs/continual-data"), train: int = 2000, severity: int = 3,
            val: int = 500) -> None:
    """The corruption domains of continual-world-corrupt.yaml: the first ``train`` world
    train images and the world test images (absolute paths), each corrupted with
    ``qshift corrupt`` (seeded; resumable). For validation (continual-world-corrupt-val.yaml)
    each corrupted training set is also split by image: the first ``train - val`` images
    (fit{N}.*.csv) and the last ``val`` (val{M}.*.csv); the test images are not used. The
    clean val images also get the corruptions of ``VAL_OOD`` (continual-world-corrupt-route-val.yaml)."""
    import csv
    import subprocess

    from qshift.world import world_collection

    def corrupt(path: Path, c: str) -> None:
        subprocess.run([str(Path(sys.executable).with_name("qshift")), "corrupt", str(path), "-c", c,
                        "--severity", str(severity), "--json"], check=True, capture_output=True)

    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", None)):
        src = Path(world_collection(split))
        rows = list(csv.reader(src.open()))
        keep: dict[str, None] = {}
        out = []
        for img, cap in rows[1:]:
            if img not in keep and n is not None and len(keep) == n:
                break
            keep.setdefault(img, None)
            out.append([str((src.parent / img).resolve()), cap])
        dst = folder / f"{split}{n or len(keep)}.csv"
        with dst.open("w", newline="") as fh:
            csv.writer(fh).writerows([rows[0], *out])
        for c in (*CORRUPT, "motion_blur"):
            if split == "train" and c == "motion_blur":
                continue  # the OOD corruption is never trained on
            corrupt(dst, c)
            if split == "train":
                _split_by_image(folder / f"{dst.stem}.{c}-s{severity}-seed0.csv", train - val, val)
    # val's stand-ins for unseen shifts (continual-world-corrupt-route-val.yaml): corruptions
    # in neither the domains nor the test OOD, on the clean val images
    _split_by_image(folder / f"train{train}.csv", train - val, val)
    for c in VAL_OOD:
        corrupt(folder / f"val{val}.csv", c)


def _split_by_image(src: Path, n_fit: int, n_val: int) -> None:
    """fit{n_fit}.* and val{n_val}.* beside ``src`` (train{N}.*): its rows by image, in order."""
    import csv

    from qshift.io import write_text

    rows = list(csv.reader(src.open()))
    order: dict[str, int] = {}
    for img, _ in rows[1:]:
        order.setdefault(img, len(order))
    tail = src.name.split(".", 1)[1]
    for name, keep in ((f"fit{n_fit}.{tail}", lambda i: i < n_fit), (f"val{n_val}.{tail}", lambda i: i >= n_fit)):
        buf = io.StringIO()
        csv.writer(buf).writerows([rows[0], *[r for r in rows[1:] if keep(order[r[0]])]])
        write_text(src.with_name(name), buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="bench/configs/continual-world.yaml")
    ap.add_argument("--prepare", action="store_true", help="write the corruption domains first "
                    "(continual-world-corrupt.yaml)")
    args = ap.parse_args()
    if args.prepare:
        prepare()
    from qshift.continual.protocol import ContinualConfig, run_continual
    from qshift.continual.report import write_markdown
    from qshift.io import read_json

    cfg = ContinualConfig.load(args.config)
    out = run_continual(cfg, progress=True)
    write_markdown(out)
    s = read_json(out / "results.json")
    rows = []
    for m, r in s["mean_over_orders"].items():
        per = s["results"][m]
        secs = [x for o in per.values() for x in o["train_seconds"]]
        rows.append({"method": m, **r, "train_s_per_domain": float(np.mean(secs))})
    costs = routing_costs(cfg, out)
    name = Path(args.config).stem
    shutil.copyfile(out / "matrix.png", RESULTS / f"{name}_matrix.png")
    data = {"command": f"python bench/bench_continual.py --config {args.config}", "config": s["config"],
            "rows": rows, "costs": costs, "per_order": s["results"]}
    seq = next((r["average_r1"] for r in rows if r["method"] == "seq-ft"), None)
    md = [f"# Continual retrieval: {cfg.name} (issue 18)", "", f"`{data['command']}`", "",
          f"Encoder `{cfg.encoder}`; domains {', '.join(s['domains'])} in orders {cfg.orders}; OOD "
          f"{', '.join(s['ood'])}; gallery `{cfg.gallery}`; ≤ {cfg.max_train_images} training images per domain, "
          f"{cfg.max_test_images} test images per domain. R@1 = mean of T2I and I2T, mean over the orders.", "",
          md_table(rows, ["method", "average_r1", "bwt", "forgetting", "fwt", "ood_r1", "train_s_per_domain"],
                   {"average_r1": ".2f", "bwt": "+.2f", "forgetting": ".2f", "fwt": "+.2f", "ood_r1": ".2f",
                    "train_s_per_domain": ".1f"}), "",
          *([f"Sequential fine-tuning's average R@1: {seq:.2f}.", ""] if seq is not None else []),
          f"DAR's adapters: {costs['adapter_parameters_per_domain']:,} parameters per domain "
          f"({costs['adapter_mb_per_domain']:.2f} MB fp32; the image tower has {costs['tower_parameters']:,}). "
          f"Embedding an image: {costs['frozen_ms_per_image']:.2f} ms frozen, {costs['routed_ms_per_image']:.2f} ms "
          f"routed over {costs['domains']} domains (the frozen pass that routes + the adapted pass).", "",
          md_table(costs["routing"], ["batch", "route_us_per_query"], {"route_us_per_query": ".1f"}), "",
          f"![matrix]({name}_matrix.png)", ""]
    write_results(name.replace("-", "_"), data, "\n".join(md))


if __name__ == "__main__":
    main()
