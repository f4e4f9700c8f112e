"""`qshift demo`: the main job end to end on an embedded default.

Until the benchmark world lands, the default is the real pretrained MiniLM text
encoder on real COCO captions, text-to-text: caption 0 of each image queries a gallery
where each image is the mean of its captions 1–4. With ``../shared/data`` present it
uses the 5k COCO test images (25k captions); otherwise the 200-image sample that ships
inside the package.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from qshift.data.collection import load_lines
from qshift.encoders import create_encoder
from qshift.index import build_index
from qshift.io import write_json, write_text
from qshift.paths import ASSETS, shared_data_dir
from qshift.retrieval import build_task, evaluate
from qshift.store import EmbeddingStore

ENCODER = "st:all-MiniLM-L6-v2"


def demo_collection_path() -> Path:
    shared = shared_data_dir()
    if shared is not None and (shared / "coco-5k-test" / "captions.txt").is_file():
        return shared / "coco-5k-test" / "captions.txt"
    return ASSETS / "coco-dev-200" / "captions.txt"


def run_demo(out_dir: Path, store: EmbeddingStore, limit: int | None = None,
             console: Console | None = None) -> dict:
    console = console or Console()
    path = demo_collection_path()
    coll = load_lines(path, 5, name=path.parent.name)
    if limit:
        coll = coll.subset(limit)
    console.print(f"[bold]collection[/] {coll.name}: {len(coll)} images × 5 captions ({path})")
    t0 = time.perf_counter()
    encoder = create_encoder(ENCODER)
    console.print(f"[bold]encoder[/] {encoder.spec} (dim {encoder.dim}) loaded in {time.perf_counter() - t0:.1f}s")

    t0 = time.perf_counter()
    task = build_task(coll, encoder, "t2t", store)
    t_encode = time.perf_counter() - t0
    console.print(f"[bold]encode[/] {len(coll.texts())} captions in {t_encode:.1f}s (cache: {store.root})")

    index = build_index(task.gallery.shape[1], "Exact")
    index.add(task.gallery, task.gallery_ids)
    examples = []
    scores, labels = index.search(task.queries[:3], 3)
    for qi in range(len(labels)):
        console.print(f"\n[bold]query[/] {task.query_texts[qi]!r}")
        hits = []
        for rank, (s, j) in enumerate(zip(scores[qi], labels[qi]), 1):
            mark = "✓" if j == task.qrels.indices[qi] else " "
            console.print(f"  {rank}. {mark} {s:.3f}  {coll.captions[j][1]}")
            hits.append({"rank": rank, "id": index.ids[j], "score": float(s), "caption": coll.captions[j][1]})
        examples.append({"query": task.query_texts[qi], "hits": hits})

    t0 = time.perf_counter()
    metrics = evaluate(task)
    t_eval = time.perf_counter() - t0
    from qshift.cli import metrics_table

    console.print()
    console.print(metrics_table({"t2t": metrics}, f"{coll.name} · {encoder.spec} · zero-shot"))
    report = {"collection": coll.name, "source": str(path), "encoder": encoder.fingerprint(),
              "direction": "t2t", "metrics": metrics, "seconds": {"encode": t_encode, "eval": t_eval},
              "examples": examples}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "report.json", report)
    cols = ["R@1", "R@5", "R@10", "MRR", "mAP@10", "nDCG@10", "MedR"]
    md = [f"# qshift demo: {coll.name}", "", f"Encoder `{encoder.spec}`; caption 0 of each image queries the",
          "mean of captions 1–4 of every image (T2T).", "",
          "| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols),
          "| " + " | ".join(f"{metrics[c]:.2f}" for c in cols) + " |", ""]
    write_text(out_dir / "report.md", "\n".join(md))
    console.print(f"report → {out_dir / 'report.md'}")
    return report
