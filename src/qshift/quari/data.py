"""Training pairs for QuARI and TA from a collection's stored embeddings.

* ``t2i``: every caption is a query; its target is its item's image.
* ``t2t``: the text stand-in for T2I used with real COCO captions (see
  :mod:`qshift.retrieval`): caption j of an item is a query and its target is the
  normalised mean of the item's other captions — one target per (item, j), so every
  caption trains and no target contains its own query.
* World-ILIAS (``i2i``, :func:`protocol_pairs`): every rendering of an instance is a
  target, and each of the instance's other renderings a query for it; targets are
  grouped by instance (one rendering per instance in a batch). The near-duplicate
  distractors are not used for training (reconstruction: the paper trains on generic
  image–text pairs, not on ILIAS itself; here the train split stands in for that data).
* World-INQUIRE (``t2i``): a query with many relevant images gives one target per
  (query, relevant image), at most ``max_positives`` of them (sampled, seeded), grouped by
  query, so a batch holds each query once with one of its relevant images.
* :func:`clause_collection`: a caption collection whose captions are split into clauses
  (each clause a query for its item's image) — short partial descriptions like INQUIRE's
  queries, from generic caption data.
* :func:`protocol_negatives`: a World-ILIAS training set's near-duplicates and
  distractors, the pool of QuARI's optional hard negatives.
"""

from __future__ import annotations

import re

import numpy as np

from qshift.data.collection import Collection
from qshift.encoders.base import IMAGE, TEXT, Encoder
from qshift.errors import InputError
from qshift.retrieval import normalize_rows
from qshift.store import EmbeddingStore

DIRECTIONS = ("t2i", "t2t")

# clause boundaries of English captions: list punctuation, conjunctions and spatial relations
_CONNECTIVE = (r"(?:and|with|among|beside|near|next to|(?:to the |on the )?(?:left|right) of|above|below|over|"
               r"under|beneath|behind|in front of|higher than)")
_CLAUSE_SPLIT = re.compile(rf"\s*[,;:]\s*(?:{_CONNECTIVE}\s+)?|\s+{_CONNECTIVE}\s+")
_OPENER = re.compile(r"^(?:a (?:picture|photo|drawing|image) of|an image of|there (?:is|are)|a scene with|"
                     r"this shows|we see|just)\s+")


def training_pairs(collection: Collection, encoder: Encoder, direction: str, store: EmbeddingStore,
                   progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(queries Q × E, targets T × E, target_of Q) from the store (encoding what is missing)."""
    if "protocol" in collection.meta:
        raise InputError(f"{collection.name}: a world-ilias / world-inquire set trains from its protocol; use "
                         "protocol_pairs")
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


def pairs_and_groups(collection: Collection, encoder: Encoder, direction: str, store: EmbeddingStore,
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(queries, targets, target_of, groups) of any training collection: a protocol set's
    pairs (its own direction), or a caption collection's ``direction`` pairs."""
    if "protocol" in collection.meta:
        from qshift.world.protocols import DIRECTION

        expected = DIRECTION.get(collection.meta["protocol"].get("kind"))
        if direction != expected:
            raise InputError(f"{collection.name}: a world-{collection.meta['protocol'].get('kind')} set trains "
                             f"{expected}, not {direction}")
        return protocol_pairs(collection, encoder, store, progress=progress)
    return (*training_pairs(collection, encoder, direction, store, progress), target_groups(collection, direction))


def caption_clauses(caption: str, min_words: int = 2) -> list[str]:
    """The clauses of one caption ("a red star left of a blue circle, and two squares" →
    ["a red star", "a blue circle", "two squares"]), lower-cased, openers ("a picture of")
    dropped, clauses shorter than ``min_words`` words left out; distinct, in order."""
    out: list[str] = []
    for part in _CLAUSE_SPLIT.split(caption.strip().rstrip(".").lower()):
        part = _OPENER.sub("", part.strip())
        if len(part.split()) >= min_words and part not in out:
            out.append(part)
    return out


def clause_collection(collection: Collection, *, keep_captions: bool = True, min_words: int = 2) -> Collection:
    """``collection`` with every caption split into its clauses (:func:`caption_clauses`),
    each clause a caption of the same item, so that ``t2i`` pairs train a partial
    description against its image.

    Reconstruction (the QuARI paper trains on whole captions of generic caption data; its
    INQUIRE queries name one or two attributes): a model trained on whole captions sees no
    query as short as INQUIRE's, so this option derives short queries from the same
    captions — no template, no query of the test set. A clause describes only part of its
    image, so other images may match it too (false negatives in the batch); ``keep_captions``
    keeps the whole captions beside their clauses. Captions of a single clause add nothing.
    """
    caps: list[list[str]] = []
    for item_caps in collection.captions:
        clauses = [c for cap in item_caps for c in caption_clauses(cap, min_words)]
        keep = list(item_caps) if keep_captions else []
        caps.append(list(dict.fromkeys(keep + clauses)) or list(item_caps))
    return Collection(f"{collection.name}-clauses", list(collection.ids), caps, collection.image_paths, "",
                      {k: v for k, v in collection.meta.items() if k != "protocol"})


def protocol_pairs(collection: Collection, encoder: Encoder, store: EmbeddingStore, *, max_positives: int = 64,
                   seed: int = 0, progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(queries, targets, target_of, groups) of a World-ILIAS or World-INQUIRE training set
    (a collection with ``meta['protocol']``, see :mod:`qshift.world.protocols`)."""
    from qshift.world.protocols import checked_protocol

    p = checked_protocol(collection)
    if max_positives < 1:
        raise InputError(f"quari: max_positives must be >= 1, got {max_positives}")
    image = store.encode(encoder, collection, IMAGE, progress=progress)
    if p["kind"] == "ilias":
        inst = np.asarray(p["instance"])
        rows = np.flatnonzero(inst >= 0)
        rows = rows[np.argsort(inst[rows], kind="stable")]
        counts = np.bincount(inst[rows])
        if (counts[counts > 0] < 2).any():
            raise InputError(f"{collection.source}: an instance has a single rendering (no positive)")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        q_rows, target_of = [], []
        for t, r in enumerate(rows):                                  # target t = rendering r
            k = inst[r]
            same = rows[starts[k]:starts[k] + counts[k]]
            q_rows.extend(same[same != r])
            target_of.extend([t] * (len(same) - 1))
        return (image.vectors[np.asarray(q_rows)], image.vectors[rows], np.asarray(target_of, dtype=np.int64),
                inst[rows].astype(np.int64))
    queries = p["queries"]
    if not queries or any(not q["positives"] for q in queries):
        raise InputError(f"{collection.source}: every query needs at least one relevant image")
    qcoll = Collection(f"{collection.name}-queries", [f"q{i}" for i in range(len(queries))],
                       [[q["text"]] for q in queries])
    text = store.encode(encoder, qcoll, TEXT, progress=progress)
    rng = np.random.default_rng(seed)
    tgt_rows, groups = [], []
    for i, q in enumerate(queries):
        pos = np.asarray(q["positives"], dtype=np.int64)
        if len(pos) > max_positives:
            pos = np.sort(rng.choice(pos, max_positives, replace=False))
        tgt_rows.extend(pos)
        groups.extend([i] * len(pos))
    groups = np.asarray(groups, dtype=np.int64)
    # one query row per target (the same text vector repeated), so target_of is the identity
    return (text.vectors[groups], image.vectors[np.asarray(tgt_rows)], np.arange(len(groups), dtype=np.int64),
            groups)


def protocol_negatives(collection: Collection, encoder: Encoder, store: EmbeddingStore, *,
                       progress: bool = True) -> np.ndarray | None:
    """The image vectors of a World-ILIAS training set's rows that belong to no instance (its
    near-duplicates and distractors); None for other sets, whose non-relevant images depend
    on the query."""
    from qshift.world.protocols import checked_protocol

    p = checked_protocol(collection)
    if p["kind"] != "ilias":
        return None
    image = store.encode(encoder, collection, IMAGE, progress=progress)
    return image.vectors[np.flatnonzero(np.asarray(p["instance"]) < 0)]
