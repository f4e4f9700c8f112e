"""Shifted query sets written next to a collection (``qshift corrupt``).

A text shift writes ``<stem>.<corruption>-s<severity>-seed<seed>.csv`` beside the
collection (same images, corrupted captions); an image shift writes the corrupted
images under ``shifts/<that name>/`` and a CSV pointing at them (same captions). A JSON
manifest beside each CSV records corruption, severity, seed, generator, the source
collection and its content key, and what happened (unchanged/empty/redrawn counts).
Files are written atomically; an interrupted image shift renders only what is missing.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from qshift.data.collection import Collection
from qshift.data.corruptions import modality_of
from qshift.data.images import load_image
from qshift.errors import InputError
from qshift.io import write_json, write_text
from qshift.progress import progress_bar


@dataclass
class ShiftSpec:
    corruption: str
    severity: int
    seed: int = 0
    min_similarity: float | None = None
    generator: str = "rule"

    def tag(self) -> str:
        return f"{self.corruption}-s{self.severity}-seed{self.seed}"


def _base(collection_path: Path) -> tuple[Path, str]:
    return (collection_path, collection_path.name) if collection_path.is_dir() else \
        (collection_path.parent, collection_path.stem)


def _csv(rows: list[tuple[str, str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "caption"])
    w.writerows(rows)
    return buf.getvalue()


def write_shift(collection_path: Path, coll: Collection, spec: ShiftSpec, *, encoder=None,  # noqa: ANN001
                progress: bool = True) -> Path:
    """Write one shifted query set; returns the path of its CSV."""
    modality = modality_of(spec.corruption)
    base, stem = _base(Path(collection_path))
    out_csv = base / f"{stem}.{spec.tag()}.csv"
    manifest = {"corruption": spec.corruption, "severity": spec.severity, "seed": spec.seed,
                "modality": modality, "source": str(collection_path), "source_key": coll.key(),
                "items": len(coll), "captions": len(coll.texts())}
    if modality == "text":
        from qshift.data.corruptions.text import corrupt_texts

        res = corrupt_texts(coll.texts(), spec.corruption, spec.severity, spec.seed,
                            min_similarity=spec.min_similarity, encoder=encoder, generator=spec.generator)
        it = iter(res.texts)
        rows = [(i, next(it)) for i, caps in zip(coll.ids, coll.captions) for _ in caps]
        manifest.update(generator=res.generator, stats=res.stats, min_similarity=spec.min_similarity)
    else:
        if not coll.has_images:
            raise InputError(f"{collection_path}: image corruption {spec.corruption!r} needs a collection "
                             "with images")
        from qshift.data.corruptions.image import corrupt_image

        folder = Path("shifts") / f"{stem}.{spec.tag()}"
        rows, done = [], 0
        with progress_bar(f"corrupt {spec.tag()}", len(coll), progress) as bar:
            for k, (item, path, caps) in enumerate(zip(coll.ids, coll.image_paths or [], coll.captions)):
                rel = folder / Path(*[p for p in Path(item).with_suffix(".png").parts if p not in ("..", "/")])
                target = base / rel
                if not target.is_file():
                    img = corrupt_image(load_image(path), spec.corruption, spec.severity, spec.seed, k)
                    buf = io.BytesIO()
                    img.save(buf, format="PNG")
                    from qshift.io import write_bytes

                    write_bytes(target, buf.getvalue())
                    done += 1
                rows += [(str(rel), c) for c in caps]
                bar.advance(1)
        manifest.update(generator="imagecorruptions", stats={"rendered": done})
    write_text(out_csv, _csv(rows))
    write_json(out_csv.with_suffix(".json"), manifest)
    return out_csv
