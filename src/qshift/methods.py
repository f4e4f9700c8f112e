"""Retrieval methods behind one interface, so the benchmark runner, the CLI and the
service compose them without special cases.

A method gets a :class:`RunContext` — the encoder, the fixed gallery, the raw queries
in stream order, and a cached way to encode queries — and returns a score matrix
(queries × gallery, rows in the original query order). Zero-shot scores the frozen
encoder's embeddings; test-time adaptation (:mod:`qshift.adapt`) and QuARI
(:mod:`qshift.quari`) register themselves here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from qshift.errors import InputError


@dataclass
class RunContext:
    encoder: Any                      # an Encoder
    direction: str                    # t2i, i2t, t2t
    gallery: np.ndarray               # N × d, L2-normalised, fixed
    queries: Sequence[Any]            # raw queries: texts or images/paths, original order
    order: np.ndarray                 # stream order (a permutation of range(len(queries)))
    encode_queries: Callable[[], np.ndarray]  # frozen-encoder embeddings of ``queries`` (cached)
    batch_size: int = 64
    seed: int = 0
    source_texts: Sequence[str] | None = None  # clean paired texts of the gallery (source anchors)
    meta: dict = field(default_factory=dict)

    @property
    def query_modality(self) -> str:
        return "image" if self.direction == "i2t" else "text"


class Method(Protocol):
    name: str

    def run(self, ctx: RunContext) -> np.ndarray: ...


class ZeroShot:
    """The frozen encoder: score = cosine(query, gallery item)."""

    name = "zero-shot"

    def __init__(self, **params: Any) -> None:
        if params:
            raise InputError(f"zero-shot takes no parameters, got {sorted(params)}")

    def run(self, ctx: RunContext) -> np.ndarray:
        return ctx.encode_queries() @ ctx.gallery.T


METHODS: dict[str, Callable[..., Method]] = {"zero-shot": ZeroShot}


def register_method(name: str, factory: Callable[..., Method]) -> None:
    METHODS[name] = factory


def create_method(spec: str | dict) -> Method:
    """A method from ``"name"`` or ``{"name": ..., **params}``."""
    _load_plugins()
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, dict) and "name" in spec:
        params = dict(spec)
        name = params.pop("name")
        params.pop("label", None)  # a display name for reports, not a parameter
    else:
        raise InputError(f"a method is a name or a mapping with 'name', got {spec!r}")
    if name not in METHODS:
        import difflib

        close = difflib.get_close_matches(name, METHODS, n=3)
        raise InputError(f"unknown method {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                         + f"; known: {', '.join(sorted(METHODS))}")
    try:
        return METHODS[name](**params)
    except TypeError as exc:
        raise InputError(f"method {name!r}: {exc}") from None


def _load_plugins() -> None:
    """Import the modules that register further methods (if they exist yet)."""
    import importlib

    for mod in ("qshift.adapt", "qshift.quari"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
