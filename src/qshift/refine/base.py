"""The ``refine`` stage: query repair with guards, a rewrite cache, fallbacks and
confidence-guided fusion (ReEx's Generative Semantic Refinement).

``{refine: spell}``, ``{refine: {llm: {vocabulary: world:train}}}``,
``{refine: {openai: {base_url: …, model: …, fallback: spell}}}`` — a backend is anything
with ``repair(texts) -> texts`` and an ``identity`` string (what its outputs depend on:
backend, model, prompt, vocabulary, decoding); :data:`BACKENDS` registers them.

Per batch the stage repairs what the previous refine stage left (stages chain), then
* **guards** keep the original where the rewrite is empty, much longer than the query
  (> ``max_growth`` × its length + 20 characters), or in another script;
* ``mode: fuse`` (default) adds the repair as the ``repaired`` view and a
  :class:`~qshift.refine.fusion.ConfidenceFusion` rule that the encode stage applies;
  ``mode: replace`` makes the repair the query (the plain-correction baseline).

Inputs longer than ``max_chars`` are cut for the repairer (the query itself is not) and
the cut is noted in the query's ``meta``. Rewrites are cached on disk per backend
identity (``cache``: true → ``$QSHIFT_CACHE/refine/``, a path, or false). When a
backend fails (unreachable endpoint, time-out, missing model) the stage warns once and
uses the next one in ``fallback``; if none is left the queries stay as typed.
"""

from __future__ import annotations

import unicodedata
import warnings
from pathlib import Path
from typing import Any, Callable, Protocol

from qshift.errors import InputError
from qshift.pipeline.batch import QueryBatch
from qshift.pipeline.stage import Stage, check_options
from qshift.refine.fusion import ConfidenceFusion
from qshift.registry import Registry

MODES = ("fuse", "replace")
FUSION_OPTIONS = ("confidence", "temperature", "beta", "w_max", "min_cos", "gate", "prior")


class Repairer(Protocol):
    name: str
    identity: str

    def repair(self, texts: list[str]) -> list[str]: ...


# name → (factory(**options) -> Repairer, option names it accepts)
BACKENDS: Registry[tuple[Callable[..., Repairer], frozenset[str]]] = Registry("refine backend")


def register_backend(name: str, options: set[str] | frozenset[str]) -> Callable[[Callable[..., Repairer]], Any]:
    """Register a repair backend; it also becomes the refine stage ``name``."""

    def deco(factory: Callable[..., Repairer]) -> Callable[..., Repairer]:
        from qshift.pipeline.stage import register_stage

        BACKENDS.add(name, (factory, frozenset(options)))

        def stage(**opts: Any) -> RefineStage:
            return RefineStage(name, **opts)

        stage.option_names = lambda: None  # type: ignore[attr-defined]  # RefineStage checks them
        register_stage("refine", name)(stage)
        return factory

    return deco


def script_of(text: str) -> str | None:
    """The Unicode script most of the letters belong to (LATIN, CYRILLIC, CJK, …)."""
    counts: dict[str, int] = {}
    for ch in text:
        if ch.isalpha():
            name = unicodedata.name(ch, "")
            key = name.split(" ")[0] if name else "?"
            counts[key] = counts.get(key, 0) + 1
    return max(counts, key=counts.get) if counts else None


def guard(original: str, rewrite: str, max_growth: float = 2.0) -> str | None:
    """Why a rewrite must not be used, or None."""
    if not rewrite or not rewrite.strip():
        return "empty rewrite"
    if len(rewrite) > max_growth * len(original) + 20:
        return f"rewrite much longer than the query ({len(rewrite)} vs {len(original)} characters)"
    a, b = script_of(original), script_of(rewrite)
    if a is not None and b is not None and a != b:
        return f"rewrite in another script ({b} for {a})"
    return None


def _backend_spec(spec: Any) -> tuple[str, dict]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict) and len(spec) == 1:
        (name, opts), = spec.items()
        return name, dict(opts or {})
    raise InputError(f"refine fallback: expected a backend name or {{name: options}}, got {spec!r}")


class RefineStage(Stage):
    kind = "refine"
    stateful = False

    def __init__(self, backend: str, *, mode: str = "fuse", fallback: Any = None, cache: Any = True,
                 max_chars: int = 1000, max_growth: float = 2.0, **options: Any) -> None:
        self.name = backend
        if mode not in MODES:
            raise InputError(f"refine stage {backend!r}: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if max_chars < 1:
            raise InputError(f"refine stage {backend!r}: max_chars must be >= 1, got {max_chars}")
        self.mode, self.cache, self.max_chars, self.max_growth = mode, cache, int(max_chars), float(max_growth)
        fusion = {k: options.pop(k) for k in FUSION_OPTIONS if k in options}
        self.fusion = ConfidenceFusion(**fusion) if mode == "fuse" else None
        self.fuses = self.fusion is not None
        if mode == "replace" and fusion:
            raise InputError(f"refine stage {backend!r}: {sorted(fusion)} are fusion options; mode replace has none")
        chain = [(backend, options)]
        if fallback is not None:
            chain += [_backend_spec(f) for f in (fallback if isinstance(fallback, list) else [fallback])]
        for name, opts in chain:
            _, known = BACKENDS.get(name)
            extra = {"mode", "fallback", "cache", "max_chars", "max_growth", *FUSION_OPTIONS}
            check_options(f"refine stage {backend!r}" if name == backend else f"refine fallback {name!r}", opts,
                          known | (extra if name == backend else set()))
        self.chain = chain
        self.repairers: list[tuple[Repairer, Any]] = []
        self.failed: set[int] = set()
        self.stats = {"queries": 0, "changed": 0, "guarded": 0, "cache_hits": 0, "cache_misses": 0, "truncated": 0}

    # -- set-up -------------------------------------------------------------------------
    def setup(self, ctx: Any) -> None:
        if ctx.query_modality != "text":
            raise InputError(f"refine stage {self.name!r} repairs text queries; {ctx.direction} queries are images")
        self.ctx = ctx
        for i, (name, opts) in enumerate(self.chain):
            try:
                rep = BACKENDS.get(name)[0](**opts)
            except Exception as exc:  # noqa: BLE001 - e.g. a missing model: fall back if we can
                if i == len(self.chain) - 1 and not self.repairers:
                    raise
                warnings.warn(f"refine: backend {name!r} is unavailable ({exc}); falling back", RuntimeWarning,
                              stacklevel=2)
                continue
            self.repairers.append((rep, self._open_cache(rep)))

    def _open_cache(self, rep: Repairer) -> Any:
        """The backend's rewrite cache: a file per backend identity in the default folder or
        in the folder ``cache`` names; a ``.sqlite`` path is the primary backend's own file."""
        if self.cache is False or self.cache is None:
            return None
        from qshift.refine.cache import RewriteCache

        own = f"{rep.name}-{rep.identity[:16]}.sqlite"
        if self.cache is True:
            from qshift.paths import cache_dir

            path = cache_dir() / "refine" / own
        else:
            given = Path(self.cache)
            path = given if given.suffix == ".sqlite" and not self.repairers else \
                (given.parent if given.suffix == ".sqlite" else given) / own
        return RewriteCache(path, f"{rep.name}:{rep.identity}")

    # -- repair -------------------------------------------------------------------------------
    def _repair(self, texts: list[str]) -> list[str]:
        for j, (rep, cache) in enumerate(self.repairers):
            if j in self.failed:
                continue
            try:
                known = cache.get_many(texts) if cache is not None else {}
                todo = [t for t in dict.fromkeys(texts) if t not in known]
                if todo:
                    new = dict(zip(todo, rep.repair(todo)))
                    if cache is not None:
                        cache.put_many(new)
                    known.update(new)
                if cache is not None:
                    self.stats["cache_hits"], self.stats["cache_misses"] = cache.hits, cache.misses
                return [known[t] for t in texts]
            except Exception as exc:  # noqa: BLE001 - any backend failure: warn once, fall back
                self.failed.add(j)
                rest = [r.name for k, (r, _) in enumerate(self.repairers) if k not in self.failed]
                warnings.warn(f"refine: backend {rep.name!r} failed ({str(exc)[:200]}); "
                              + (f"using {rest[0]!r}" if rest else "queries stay as typed"), RuntimeWarning,
                              stacklevel=3)
        return list(texts)

    def __call__(self, batch: QueryBatch) -> QueryBatch:
        source = list(batch.views.get("repaired", batch.queries))
        cut = [t[: self.max_chars] if isinstance(t, str) else t for t in source]
        usable = [i for i, t in enumerate(cut) if isinstance(t, str) and t.strip()]
        fixed = list(source)
        if usable:
            out = self._repair([cut[i] for i in usable])
            for i, rew in zip(usable, out):
                note = batch.meta[i].setdefault("refine", {})
                if len(source[i]) > self.max_chars:
                    note["truncated"] = f"repaired the first {self.max_chars} of {len(source[i])} characters"
                    self.stats["truncated"] += 1
                why = guard(cut[i], rew, self.max_growth)
                if why is not None:
                    note["guard"] = why
                    self.stats["guarded"] += 1
                    continue
                fixed[i] = rew
        self.stats["queries"] += len(source)
        changed = [i for i in range(len(source)) if fixed[i] != batch.raw[i]]
        self.stats["changed"] += len(changed)
        for i in changed:
            batch.meta[i].setdefault("refine", {})["repaired"] = fixed[i]
        if self.mode == "replace":
            if any(a != b for a, b in zip(fixed, batch.queries)):
                batch.queries, batch.embeddings = fixed, None
        else:
            batch.views["repaired"] = fixed
            batch.view_embeddings.pop("repaired", None)
            batch.fuse = self.fusion
        batch.info.setdefault("refine", {})[self.name] = dict(self.stats)
        return batch

    def close(self) -> None:
        for _, cache in self.repairers:
            if cache is not None:
                cache.close()
        self.repairers = []
