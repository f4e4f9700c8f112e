"""Named methods: presets of the query pipeline.

A method is a name for a list of stages (:mod:`qshift.pipeline.config`): ``zero-shot``
is encode + rank (no stage to add), each TTA objective ``NAME`` is
``[{adapt: {method: NAME, **params}}]``, ``quari``/``ta`` add a transform stage. A
benchmark config, ``qshift search --method`` and the service take a method name, a
mapping ``{name: NAME, label: SHOWN-AS, **params}``, or ``{pipeline: [stages], label: …}``
for any other composition. Methods register with ``@register_method(name)``. A benchmark
entry marked ``labels: true`` is a ceiling row (the ``oracle``): the runner gives it the
true positives of the queries, which no method ever sees.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from qshift.errors import InputError
from qshift.registry import Registry

METHODS: Registry[Callable[..., list]] = Registry("method")
PLUGINS = ("qshift.adapt", "qshift.quari", "qshift.refine")


def register_method(name: str) -> Callable[[Callable[..., list]], Callable[..., list]]:
    """Decorator: ``fn(**params) -> list of stage entries`` becomes method ``name``."""
    return METHODS.register(name)


@register_method("zero-shot")
def zero_shot(**params: Any) -> list:
    """The frozen encoder: encode + rank."""
    if params:
        raise InputError(f"zero-shot takes no parameters, got {sorted(params)}")
    return []


def load_plugins() -> None:
    """Import the modules that register further methods and stages (once each)."""
    for mod in PLUGINS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def list_methods() -> list[str]:
    load_plugins()
    return METHODS.names()


def method_label(spec: Any) -> str:
    """How a method entry is shown in tables: its ``label``, else its name."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict) and "label" in spec:
        return str(spec["label"])
    if isinstance(spec, dict) and "name" in spec:
        return str(spec["name"])
    raise InputError(f"a pipeline method entry needs a 'label', got {spec!r}")


def method_stages(spec: Any) -> list:
    """The stage list of a method entry (see the module docstring)."""
    load_plugins()
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, dict) and "pipeline" in spec:
        extra = sorted(set(spec) - {"pipeline", "label", "labels"})
        if extra:
            raise InputError(f"a pipeline method entry takes 'pipeline' and 'label' only, got also {extra}")
        stages = spec["pipeline"]
        if not isinstance(stages, list):
            raise InputError(f"'pipeline' must be a list of stages, got {stages!r}")
        return stages
    elif isinstance(spec, dict) and "name" in spec:
        params = {k: v for k, v in spec.items() if k not in ("name", "label", "labels")}
        name = spec["name"]
    else:
        raise InputError(f"a method is a name, a mapping with 'name', or a mapping with 'pipeline'; got {spec!r}")
    fn = METHODS.get(name)
    try:
        return fn(**params)
    except TypeError as exc:
        raise InputError(f"method {name!r}: {exc}") from None
