"""What a pipeline is bound to: the encoder, the direction and the fixed gallery."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from qshift.directions import check_direction, gallery_modality, query_modality
from qshift.errors import InputError


@dataclass
class PipelineContext:
    """The encoder, the direction and the gallery — as embeddings (``gallery``, N × d,
    L2-normalised), as an index (``index``, any qshift index), or both.

    Stages ask for what they need: ranking uses the index (an exact one is built over
    ``gallery`` when none is given); adaptation and transforms need the vectors, which
    come from ``gallery`` or, lazily, from the index (:func:`qshift.index.index_vectors`).
    ``source_texts`` are clean texts *disjoint from the queries* that some adaptation
    objectives use as source anchors; ``seed`` and ``batch_size`` are the stream's.
    """

    encoder: Any
    direction: str
    gallery: np.ndarray | None = None
    index: Any = None
    gallery_ids: Sequence[str] | None = None
    batch_size: int = 64
    seed: int = 0
    source_texts: Sequence[str] | None = None
    progress: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_direction(self.direction)
        if self.gallery is None and self.index is None:
            raise InputError("pipeline: give the gallery embeddings or an index over them")
        if self.gallery is not None:
            from qshift.store import check_embeddings

            self.gallery = check_embeddings(self.gallery, what="pipeline gallery")
            if len(self.gallery) == 0:
                raise InputError("pipeline: the gallery is empty")
        if self.batch_size < 1:
            raise InputError(f"pipeline: batch_size must be >= 1, got {self.batch_size}")

    @property
    def query_modality(self) -> str:
        return query_modality(self.direction)

    @property
    def gallery_modality(self) -> str:
        return gallery_modality(self.direction)

    def gallery_vectors(self) -> np.ndarray:
        """N × d float32 gallery embeddings (read from the index on first use)."""
        if self.gallery is None:
            from qshift.index import index_vectors

            self.gallery = index_vectors(self.index)
        return self.gallery

    def get_index(self) -> Any:
        """The index to rank with (an exact one over ``gallery`` unless given)."""
        if self.index is None:
            from qshift.index import ExactIndex

            idx = ExactIndex(self.gallery.shape[1])
            idx.add(self.gallery, self.gallery_ids)
            self.index = idx
        return self.index

    def __len__(self) -> int:
        return len(self.gallery) if self.gallery is not None else len(self.index)

    @property
    def ids(self) -> list[str]:
        if self.index is not None:
            return list(self.index.ids)
        return [str(i) for i in (self.gallery_ids if self.gallery_ids is not None else range(len(self)))]
