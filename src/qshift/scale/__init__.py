"""Scale-out on Ray: distributed encoding into the embedding store (:mod:`.encode`) and
sharded search behind the Index protocol (:mod:`.search`); :mod:`.cluster` starts a
local Ray instance or joins a cluster. Ray is imported only when used."""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {"connect": "cluster", "require_ray": "cluster", "ray_runner": "encode", "ShardEncoder": "encode",
          "ShardedIndex": "search", "ShardActor": "search"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"qshift.scale.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'qshift.scale' has no attribute {name!r}")
