"""Service settings: what is served, the query pipeline, limits and safety switches."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from qshift.errors import InputError


@dataclass
class Limits:
    max_body_bytes: int = 20 * 2**20      # a request body (JSON or upload)
    max_image_pixels: int = 4096 * 4096   # width × height of an uploaded image
    max_text_chars: int = 2000            # a text query
    max_k: int = 1000                     # results per query
    max_batch_queries: int = 256          # queries in one /search/batch call
    overfetch: int = 4                    # filtered search fetches k × this, then more if too few survive

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise InputError(f"service limit {name} must be a positive integer, got {value!r}")


@dataclass
class ServiceConfig:
    """``galleries``: name → an index directory or a collection spec. ``pipeline``: the
    stage list every request runs (a request may switch its refine / adapt / transform
    stages off, or on again). ``token``: bearer token required on the API (also from
    ``$QSHIFT_API_TOKEN``). CORS and ``image_url`` fetching are off unless set."""

    galleries: dict[str, str]
    encoder: str
    pipeline: Any = None
    limits: Limits = field(default_factory=Limits)
    token: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    allow_image_url: bool = False
    max_batch: int = 64
    window_ms: float = 3.0
    state_dir: str | None = None
    store: str | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.galleries:
            raise InputError("serve: give at least one index or collection to serve")
        for name in self.galleries:
            if not name or not all(c.isalnum() or c in "-_." for c in name):
                raise InputError(f"serve: gallery name {name!r} must be letters, digits, '-', '_' or '.'")
        if self.token is None:
            self.token = os.environ.get("QSHIFT_API_TOKEN") or None
        if self.max_batch < 1 or self.window_ms < 0:
            raise InputError(f"serve: max_batch >= 1 and window_ms >= 0 needed, got {self.max_batch}, "
                             f"{self.window_ms}")
