"""QuARI: query-adaptive low-rank transforms (model, training, scoring, search).

Registered here: the transform stages ``quari`` (``checkpoint``, ``mode``: full | rerank,
``k``) and ``ta`` (the static task-adaptation baseline, ``checkpoint``) of
:mod:`qshift.quari.stage`, and the methods of the same names (encode + transform + rank).
Classes are imported lazily so that the CLI starts without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from qshift.methods import register_method
from qshift.pipeline.stage import register_stage
from qshift.registry import lazy_factory

_WHERE = {
    "QuARI": "model", "QuARIConfig": "model",
    "QuARITrainConfig": "train", "train_quari": "train", "train_ta": "train", "load_quari": "train",
    "quari_scores": "search", "quari_rerank": "search", "quari_search": "search", "save_ta": "search",
    "load_ta": "search", "QuARIStage": "stage", "TAStage": "stage",
    "lowrank_scores": "scoring", "materialized_scores": "scoring",
    "training_pairs": "data", "target_groups": "data", "pairs_and_groups": "data",
    "protocol_pairs": "data", "protocol_negatives": "data",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"qshift.quari.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'qshift.quari' has no attribute {name!r}")


for _name, _cls in (("quari", "QuARIStage"), ("ta", "TAStage")):
    register_stage("transform", _name)(lazy_factory("qshift.quari.stage", _cls, primary_option="checkpoint"))


@register_method("quari")
def quari_method(**params: Any) -> list:
    """encode + QuARI transform + rank (``checkpoint``, ``mode``, ``k``)."""
    return [{"transform": {"quari": params}}]


@register_method("ta")
def ta_method(**params: Any) -> list:
    """encode + TA projection + rank (``checkpoint``)."""
    return [{"transform": {"ta": params}}]
