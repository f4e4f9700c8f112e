"""Where qshift finds shared data and keeps its cache."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS = PACKAGE_DIR / "assets"


def cache_dir() -> Path:
    """``$QSHIFT_CACHE`` or ``~/.cache/qshift``."""
    return Path(os.environ.get("QSHIFT_CACHE", Path.home() / ".cache" / "qshift"))


def shared_data_dir() -> Path | None:
    """``$QSHIFT_SHARED_DATA``, else a ``../shared/data`` beside the working directory or
    the source checkout; ``None`` when there is none (e.g. on a user's machine)."""
    env = os.environ.get("QSHIFT_SHARED_DATA")
    if env:
        return Path(env) if Path(env).is_dir() else None
    candidates = [Path.cwd() / ".." / "shared" / "data"]
    candidates += [p / ".." / "shared" / "data" for p in PACKAGE_DIR.parents]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    return None
