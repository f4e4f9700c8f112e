"""qshift: image–text retrieval over frozen encoders that stays accurate under query shift.

The public names below load on first use (``import qshift`` stays light)::

    from qshift import Pipeline, create_encoder, load_index
    pipe = Pipeline.from_config([{"adapt": "rest"}], encoder=create_encoder("world:mini-clip"),
                                direction="t2i", index=load_index("runs/world-ix"))
    pipe.search(["a red circle left of a star"], k=5)
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("qshift")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

_WHERE = {
    "create_encoder": "qshift.encoders", "register_backend": "qshift.encoders",
    "load_collection": "qshift.data.collection", "Collection": "qshift.data.collection",
    "EmbeddingStore": "qshift.store",
    "build_index": "qshift.index", "load_index": "qshift.index", "ExactIndex": "qshift.index",
    "build_task": "qshift.retrieval", "evaluate": "qshift.retrieval",
    "Pipeline": "qshift.pipeline", "PipelineContext": "qshift.pipeline", "QueryBatch": "qshift.pipeline",
    "Stage": "qshift.pipeline", "register_stage": "qshift.pipeline", "list_stages": "qshift.pipeline",
    "register_method": "qshift.methods", "list_methods": "qshift.methods",
    "register_objective": "qshift.adapt", "create_adapter": "qshift.adapt",
    "QShiftError": "qshift.errors", "InputError": "qshift.errors",
}
__all__ = sorted(_WHERE) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'qshift' has no attribute {name!r}")
