"""Foundation benchmarks (issue 3): cache speed-up, search overhead over raw FAISS,
encoding throughput vs a plain loop, and the zero-shot MiniLM T2T baseline on COCO.

    .venv/bin/python bench/bench_foundation.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import md_table, timeit, write_results  # noqa: E402

from qshift.data.collection import load_lines  # noqa: E402
from qshift.encoders import create_encoder  # noqa: E402
from qshift.index import build_index  # noqa: E402
from qshift.retrieval import build_task, evaluate  # noqa: E402
from qshift.paths import ASSETS, shared_data_dir  # noqa: E402
from qshift.store import EmbeddingStore  # noqa: E402


def demo_collection_path() -> Path:
    """The real COCO 5k-test captions when ../shared/data is there, else the 200-image
    sample shipped in the package (what the demo used before it moved to the world)."""
    shared = shared_data_dir()
    if shared is not None and (shared / "coco-5k-test" / "captions.txt").is_file():
        return shared / "coco-5k-test" / "captions.txt"
    return ASSETS / "coco-dev-200" / "captions.txt"

QSHIFT = str(Path(sys.executable).parent / "qshift")


def bench_cache(captions: Path, limit: int | None, store: Path) -> dict:
    """Two `qshift encode` runs of the same collection into a fresh store."""
    cmd = [QSHIFT, "encode", str(captions), "-e", "st:all-MiniLM-L6-v2", "--json"]
    if limit:
        cmd += ["--limit", str(limit)]
    shown = " ".join(["qshift"] + cmd[1:] + ["--store", "TMP"])
    cmd += ["--store", str(store)]
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs.append({"wall_s": time.perf_counter() - t0, "encode_s": json.loads(out)[0]["seconds"],
                     "n": json.loads(out)[0]["n"]})
    return {"command": shown, "first": runs[0], "second": runs[1],
            "speedup_wall": runs[0]["wall_s"] / runs[1]["wall_s"],
            "speedup_encode_step": runs[0]["encode_s"] / max(runs[1]["encode_s"], 1e-9)}


def bench_search_overhead(n: int = 100_000, d: int = 384, nq: int = 1000) -> list[dict]:
    """qshift's FaissIndex.search vs the raw FAISS index it wraps, same queries."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal((n, d)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = rng.standard_normal((nq, d)).astype(np.float32)
    rows = []
    for factory, params in (("Flat", {}), ("HNSW32", {"efSearch": 64}), ("IVF1024,Flat", {"nprobe": 16})):
        idx = build_index(d, factory, **params)
        idx.add(g)
        raw = idx.index
        for batch in (1, nq):
            qs = q[:batch] if batch > 1 else q[:200]
            if batch == 1:  # one query per call: where wrapper overhead shows most
                f_raw = lambda: [raw.search(qs[i:i + 1], 10) for i in range(len(qs))]  # noqa: E731
                f_qs = lambda: [idx.search(qs[i:i + 1], 10) for i in range(len(qs))]  # noqa: E731
            else:
                f_raw = lambda: raw.search(qs, 10)  # noqa: E731
                f_qs = lambda: idx.search(qs, 10)  # noqa: E731
            # interleave the two and keep each one's best, so drift and warm-up hit both alike
            pairs = [(timeit(f_raw, reps=1, warmup=1), timeit(f_qs, reps=1, warmup=1)) for _ in range(7)]
            t_raw, t_qs = min(p[0] for p in pairs), min(p[1] for p in pairs)
            rows.append({"index": factory, "batch": batch, "raw_faiss_ms_per_q": 1e3 * t_raw / len(qs),
                         "qshift_ms_per_q": 1e3 * t_qs / len(qs), "overhead_pct": 100 * (t_qs / t_raw - 1)})
    return rows


def bench_encode_throughput(texts: list[str], batch_size: int = 128) -> dict:
    """qshift encode_text vs a plain batched loop over the same MiniLM model."""
    enc = create_encoder("st:all-MiniLM-L6-v2", batch_size=batch_size)
    model = enc.model

    def plain() -> np.ndarray:
        out = []
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                feats = model.preprocess(texts[s:s + batch_size])
                emb = model(feats)["sentence_embedding"]
                out.append(torch.nn.functional.normalize(emb, dim=-1).numpy())
        return np.concatenate(out)

    t_plain = timeit(plain, reps=3)
    t_qs = timeit(lambda: enc.encode_text(texts), reps=3)
    same = float(np.abs(plain() - enc.encode_text(texts)).max())
    return {"n": len(texts), "batch_size": batch_size, "plain_per_s": len(texts) / t_plain,
            "qshift_per_s": len(texts) / t_qs, "ratio": t_plain / t_qs, "max_abs_diff": same}


def bench_t2t(captions: Path, limit: int | None, store: Path) -> dict:
    coll = load_lines(captions, 5, name=captions.parent.name)
    if limit:
        coll = coll.subset(limit)
    enc = create_encoder("st:all-MiniLM-L6-v2")
    task = build_task(coll, enc, "t2t", EmbeddingStore(store), progress=False)  # cached by bench_cache
    m = evaluate(task)
    return {"collection": coll.name, "items": len(coll), **m}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    args = ap.parse_args()
    captions = demo_collection_path()
    limit = 300 if args.quick else None
    texts = load_lines(captions, 5).texts()[: 500 if args.quick else 5000]

    store = Path(tempfile.mkdtemp(prefix="qs-bench-store-"))
    cache = bench_cache(captions, limit, store)
    print("cache", cache, flush=True)
    overhead = bench_search_overhead(n=20_000 if args.quick else 100_000)
    print("overhead", overhead, flush=True)
    thr = bench_encode_throughput(texts)
    print("throughput", thr, flush=True)
    t2t = bench_t2t(captions, limit, store)
    print("t2t", t2t, flush=True)
    shutil.rmtree(store)

    md = ["# Foundation benchmarks", "",
          "Command: `.venv/bin/python bench/bench_foundation.py`" + (" --quick" if args.quick else ""), "",
          f"## Embedding cache (`{cache['command']}`, {cache['first']['n']} captions)", "",
          md_table([{"run": "first", **cache["first"]}, {"run": "second", **cache["second"]}],
                   ["run", "wall_s", "encode_s"], {"wall_s": ".2f", "encode_s": ".3f"}), "",
          f"Speed-up of the second run: **{cache['speedup_wall']:.1f}×** whole command (process start, "
          f"imports and store check included), **{cache['speedup_encode_step']:.0f}×** for the encode "
          "step alone (target ≥ 50×).", "",
          "## Search overhead of qshift over raw FAISS (same index, same queries, k=10)", "",
          md_table(overhead, ["index", "batch", "raw_faiss_ms_per_q", "qshift_ms_per_q", "overhead_pct"],
                   {"raw_faiss_ms_per_q": ".4f", "qshift_ms_per_q": ".4f", "overhead_pct": "+.1f"}), "",
          "## Encoding throughput, MiniLM, vs a plain batched loop (same model, same batch size)", "",
          md_table([thr], ["n", "batch_size", "plain_per_s", "qshift_per_s", "ratio", "max_abs_diff"],
                   {"plain_per_s": ".0f", "qshift_per_s": ".0f", "ratio": ".2f", "max_abs_diff": ".1e"}), "",
          f"## Zero-shot T2T baseline: MiniLM on {t2t['collection']} ({t2t['items']} images)", "",
          "Query = caption 0 of each image; gallery = normalised mean of captions 1–4.", "",
          md_table([t2t], ["R@1", "R@5", "R@10", "MRR", "MedR", "mAP@10", "nDCG@10"],
                   {c: ".2f" for c in ["R@1", "R@5", "R@10", "MRR", "MedR", "mAP@10", "nDCG@10"]})]
    write_results("foundation" + ("_quick" if args.quick else ""),
                  {"cache": cache, "search_overhead": overhead, "encode_throughput": thr, "t2t_minilm": t2t},
                  "\n".join(md))


if __name__ == "__main__":
    main()
