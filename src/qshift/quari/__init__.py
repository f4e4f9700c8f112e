"""QuARI: query-adaptive low-rank transforms (model, training, scoring, search).

Registered methods (:mod:`qshift.methods`): ``quari`` (``checkpoint``, ``mode``: full |
rerank, ``k``) and ``ta`` (the static task-adaptation baseline, ``checkpoint``). Names are
imported lazily so that the CLI starts without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from qshift.methods import register_method

_WHERE = {
    "QuARI": "model", "QuARIConfig": "model",
    "QuARITrainConfig": "train", "train_quari": "train", "train_ta": "train", "load_quari": "train",
    "quari_scores": "search", "quari_rerank": "search", "quari_search": "search", "save_ta": "search",
    "load_ta": "search", "QuARIMethod": "search", "TAMethod": "search",
    "lowrank_scores": "scoring", "materialized_scores": "scoring",
    "training_pairs": "data", "target_groups": "data",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"qshift.quari.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'qshift.quari' has no attribute {name!r}")


def _quari(**params: Any) -> Any:
    from qshift.quari.search import QuARIMethod

    return QuARIMethod(**params)


def _ta(**params: Any) -> Any:
    from qshift.quari.search import TAMethod

    return TAMethod(**params)


register_method("quari", _quari)
register_method("ta", _ta)
