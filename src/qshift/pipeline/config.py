"""Pipeline configs: one declarative list of stages.

A config is a list whose entries each name one stage by its kind::

    - refine: spell                        # kind: name
    - adapt: {method: rest, lr: 0.001}     # kind: {method|name: NAME, **options}
    - transform: {quari: runs/quari}       # kind: {NAME: primary option}
    - transform: {quari: {checkpoint: runs/quari, mode: rerank}}
    - refine: {spell: {vocabulary: world:train}, mode: replace}   # NAME: options, + more

``encode`` and ``rank`` are implied when not named. The same list may sit under a
``stages:`` key of a mapping, in a YAML/TOML file, or come from a method name
(:mod:`qshift.methods`): a benchmark cell, a CLI call and a service request name the
same stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qshift.errors import InputError
from qshift.pipeline.stage import IMPLIED, KINDS, SINGLE, STAGES
from qshift.registry import unknown_name


@dataclass(frozen=True)
class StageSpec:
    kind: str
    name: str
    options: dict = field(default_factory=dict)

    def to_config(self) -> dict:
        return {self.kind: {"name": self.name, **self.options}}


def _entry(entry: Any, where: str) -> StageSpec:
    from qshift.methods import load_plugins

    load_plugins()
    if isinstance(entry, str):
        if entry in IMPLIED:
            return StageSpec(entry, IMPLIED[entry])
        raise InputError(f"{where}: a stage is a mapping {{kind: ...}} with kind in {', '.join(KINDS)}, "
                         f"got {entry!r}")
    if not isinstance(entry, dict) or len(entry) != 1:
        raise InputError(f"{where}: a stage is a mapping with one key (its kind: {', '.join(KINDS)}), got {entry!r}")
    (kind, value), = entry.items()
    if kind not in KINDS:
        raise InputError(f"{where}: " + unknown_name("stage kind", kind, KINDS))
    if value is None:
        if kind not in IMPLIED:
            raise InputError(f"{where}: {kind} needs a stage name; known: {', '.join(STAGES[kind].names())}")
        return StageSpec(kind, IMPLIED[kind])
    if isinstance(value, str):
        return StageSpec(kind, _known(kind, value, where))
    if not isinstance(value, dict):
        raise InputError(f"{where}: {kind}: expected a name or a mapping, got {value!r}")
    opts = dict(value)
    for key in ("method", "name"):
        if key in opts:
            return StageSpec(kind, _known(kind, str(opts.pop(key)), where), opts)
    named = [k for k in opts if k in STAGES[kind]]
    if len(named) == 1:  # {NAME: options-or-primary, **more options}
        name = named[0]
        sub = opts.pop(name)
        if isinstance(sub, dict):
            clash = sorted(set(sub) & set(opts))
            if clash:
                raise InputError(f"{where}: {kind} stage {name!r}: options {clash} given twice")
            return StageSpec(kind, name, {**sub, **opts})
        if sub is None:
            return StageSpec(kind, name, opts)
        primary = getattr(STAGES[kind].get(name), "primary_option", None)
        if primary is None:
            raise InputError(f"{where}: {kind} stage {name!r} takes options as a mapping, got {sub!r}")
        return StageSpec(kind, name, {primary: sub, **opts})
    if kind in IMPLIED:  # options of the implied stage, e.g. {rank: {overfetch: 20}}
        return StageSpec(kind, IMPLIED[kind], opts)
    raise InputError(f"{where}: {kind}: name the stage with 'method:' or as the only key "
                     f"(known {kind} stages: {', '.join(STAGES[kind].names())}), got {value!r}")


def _known(kind: str, name: str, where: str) -> str:
    if name not in STAGES[kind]:
        raise InputError(f"{where}: " + unknown_name(f"{kind} stage", name, STAGES[kind].names()))
    return name


def parse_pipeline(config: Any, where: str = "pipeline") -> list[StageSpec]:
    """Stage specs in run order, with ``encode`` and ``rank`` filled in (see the module
    docstring for the accepted forms; ``None`` or ``[]`` is zero-shot: encode + rank)."""
    if isinstance(config, (str, Path)) and Path(config).suffix.lower() in (".yaml", ".yml", ".toml"):
        from qshift.io import read_config_file

        where = str(config)
        config = read_config_file(config)
    if isinstance(config, dict):
        if not ({"stages", "pipeline"} & set(config)):
            raise InputError(f"{where}: a pipeline mapping needs a 'stages' list")
        config = config.get("stages", config.get("pipeline"))
    if config is None:
        config = []
    if not isinstance(config, list):
        raise InputError(f"{where}: expected a list of stages, got {type(config).__name__}")
    specs = [_entry(e, f"{where}: stage #{i + 1}") for i, e in enumerate(config)]
    seen: dict[str, int] = {}
    for i, s in enumerate(specs):
        if s.kind in SINGLE and s.kind in seen:
            raise InputError(f"{where}: stage #{i + 1}: a pipeline has at most one {s.kind} stage "
                             f"(#{seen[s.kind] + 1} is one already)")
        seen.setdefault(s.kind, i)
    for i in range(1, len(specs)):
        a, b = specs[i - 1], specs[i]
        if KINDS.index(b.kind) < KINDS.index(a.kind):
            raise InputError(f"{where}: stage #{i + 1} ({b.kind}: {b.name}) after {a.kind}: {a.name} cannot work; "
                             f"stages run in the order {' → '.join(KINDS)}")
    for kind, name in IMPLIED.items():
        if kind not in seen:
            pos = len(specs) if kind == "rank" else sum(1 for s in specs if s.kind == "refine")
            specs.insert(pos, StageSpec(kind, name))
    return specs
