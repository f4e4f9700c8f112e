"""Image–caption collections and their multi-positive ground truth.

A collection is a list of items (usually images), each with an id, an optional image
path and one or more captions. Loaders cover the common layouts:

- Karpathy-split JSON (``dataset_coco.json``/``dataset_flickr30k.json``), one split;
- COCO-style captions JSON (``images`` + ``annotations``);
- ``image,caption`` CSV (one row per caption, rows grouped by image) or JSONL
  (``{"image": ..., "caption": str | [str, ...]}`` per line);
- an image folder with a captions file beside it (``captions.csv``/``.jsonl``);
- line-per-caption text with k consecutive captions per item (``coco-5k-test`` layout).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qshift.errors import InputError
from qshift.io import read_json, stable_hash

@dataclass
class Collection:
    """Items with captions; ``image_paths`` is ``None`` for caption-only collections."""

    name: str
    ids: list[str]
    captions: list[list[str]]
    image_paths: list[Path] | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.captions):
            raise InputError(f"{self.name}: {len(self.ids)} ids but {len(self.captions)} caption lists")
        if self.image_paths is not None and len(self.image_paths) != len(self.ids):
            raise InputError(f"{self.name}: {len(self.ids)} ids but {len(self.image_paths)} image paths")
        seen: dict[str, int] = {}
        for i, item in enumerate(self.ids):
            if item in seen:
                raise InputError(f"{self.source or self.name}: duplicate item id {item!r} "
                                 f"(items #{seen[item]} and #{i})")
            seen[item] = i
        for i, caps in enumerate(self.captions):
            if not caps:
                raise InputError(f"{self.source or self.name}: item {self.ids[i]!r} has no caption")
            for j, c in enumerate(caps):
                if not isinstance(c, str) or not c.strip():
                    raise InputError(f"{self.source or self.name}: item {self.ids[i]!r} caption #{j} "
                                     "is empty or whitespace")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_images(self) -> bool:
        return self.image_paths is not None

    # -- flattened captions -------------------------------------------------------------
    def texts(self) -> list[str]:
        return [c for caps in self.captions for c in caps]

    def text_ids(self) -> list[str]:
        return [f"{item}#{j}" for item, caps in zip(self.ids, self.captions) for j in range(len(caps))]

    def caption_item(self) -> np.ndarray:
        """For every flattened caption, the index of its item (T2I ground truth)."""
        return np.repeat(np.arange(len(self.ids)), [len(c) for c in self.captions])

    def item_captions(self) -> list[np.ndarray]:
        """For every item, the indices of its flattened captions (I2T ground truth)."""
        bounds = np.concatenate([[0], np.cumsum([len(c) for c in self.captions])])
        return [np.arange(bounds[i], bounds[i + 1]) for i in range(len(self.ids))]

    def subset(self, n: int) -> "Collection":
        """The first ``n`` items (for quick runs)."""
        return Collection(f"{self.name}[:{n}]", self.ids[:n], self.captions[:n],
                          None if self.image_paths is None else self.image_paths[:n], self.source, self.meta)

    def key(self) -> str:
        """Content hash of ids and captions (image contents are hashed by the store)."""
        return stable_hash([self.ids, self.captions, [str(p) for p in self.image_paths or []]])


def _group_rows(rows: list[tuple[str, str]], where: str) -> tuple[list[str], list[list[str]]]:
    ids: list[str] = []
    caps: dict[str, list[str]] = {}
    for line, (image, caption) in enumerate(rows, start=2):
        if not image:
            raise InputError(f"{where}: row {line} has no image name")
        if not isinstance(caption, str) or not caption.strip():
            raise InputError(f"{where}: row {line} ({image}) has an empty caption")
        if image not in caps:
            ids.append(image)
            caps[image] = []
        caps[image].append(caption.strip())
    return ids, [caps[i] for i in ids]


def load_csv(path: str | Path, image_root: str | Path | None = None, name: str | None = None) -> Collection:
    """``image,caption`` rows with a header; several rows per image give several captions."""
    path = Path(path)
    _require_file(path)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
            raise InputError(f"{path}: expected a header with columns 'image,caption', got {reader.fieldnames}")
        rows = [(r["image"] or "", r["caption"] or "") for r in reader]
    ids, caps = _group_rows(rows, str(path))
    return _finish(name or path.parent.name, ids, caps, image_root, str(path))


def load_jsonl(path: str | Path, image_root: str | Path | None = None, name: str | None = None) -> Collection:
    """One JSON object per line: ``{"image": ..., "caption": str}`` or ``"captions": [...]``."""
    path = Path(path)
    _require_file(path)
    rows: list[tuple[str, str]] = []
    for n, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: line {n} is not valid JSON ({exc})") from exc
        image = str(obj.get("image") or obj.get("id") or "")
        captions = obj.get("captions", obj.get("caption"))
        for c in ([captions] if isinstance(captions, str) else captions or [""]):
            rows.append((image, c))
    ids, caps = _group_rows(rows, str(path))
    return _finish(name or path.parent.name, ids, caps, image_root, str(path))


def load_lines(path: str | Path, captions_per_item: int = 5, name: str | None = None) -> Collection:
    """One caption per line, ``captions_per_item`` consecutive lines per item (no images)."""
    path = Path(path)
    _require_file(path)
    lines = path.read_text("utf-8").splitlines()
    k = captions_per_item
    if k < 1:
        raise InputError(f"captions_per_item must be >= 1, got {k}")
    if not lines or len(lines) % k:
        raise InputError(f"{path}: {len(lines)} lines is not a multiple of {k} captions per item")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            raise InputError(f"{path}: line {n} is an empty caption")
    caps = [[c.strip() for c in lines[i:i + k]] for i in range(0, len(lines), k)]
    ids = [f"{i:06d}" for i in range(len(caps))]
    return Collection(name or path.parent.name, ids, caps, None, str(path))


def load_karpathy_json(path: str | Path, split: str = "test", image_root: str | Path | None = None,
                       name: str | None = None) -> Collection:
    """Karpathy-split JSON; ``image_root`` joined with each image's ``filepath/filename``."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or "images" not in data:
        raise InputError(f"{path}: not a Karpathy-split JSON (no 'images' list)")
    images = [im for im in data["images"] if split in ("all", im.get("split"))]
    if not images:
        splits = sorted({im.get("split") for im in data["images"]})
        raise InputError(f"{path}: no image in split {split!r} (splits present: {splits})")
    ids, caps, rel = [], [], []
    for im in images:
        ids.append(str(im.get("cocoid", im.get("imgid", im["filename"]))))
        caps.append([s["raw"].strip() for s in im.get("sentences", [])])
        rel.append(str(Path(im.get("filepath", "")) / im["filename"]))
    root = Path(image_root) if image_root else None
    paths = [root / r for r in rel] if root else None
    return Collection(name or f"{path.stem}-{split}", ids, caps, paths, str(path))


def load_coco_json(path: str | Path, image_root: str | Path | None = None, name: str | None = None) -> Collection:
    """COCO ``captions_*.json`` (``images`` + ``annotations``)."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise InputError(f"{path}: not a COCO captions JSON (needs 'images' and 'annotations')")
    files: dict[int, str] = {}
    for im in data["images"]:
        if im["id"] in files:
            raise InputError(f"{path}: duplicate image id {im['id']}")
        files[im["id"]] = im["file_name"]
    caps: dict[int, list[str]] = {i: [] for i in files}
    for ann in data["annotations"]:
        if ann["image_id"] not in caps:
            raise InputError(f"{path}: annotation {ann.get('id')} refers to unknown image {ann['image_id']}")
        caps[ann["image_id"]].append(ann["caption"].strip())
    order = [i for i in files if caps[i]]
    root = Path(image_root) if image_root else None
    return Collection(name or path.stem, [str(i) for i in order], [caps[i] for i in order],
                      [root / files[i] for i in order] if root else None, str(path))


def load_collection(path: str | Path, fmt: str = "auto", *, captions_per_item: int = 5,
                    image_root: str | Path | None = None, split: str = "test",
                    name: str | None = None) -> Collection:
    """Load a collection, guessing the format from the path when ``fmt='auto'``.

    A directory is read as ``captions.csv`` / ``captions.jsonl`` / ``captions.txt``
    inside it, with images in ``images/`` (or the directory itself). A CSV/JSONL file
    given without ``image_root`` whose first image exists beside it has its image names
    read relative to its folder. Options that do not apply to the format are ignored.
    """
    path = Path(path)
    formats = ("csv", "jsonl", "lines", "karpathy", "coco")
    if fmt != "auto" and fmt not in formats:
        raise InputError(f"unknown collection format {fmt!r}; known: auto, {', '.join(formats)}")
    if not path.exists():
        raise InputError(f"{path}: collection not found")
    if path.is_dir():
        name = name or path.name
        if image_root is None:
            image_root = path / "images" if (path / "images").is_dir() else path
        for fname in ("captions.csv", "captions.jsonl", "captions.txt"):
            if (path / fname).is_file():
                path = path / fname
                break
        else:
            raise InputError(f"{path}: directory has no captions.csv, captions.jsonl or captions.txt")
    if fmt == "auto":
        suffix = path.suffix.lower()
        by_suffix = {".csv": "csv", ".jsonl": "jsonl", ".txt": "lines"}
        if suffix == ".json":
            head = read_json(path)
            fmt = "coco" if isinstance(head, dict) and "annotations" in head else "karpathy"
        elif suffix in by_suffix:
            fmt = by_suffix[suffix]
        else:
            raise InputError(f"{path}: cannot tell the collection format from {suffix!r}; pass fmt=")
    if fmt == "lines":
        return load_lines(path, captions_per_item, name=name)
    if fmt == "karpathy":
        return load_karpathy_json(path, split, image_root, name=name)
    loader = {"csv": load_csv, "jsonl": load_jsonl, "coco": load_coco_json}[fmt]
    coll = loader(path, image_root, name=name)
    if image_root is None and fmt in ("csv", "jsonl") and coll.ids and (path.parent / coll.ids[0]).is_file():
        # image names relative to the captions file (e.g. a qshift world)
        coll = Collection(coll.name, coll.ids, coll.captions, [path.parent / i for i in coll.ids], coll.source)
    return coll


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise InputError(f"{path}: file not found")


def _finish(name: str, ids: list[str], caps: list[list[str]], image_root: str | Path | None,
            source: str) -> Collection:
    paths = None
    if image_root is not None:
        root = Path(image_root)
        if not root.is_dir():
            raise InputError(f"{root}: image folder not found (for {source})")
        paths = [root / i for i in ids]
    return Collection(name, ids, caps, paths, source)
