"""Retrieval directions and the modality each side of them holds (the one map of it)."""

from __future__ import annotations

from qshift.errors import InputError

# direction: (query modality, gallery modality)
DIRECTIONS: dict[str, tuple[str, str]] = {
    "t2i": ("text", "image"),
    "i2t": ("image", "text"),
    "t2t": ("text", "text"),
    "i2i": ("image", "image"),
}


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise InputError(f"unknown direction {direction!r}; use one of {', '.join(DIRECTIONS)}")
    return direction


def query_modality(direction: str) -> str:
    return DIRECTIONS[check_direction(direction)][0]


def gallery_modality(direction: str) -> str:
    return DIRECTIONS[check_direction(direction)][1]


def direction_of(query: str, gallery: str) -> str:
    """The direction whose queries are ``query``s and whose gallery holds ``gallery``s."""
    for d, pair in DIRECTIONS.items():
        if pair == (query, gallery):
            return d
    raise InputError(f"no retrieval direction searches {gallery}s with {query} queries; "
                     f"known: {', '.join(f'{d} ({q}→{g})' for d, (q, g) in DIRECTIONS.items())}")
