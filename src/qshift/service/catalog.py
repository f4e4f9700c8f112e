"""What the service searches: named galleries with their index, vectors and item metadata.

A gallery comes from an index directory (``qshift index``) or from a collection spec
(``world:test``, a path, ``shared:…``), which is encoded through the embedding store and
indexed exactly at start-up. Collections also give each item's metadata (captions, image
file, extra columns) and thumbnails; the service only ever opens the image files of its
own galleries, never a path a client sends.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qshift.errors import InputError


@dataclass
class Gallery:
    name: str
    index: Any
    modality: str                     # what the gallery holds: image or text
    items: list[dict] = field(default_factory=list)   # per gallery position: id + metadata
    image_paths: list[Path] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if not self.items:
            self.items = [{"id": i} for i in self.index.ids]
        self.position = {str(it["id"]): j for j, it in enumerate(self.items)}
        self.fields = sorted({k for it in self.items for k in it})

    def __len__(self) -> int:
        return len(self.index)

    def vectors(self) -> np.ndarray:
        from qshift.index import index_vectors

        if not hasattr(self, "_vectors"):
            self._vectors = index_vectors(self.index)
        return self._vectors

    def item(self, item_id: str) -> tuple[int, dict]:
        if item_id not in self.position:
            raise KeyError(item_id)
        j = self.position[item_id]
        return j, self.items[j]

    def thumbnail(self, item_id: str, side: int = 160) -> bytes:
        j, _ = self.item(item_id)
        if self.image_paths is None:
            raise InputError(f"gallery {self.name!r} holds no images")
        from PIL import Image

        with Image.open(self.image_paths[j]) as im:
            im = im.convert("RGB")
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
        return buf.getvalue()


def _folder(path: Path, root: Path | None) -> str:
    """The image's folder, relative to the collection file when it lies below it."""
    try:
        return str(path.parent.resolve().relative_to(root.resolve())) if root else path.parent.name
    except ValueError:
        return path.parent.name


def open_gallery(name: str, spec: str, encoder: Any, store: Any, modality: str | None = None,
                 progress: bool = False) -> Gallery:
    """A gallery from an index directory or a collection spec (encoded and indexed)."""
    path = Path(spec)
    if (path / "index.json").is_file():
        from qshift.index import load_index

        idx = load_index(path)
        idx.check_fingerprint(encoder.fingerprint())
        return Gallery(name, idx, idx.meta.get("modality") or "image", source=str(path))
    from qshift.benchmark import resolve_collection
    from qshift.index import ExactIndex

    _, coll = resolve_collection(spec)
    modality = modality or ("image" if coll.has_images else "text")
    emb = store.encode(encoder, coll, modality, progress=progress, on_error="skip")
    keep = np.flatnonzero(emb.valid)
    idx = ExactIndex(emb.dim)
    idx.add(emb.vectors[keep], [emb.ids[i] for i in keep])
    idx.meta = {"fingerprint": emb.fingerprint, "modality": modality, "entry": str(emb.path)}
    if modality == "image":
        root = Path(coll.source).parent if coll.source else None
        items = [{"id": coll.ids[i], "captions": list(coll.captions[i]), "image": Path(coll.image_paths[i]).name,
                  "folder": _folder(Path(coll.image_paths[i]), root)} for i in keep]
        paths = [Path(coll.image_paths[i]) for i in keep]
    else:
        item_of = coll.caption_item()
        texts = coll.texts()
        items = [{"id": emb.ids[i], "text": texts[i], "item": coll.ids[item_of[i]]} for i in keep]
        paths = None
    return Gallery(name, idx, modality, items, paths, source=spec)
