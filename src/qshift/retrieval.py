"""Retrieval tasks (query set + gallery + ground truth) and their evaluation.

Directions:

- ``t2i``: every caption queries the images; its positive is its own image.
- ``i2t``: every image queries all captions; its positives are its captions.
- ``t2t``: caption ``query_caption`` of each item queries a text gallery in which each
  item is the normalised mean of its other captions (a text-only stand-in for T2I,
  used with real COCO captions when no images are at hand).

Items whose image could not be read (skipped by the store) leave the task: as gallery
items in ``t2i``, as queries in ``i2t``; the count is recorded in ``task.meta``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from qshift.data.collection import Collection
from qshift.directions import check_direction
from qshift.encoders.base import IMAGE, TEXT, Encoder
from qshift.errors import InputError
from qshift.index import DEFAULT_FACTORY, as_queries, build_index
from qshift.metrics import Qrels, retrieval_metrics, top_k_and_ranks
from qshift.store import EmbeddingStore, Embeddings



@dataclass
class RetrievalTask:
    direction: str
    queries: np.ndarray
    gallery: np.ndarray
    qrels: Qrels
    query_ids: list[str]
    gallery_ids: list[str]
    query_texts: list[str] | None = None
    meta: dict = field(default_factory=dict)
    raw: list | None = None          # the raw queries in task order: texts, or image paths


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32)."""
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def text_to_text_task(collection: Collection, text: Embeddings, query_caption: int = 0) -> RetrievalTask:
    counts = np.array([len(c) for c in collection.captions])
    if (counts < 2).any():
        raise InputError(f"{collection.name}: t2t needs >= 2 captions per item; "
                         f"item {collection.ids[int(np.argmax(counts < 2))]!r} has fewer")
    if not 0 <= query_caption < counts.min():
        raise InputError(f"query_caption {query_caption} out of range for {counts.min()} captions per item")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    q_rows = starts + query_caption
    sums = np.add.reduceat(text.vectors, starts, axis=0) - text.vectors[q_rows]
    gallery = normalize_rows(sums / (counts - 1)[:, None])
    texts = collection.texts()
    queries = [texts[i] for i in q_rows]
    return RetrievalTask("t2t", text.vectors[q_rows], gallery, Qrels.from_labels(np.arange(len(collection))),
                         [text.ids[i] for i in q_rows], list(collection.ids), queries,
                         {"query_items": np.arange(len(collection))}, raw=queries)


def cross_modal_task(collection: Collection, text: Embeddings, image: Embeddings, direction: str) -> RetrievalTask:
    valid = image.valid
    kept_items = np.flatnonzero(valid)
    item_of_caption = collection.caption_item()
    if direction == "t2i":
        new_pos = -np.ones(len(collection), dtype=np.int64)
        new_pos[kept_items] = np.arange(len(kept_items))
        keep_q = valid[item_of_caption]
        texts = [t for t, k in zip(collection.texts(), keep_q) if k]
        return RetrievalTask("t2i", text.vectors[keep_q], image.vectors[kept_items],
                             Qrels.from_labels(new_pos[item_of_caption[keep_q]]),
                             [i for i, k in zip(text.ids, keep_q) if k], [image.ids[i] for i in kept_items],
                             texts, {"dropped_queries": int((~keep_q).sum()), "query_items": item_of_caption[keep_q]},
                             raw=texts)
    caps = collection.item_captions()
    return RetrievalTask("i2t", image.vectors[kept_items], text.vectors,
                         Qrels.from_lists([caps[i] for i in kept_items]),
                         [image.ids[i] for i in kept_items], list(text.ids), None,
                         {"dropped_queries": int((~valid).sum()), "query_items": kept_items},
                         raw=[str(collection.image_paths[i]) for i in kept_items])


def protocol_task(collection: Collection, encoder: Encoder, direction: str, store: EmbeddingStore,
                  progress: bool = True) -> RetrievalTask:
    """The task of a World-ILIAS (i2i: renderings of one instance are each other's
    positives) or World-INQUIRE (t2i: template queries with their relevant images)
    collection (:mod:`qshift.world.protocols`)."""
    from qshift.world.protocols import DIRECTION, checked_protocol

    p = checked_protocol(collection)
    expected = DIRECTION[p["kind"]]
    if direction != expected:
        raise InputError(f"{collection.name}: a world-{p['kind']} collection is searched {expected}, not {direction}")
    image = store.encode(encoder, collection, IMAGE, progress=progress)
    if p["kind"] == "ilias":
        role, inst = np.asarray(p["role"]), np.asarray(p["instance"])
        if len(role) != len(collection):
            raise InputError(f"{collection.source}: protocol lists {len(role)} images, the collection has "
                             f"{len(collection)} (renderings from another world seed or build?)")
        q, gal = np.flatnonzero(role == "query"), np.flatnonzero(role == "gallery")
        pos = {k: np.flatnonzero(inst[gal] == k) for k in set(inst[q].tolist())}
        empty = [int(inst[i]) for i in q if len(pos[int(inst[i])]) == 0]
        if empty:
            raise InputError(f"{collection.source}: instances {empty[:5]} have a single rendering (no positive)")
        return RetrievalTask("i2i", image.vectors[q], image.vectors[gal], Qrels.from_lists([pos[int(inst[i])] for i in q]),
                             [collection.ids[i] for i in q], [collection.ids[i] for i in gal], None,
                             {"query_items": None, "instances": inst[q].tolist()},
                             raw=[str(collection.image_paths[i]) for i in q])
    queries = p["queries"]
    bad = [qq["text"] for qq in queries if not qq["positives"]]
    if bad:
        raise InputError(f"{collection.source}: queries {bad[:3]} have no relevant image")
    texts = [qq["text"] for qq in queries]
    qcoll = Collection(f"{collection.name}-queries", [f"q{i}" for i in range(len(texts))], [[t] for t in texts])
    temb = store.encode(encoder, qcoll, TEXT, progress=progress)
    return RetrievalTask("t2i", temb.vectors, image.vectors, Qrels.from_lists([qq["positives"] for qq in queries]),
                         qcoll.ids, list(collection.ids), texts,
                         {"query_items": None, "templates": [qq["template"] for qq in queries]}, raw=texts)


def build_task(collection: Collection, encoder: Encoder, direction: str, store: EmbeddingStore, *,
               progress: bool = True, on_error: str = "raise", query_caption: int = 0) -> RetrievalTask:
    """Encode what ``direction`` needs (through the cache) and assemble the task."""
    check_direction(direction)
    if "protocol" in collection.meta:
        return protocol_task(collection, encoder, direction, store, progress)
    if direction == "i2i":
        raise InputError(f"{collection.name}: i2i tasks need instance labels (which images show the same thing), "
                         "as world-ilias:SPLIT collections have; a caption collection has none")
    text = store.encode(encoder, collection, TEXT, progress=progress)
    if direction == "t2t":
        return text_to_text_task(collection, text, query_caption)
    image = store.encode(encoder, collection, IMAGE, progress=progress, on_error=on_error)
    return cross_modal_task(collection, text, image, direction)


def exact_ranking(queries: np.ndarray, gallery: np.ndarray, qrels: Qrels, k: int,
                  block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """One float32 scoring pass giving each query's top-k labels (best first, ties by
    lower index, as every qshift index orders them) and the exact 0-based rank of its
    best positive (blocked over queries)."""
    labels = np.empty((len(queries), k), dtype=np.int64)
    ranks = np.empty(len(queries), dtype=np.int64)
    for s in range(0, len(queries), block):
        labels[s:s + block], ranks[s:s + block] = top_k_and_ranks(queries[s:s + block] @ gallery.T,
                                                                  qrels[s:s + block], k)
    return labels, ranks


def evaluate(task: RetrievalTask, ks: Sequence[int] = (1, 5, 10), k_map: int = 10,
             factory: str = DEFAULT_FACTORY, queries: np.ndarray | None = None) -> dict[str, float]:
    """Metrics of ``task`` (optionally with replaced query embeddings, e.g. adapted ones).

    With a float32 exact factory (``Exact``/``Flat``) one scoring pass gives the top-k and
    the full ranks (so MedR too); other factories rank through their own index.
    """
    q = as_queries(task.queries if queries is None else queries, task.gallery.shape[1])
    k = min(max(max(ks), k_map), len(task.gallery))
    if factory.strip().lower() in ("exact", "flat", "exact,fp32", "exact,float32"):
        labels, ranks = exact_ranking(q, task.gallery, task.qrels, k)
    else:
        index = build_index(task.gallery.shape[1], factory)
        index.add(task.gallery)
        labels, ranks = index.search(q, k)[1], None
    out = retrieval_metrics(labels, task.qrels, [x for x in ks if x <= k] if ranks is None else ks,
                            k_map=min(k_map, k), full_ranks=ranks)
    out["queries"] = float(len(q))
    out["gallery"] = float(len(task.gallery))
    return out
