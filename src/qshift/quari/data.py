"""Training pairs for QuARI and TA from a collection's stored embeddings.

* ``t2i``: every caption is a query; its target is its item's image.
* ``t2t``: the text stand-in for T2I used with real COCO captions (see
  :mod:`qshift.retrieval`): caption j of an item is a query and its target is the
  normalised mean of the item's other captions — one target per (item, j), so every
  caption trains and no target contains its own query.
"""

from __future__ import annotations

import numpy as np

from qshift.data.collection import Collection
from qshift.encoders.base import IMAGE, TEXT, Encoder
from qshift.errors import InputError
from qshift.retrieval import normalize_rows
from qshift.store import EmbeddingStore

DIRECTIONS = ("t2i", "t2t")


def training_pairs(collection: Collection, encoder: Encoder, direction: str, store: EmbeddingStore,
                   progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(queries Q × E, targets T × E, target_of Q) from the store (encoding what is missing)."""
    if direction not in DIRECTIONS:
        raise InputError(f"quari: direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    text = store.encode(encoder, collection, TEXT, progress=progress)
    item = collection.caption_item()
    if direction == "t2i":
        image = store.encode(encoder, collection, IMAGE, progress=progress, on_error="skip")
        keep = image.valid[item]
        new = -np.ones(len(collection), dtype=np.int64)
        new[image.valid] = np.arange(int(image.valid.sum()))
        return text.vectors[keep], image.vectors[image.valid], new[item[keep]]
    counts = np.array([len(c) for c in collection.captions])
    if (counts < 2).any():
        raise InputError(f"{collection.name}: t2t pairs need >= 2 captions per item")
    sums = np.add.reduceat(text.vectors, np.concatenate([[0], np.cumsum(counts)[:-1]]), axis=0)
    targets = normalize_rows((sums[item] - text.vectors) / (counts[item] - 1)[:, None])
    return text.vectors, targets, np.arange(len(text.vectors))


def target_groups(collection: Collection, direction: str) -> np.ndarray | None:
    """The group of every training target: for ``t2t`` the item of each caption-target (an
    item's caption-means are near-copies of each other); ``t2i`` targets are distinct images."""
    if direction not in DIRECTIONS:
        raise InputError(f"quari: direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    return collection.caption_item() if direction == "t2t" else None
