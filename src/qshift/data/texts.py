"""Texts named by a spec: a repair vocabulary, the source anchors of adaptation.

Both must come from data disjoint from the test queries (a train or val split, a user's
catalogue). Specs: a list of strings; a path or ``world:SPLIT`` / ``shared:REL/PATH``
collection (every caption); or a mapping ``{source: SPEC, items: "START:STOP",
captions: [j, …]}`` that keeps a slice of the items and some of their captions (e.g. the
COCO dev items that are not the val queries).
"""

from __future__ import annotations

from typing import Any

from qshift.errors import InputError


def spec_texts(spec: Any, what: str = "vocabulary") -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, (list, tuple)):
        if not all(isinstance(t, str) for t in spec):
            raise InputError(f"{what}: a list of texts must hold strings only")
        return list(spec)
    items, captions = None, None
    if isinstance(spec, dict):
        extra = sorted(set(spec) - {"source", "items", "captions"})
        if extra or "source" not in spec:
            raise InputError(f"{what}: a mapping takes 'source', 'items' and 'captions', got {sorted(spec)}")
        items, captions, spec = spec.get("items"), spec.get("captions"), spec["source"]
    if not isinstance(spec, str):
        raise InputError(f"{what}: expected texts, a collection or a mapping, got {spec!r}")
    if spec.startswith("world:") and spec.split(":", 1)[1].partition("-")[0] in ("train", "val", "test"):
        from qshift.world import world_captions  # the scene files: no images rendered for texts

        caps = world_captions(spec.split(":", 1)[1])
    else:
        from qshift.benchmark import resolve_collection

        caps = resolve_collection(spec)[1].captions
    if items is not None:
        try:
            start, _, stop = str(items).partition(":")
            caps = caps[slice(int(start) if start else None, int(stop) if stop else None)]
        except ValueError:
            raise InputError(f"{what}: items must be 'START:STOP', got {items!r}") from None
    if captions is not None:
        caps = [[c[j] for j in captions if j < len(c)] for c in caps]
    texts = [t for c in caps for t in c]
    if not texts:
        raise InputError(f"{what} {spec!r}: no texts")
    return texts
