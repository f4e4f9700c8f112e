"""The stage protocol and the stage registry.

A stage is one step of ``refine → encode → adapt → transform → rank``. It is built from
its options alone (so a config fails before any work), bound to a
:class:`~qshift.pipeline.context.PipelineContext` by ``setup``, and then called on each
:class:`~qshift.pipeline.batch.QueryBatch` of the stream. Stateful stages (online
adaptation) also implement ``reset`` / ``state_dict`` / ``load_state_dict``; ``close``
gives back what ``setup`` borrowed (e.g. restores the encoder).

Stages register with ``@register_stage(kind, name)`` next to their class.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar

from qshift.errors import InputError
from qshift.registry import Registry, unknown_name

KINDS = ("refine", "encode", "adapt", "transform", "rank")
# kinds that a pipeline has exactly once, with the stage used when a config names none
IMPLIED = {"encode": "frozen", "rank": "index"}
# kinds that may appear at most once (several adapt stages would fight over one tower)
SINGLE = ("encode", "adapt", "transform", "rank")

STAGES: dict[str, Registry[Callable[..., "Stage"]]] = {k: Registry(f"{k} stage") for k in KINDS}


class Stage:
    """Base class with the no-op defaults of the optional hooks."""

    kind: ClassVar[str] = ""
    name: str = ""
    stateful: ClassVar[bool] = False
    # a preferred stream batch size (an adapt stage's ``batch_size``), else the context's
    batch_size: int | None = None
    # whether the stage hands later stages a fusion rule (``batch.fuse``; a refine stage's ``mode: fuse``)
    fuses: bool = False

    def check_chain(self, before: "list[Stage]") -> None:
        """Refuse options that need a stage this pipeline does not run ahead of this one."""

    def setup(self, ctx: Any) -> None:
        """Bind to the context (encoder, gallery, index)."""

    def __call__(self, batch: Any) -> Any:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget what was learnt from the stream."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise InputError(f"{self.kind} stage {self.name!r} keeps no state, but the state file has some")

    def close(self) -> None:
        """Give back what ``setup`` took (restore the encoder)."""

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name}


def register_stage(kind: str, name: str) -> Callable[[Any], Any]:
    """Decorator: make ``{kind: name}`` in a pipeline config build this class/factory."""
    if kind not in KINDS:
        raise ValueError(f"stage kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return STAGES[kind].register(name)


def list_stages() -> dict[str, list[str]]:
    """Every registered stage name, per kind."""
    from qshift.methods import load_plugins

    load_plugins()
    return {k: STAGES[k].names() for k in KINDS}


def check_options(what: str, options: dict, known: set[str] | list[str]) -> None:
    """Refuse option names outside ``known``, naming the closest."""
    for key in options:
        if key not in known:
            raise InputError(f"{what}: " + unknown_name("option", key, known))


def option_names(factory: Callable[..., Any]) -> set[str] | None:
    """Keyword names a factory takes (None when it takes ``**kwargs``)."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def create_stage(kind: str, name: str, options: dict) -> Stage:
    from qshift.methods import load_plugins

    load_plugins()
    if kind not in KINDS:
        raise InputError(unknown_name("stage kind", kind, KINDS))
    factory = STAGES[kind].get(name)
    known = getattr(factory, "option_names", None)
    known = known() if callable(known) else option_names(factory)
    if known is not None:
        check_options(f"{kind} stage {name!r}", options, known)
    try:
        stage = factory(**options)
    except TypeError as exc:
        raise InputError(f"{kind} stage {name!r}: {exc}") from None
    stage.name = stage.name or name
    return stage
