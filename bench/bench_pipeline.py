"""The query pipeline's own cost (issue 15).

    .venv/bin/python bench/bench_pipeline.py overhead     # exact search, 100k × 512, batch 64 and 1
    .venv/bin/python bench/bench_pipeline.py state        # save + load of an adaptation state
    .venv/bin/python bench/bench_pipeline.py all

``overhead`` times ``Pipeline.search`` (encode + rank, hits as dicts) and
``Pipeline.run_batch`` (the same stages, arrays out) against calling the same pieces
directly (the encoder's ``encode_text`` then ``ExactIndex.search``). The encoder is a
table lookup, so the encoder's own time does not hide the pipeline's; the end-to-end
rows use the shipped mini-CLIP text tower. ``state`` adapts REST along 8 batches of the
world test captions, then times ``save_state`` / ``load_state`` and reports the size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, md_table, previous_results, timeit, write_results  # noqa: E402


class LookupEncoder:
    """Query "i" → row i of a fixed table (stands in for an encoder at zero cost)."""

    spec, modalities = "bench:lookup", frozenset({"text"})

    def __init__(self, table: np.ndarray) -> None:
        self.table, self.dim = table, table.shape[1]

    def encode_text(self, texts, *, batch_size=None, progress=False):  # noqa: ANN001, ANN201
        return self.table[[int(t) for t in texts]]

    def fingerprint(self) -> str:
        return "bench:lookup#0"


def bench_overhead(n: int = 100_000, dim: int = 512, k: int = 10, reps: int = 60) -> dict:
    from qshift.index import ExactIndex
    from qshift.pipeline import Pipeline, PipelineContext

    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    gallery = unit(rng.standard_normal((n, dim)))
    index = ExactIndex(dim)
    index.add(gallery)
    _ = index.gallery  # consolidate outside the timings
    enc = LookupEncoder(unit(rng.standard_normal((4096, dim))))
    pipe = Pipeline.from_config(None, PipelineContext(enc, "t2i", index=index, batch_size=64))
    rows = []
    for batch in (64, 1):
        queries = [str(i) for i in range(batch)]
        t = interleaved({"direct": lambda: index.search(enc.encode_text(queries), k),
                         "arrays": lambda: pipe.run_batch(queries, k=k), "hits": lambda: pipe.search(queries, k)},
                        reps)
        direct, arrays, hits = t["direct"], t["arrays"], t["hits"]
        rows.append({"batch": batch, "direct_ms": 1e3 * direct, "pipeline_run_batch_ms": 1e3 * arrays,
                     "pipeline_search_ms": 1e3 * hits, "overhead_run_batch_pct": 100 * (arrays / direct - 1),
                     "overhead_search_pct": 100 * (hits / direct - 1)})
    out = {"gallery": [n, dim], "k": k, "rows": rows}
    # end to end with a real text tower: the pipeline's share is smaller still
    from qshift.encoders import create_encoder

    clip = create_encoder("world:mini-clip")
    g2 = unit(rng.standard_normal((n, clip.dim)))
    ix2 = ExactIndex(clip.dim)
    ix2.add(g2)
    _ = ix2.gallery
    pipe2 = Pipeline.from_config(None, PipelineContext(clip, "t2i", index=ix2, batch_size=64))
    texts = [f"a red circle left of {i} blue squares" for i in range(64)]
    e2e = []
    for batch in (64, 1):
        qs = texts[:batch]
        t = interleaved({"direct": lambda: ix2.search(clip.encode_text(qs), k), "hits": lambda: pipe2.search(qs, k)},
                        reps)
        direct, hits = t["direct"], t["hits"]
        e2e.append({"batch": batch, "direct_ms": 1e3 * direct, "pipeline_search_ms": 1e3 * hits,
                    "overhead_search_pct": 100 * (hits / direct - 1)})
    out["end_to_end"] = {"encoder": "world:mini-clip", "gallery": [n, clip.dim], "rows": e2e}
    return out


def bench_state(method: str = "rest", batches: int = 8) -> dict:
    from qshift.data.collection import load_collection
    from qshift.encoders import create_encoder
    from qshift.pipeline import Pipeline, PipelineContext
    from qshift.world import world_collection

    coll = load_collection(world_collection("test"))
    enc = create_encoder("world:mini-clip")
    gallery = enc.encode_images(list(coll.image_paths[:1000]), batch_size=128)
    texts = coll.texts()[: 64 * batches]
    rows = []
    for params in ("norm", "lora"):
        cfg = [{"adapt": {"method": method, "params": params}}]
        ctx = PipelineContext(enc, "t2i", gallery=gallery, source_texts=coll.texts()[-256:])
        with Pipeline.from_config(cfg, ctx) as pipe, tempfile.TemporaryDirectory() as tmp:
            pipe.score(texts)
            path = Path(tmp) / "state.pt"
            save = timeit(lambda: pipe.save_state(path), reps=5)
            load = timeit(lambda: pipe.load_state(path), reps=5)
            n_params = sum(int(p.numel()) for p in pipe.stages[1].adapter.params)
            rows.append({"method": method, "params": params, "adapted_values": n_params,
                         "size_kB": path.stat().st_size / 1024, "save_ms": 1e3 * save, "load_ms": 1e3 * load})
    return {"gallery": len(gallery), "batches_seen": batches, "rows": rows}


def render(data: dict) -> str:
    md = ["# Query pipeline (issue 15)", ""]
    if "overhead" in data:
        o = data["overhead"]
        md += [f"## Overhead over the same pieces called directly (exact search, {o['gallery'][0]:,} × "
               f"{o['gallery'][1]}, k = {o['k']})", "",
               "`.venv/bin/python bench/bench_pipeline.py overhead` — direct = `encode_text` + `ExactIndex.search`; "
               "`run_batch` = the pipeline's stages with arrays out; `search` = the same plus one dict per hit. "
               "The encoder is a table lookup, so only the pipeline's own work differs.", "",
               md_table(o["rows"], list(o["rows"][0]), {c: ".2f" for c in o["rows"][0] if c != "batch"}), "",
               f"End to end with the `{o['end_to_end']['encoder']}` text tower "
               f"({o['end_to_end']['gallery'][0]:,} × {o['end_to_end']['gallery'][1]} gallery):", "",
               md_table(o["end_to_end"]["rows"], list(o["end_to_end"]["rows"][0]),
                        {c: ".2f" for c in o["end_to_end"]["rows"][0] if c != "batch"}), ""]
    if "state" in data:
        s = data["state"]
        md += [f"## Adaptation state: save + load (after {s['batches_seen']} batches of 64, gallery {s['gallery']})",
               "", "`.venv/bin/python bench/bench_pipeline.py state` — `Pipeline.save_state` (atomic torch file: "
               "parameters, optimizer, objective queue/centres, counters, RNG) and `load_state` (with its checks).",
               "", md_table(s["rows"], list(s["rows"][0]),
                            {"size_kB": ".1f", "save_ms": ".2f", "load_ms": ".2f"}), ""]
    if "demo" in data:
        d = data["demo"]
        md += ["## `make demo`", "", d["note"], "", md_table(d["rows"], list(d["rows"][0])), ""]
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["overhead", "state", "all"])
    args = ap.parse_args()
    t0 = time.perf_counter()
    parts = {}
    if args.what in ("overhead", "all"):
        parts["overhead"] = bench_overhead()
    if args.what in ("state", "all"):
        parts["state"] = bench_state()
    data = {**previous_results("pipeline"), **parts}
    write_results("pipeline", data, render(data))
    print(render(data))
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
