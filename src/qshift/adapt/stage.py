"""Online test-time adaptation as a pipeline stage: ``{adapt: {method: NAME, **options}}``.

Options are the engine's (:class:`~qshift.adapt.engine.AdaptConfig`: ``params``, ``lr``,
``steps``, ``temperature``, ``batch_size``, …) and the objective's own (e.g. TCR's
``ratio``). The stage keeps one :class:`~qshift.adapt.engine.Adapter` across calls, so
a stream adapts as it goes; its state saves and loads with the pipeline's.

After a refine stage that fuses (``batch.fuse``), the adapter learns from the queries as
typed and the batch is fused again; two reconstructions (ReEx does not say how its two
parts meet), each an option: ``views`` — which tower embeds the repaired views, ``frozen``
(default) or ``adapted`` (a tower adapted to noisy text may serve clean repairs worse);
``fusion_weights`` — ``frozen`` (default) re-applies the weights the frozen model's
confidences gave at the encode stage, ``adapted`` recomputes them from the adapted
embeddings (entropy-style objectives make the adapted original *more confident* without
making it more often right, which moves weight away from the repair). On COCO dev
(bench/results/refine.md, reex-coco-t2t-pipeline-batch-val) frozen/frozen was the best
row, 50.17 vs 50.13 (frozen views only) and 50.07 (adapted/adapted), so it is the default.
On COCO test (REST + EPCL batch after spell + fusion) every variant stays below the fusion
without adaptation, 31.18: frozen/frozen 30.85, frozen views with adapted weights 30.23.

A third reconstruction, ``guide`` — where the adapter's query predictions (its candidates,
and EPCL's exclusion sets) come from: ``typed`` (default) the typed query's own embedding,
as without a repair; ``fused`` the frozen fused embedding, the pipeline's best guess, so the
repair tells the adaptation what each noisy query is and is *not*. Measured (REST + EPCL
batch after spell + fusion, frozen views and weights): COCO dev 50.23 guided (lr 3e-4) vs
50.17 typed, 50.03 without adaptation — within a query or two of 500; COCO test 30.67 guided
vs 30.85 typed, both below the fusion alone (31.18); world T2I test (mini-clip, 16 text
corruptions, guided lr 1e-3, the val pick) 23.24 vs the fusion alone 23.03, its char mean
lower (20.9 vs 21.7), plain replacement 25.51 — and on world val typed at the same lr ties
it (25.96 vs 25.95), so the guide itself adds nothing there. So ``typed`` stays the default.

Behind the fusion at its world-val prior (ρ = 30, reex-world-t2i-prior-val / -prior) the
typed REST + EPCL batch at lr 1e-3 was the best world val row (28.04 vs replacement 27.60,
the fusion alone 27.16; 500-query cells) but on the full-length test streams it fell below
both (24.21 vs 25.51 and 25.03): it gains on the style and word types (casual +3.7) and
drifts on the character types (char_insert −9.4) — the short-cell bias towards large steps
that the engine's docstring describes. With full-length val streams (5,000 queries per type,
reex-world-t2i-prior-val-long) lr 1e-4 was the pick (25.69 vs replacement 25.62); on test it
ties replacement (25.51 vs 25.505 — four queries of 80,000) and beats the fusion alone by
0.49, its character mean still lower (27.0 vs 28.1).
On COCO dev with test-length streams (``passes: 10``, reex-coco-t2t-prior-val-long) the
guided pipeline behind the ρ-3 fusion stays below the fusion alone (50.49 at lr 1e-4, 50.39
at 3e-4, vs 50.59), so on COCO adaptation behind the repair adds nothing measurable.

``views``, ``fusion_weights`` and ``guide`` set away from their defaults without a fusing
refine stage in front are refused (they would change nothing).

With ``ctx.extra['shared_encoder']`` (the service) the adapted values are swapped into the
encoder's tower only for the stage's own batches.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from qshift.adapt.engine import OBJECTIVES, AdaptConfig, Adapter, Objective
from qshift.errors import InputError
from qshift.pipeline.batch import QueryBatch
from qshift.pipeline.stage import Stage, check_options

ENGINE_OPTIONS = frozenset(f.name for f in dataclasses.fields(AdaptConfig))


def split_options(method: str, options: dict[str, Any]) -> tuple[AdaptConfig, dict[str, Any]]:
    """Separate engine settings (AdaptConfig fields) from the objective's own options,
    refusing names that are neither."""
    factory = OBJECTIVES.get(method)
    own: set[str] = set()
    for cls in factory.__mro__:  # REST passes TCR's options on through **tcr
        if cls not in (Objective, object) and "__init__" in vars(cls):
            params = inspect.signature(cls.__init__).parameters.values()
            own |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
    check_options(f"adapt stage {method!r}", options, ENGINE_OPTIONS | own)
    options = {**getattr(factory, "defaults", {}), **options}  # the method's own defaults, under the config's
    engine = {k: v for k, v in options.items() if k in ENGINE_OPTIONS}
    rest = {k: v for k, v in options.items() if k not in ENGINE_OPTIONS}
    return AdaptConfig(**engine), rest


def create_objective(method: str, options: dict[str, Any]) -> Objective:
    try:
        return OBJECTIVES.get(method)(**options)
    except TypeError as exc:
        raise InputError(f"{method}: {exc}") from None


class AdaptStage(Stage):
    kind = "adapt"
    stateful = True

    VIEWS = ("adapted", "frozen")
    GUIDES = ("typed", "fused")

    def __init__(self, method: str, views: str = "frozen", fusion_weights: str = "frozen", guide: str = "typed",
                 **options: Any) -> None:
        for name, value, allowed in (("views", views, self.VIEWS), ("fusion_weights", fusion_weights, self.VIEWS),
                                     ("guide", guide, self.GUIDES)):
            if value not in allowed:
                raise InputError(f"adapt stage {method!r}: {name} must be one of {', '.join(allowed)}, "
                                 f"got {value!r}")
        self.name, self.views, self.fusion_weights, self.guide = method, views, fusion_weights, guide
        self.options = dict(options)
        self.cfg, self.objective_options = split_options(method, self.options)  # validate now
        if create_objective(method, self.objective_options).needs_guide and guide != "fused":
            raise InputError(f"adapt stage {method!r}: this objective learns from the fused query; set guide: fused "
                             "(after a refine stage with mode: fuse)")
        self.batch_size = options.get("batch_size")
        self.adapter: Adapter | None = None

    def check_chain(self, before: list[Stage]) -> None:
        """``views``, ``fusion_weights`` and ``guide`` act only after a fusing refine stage:
        set away from their defaults without one, they would silently change nothing."""
        if any(s.fuses for s in before):
            return
        defaults = inspect.signature(AdaptStage.__init__).parameters
        for name in ("views", "fusion_weights", "guide"):
            value = getattr(self, name)
            if value != defaults[name].default:
                raise InputError(f"adapt stage {self.name!r}: {name}: {value} acts only after a refine stage with "
                                 "mode: fuse, and this pipeline has none in front of it")

    def setup(self, ctx: Any) -> None:
        self.ctx = ctx
        cfg = dataclasses.replace(self.cfg, batch_size=self.batch_size or ctx.batch_size,
                                  seed=self.options.get("seed", ctx.seed))
        objective = create_objective(self.name, self.objective_options)
        self.labels = ctx.extra.get("labels")
        if objective.needs_labels and self.labels is None:
            raise InputError(f"adapt method {self.name!r} is a ceiling that trains on the true positives; only a "
                             "benchmark row marked `labels: true` gives them")
        self.adapter = Adapter(ctx.encoder, ctx.gallery_vectors(), ctx.direction, cfg, objective,
                               source_texts=ctx.source_texts)
        # the service runs several pipelines on one encoder: adapted values live in the
        # tower only while this stage's own batches run
        self.shared = bool(ctx.extra.get("shared_encoder"))
        if self.shared:
            self.adapter.suspend()

    def __call__(self, batch: QueryBatch) -> QueryBatch:
        if self.adapter.objective.needs_labels:
            self.adapter.batch_labels = [self.labels[p] for p in batch.positions]
        self.adapter.resume()
        try:
            fused = batch.fuse is not None and bool(batch.views)
            weights = None
            if fused and self.fusion_weights == "frozen":  # what the encode stage's fusion decided
                weights = [m.get("refine", {}).get("fusion_weight", 0.0) for m in batch.meta]
            # after a fusion the batch's embeddings are no longer the typed queries' own: the
            # adapter then embeds them itself (its frozen reference and its fallback); with
            # guide: fused they are what its query predictions are read from
            guide = batch.embeddings if fused and self.guide == "fused" else None
            batch.embeddings = self.adapter.adapt(batch.queries, None if fused else batch.embeddings, batch.index,
                                                  guide=guide)
            if fused:
                # the adapter learnt from the queries as typed; the views (e.g. a repaired text)
                # are embedded by the adapted tower, or keep the frozen one's, and fused again
                if self.views == "adapted":
                    for name, view in batch.views.items():
                        batch.view_embeddings[name] = self.adapter.embed(view)
                batch.fuse(batch, self.ctx, weights=weights)
        finally:
            if self.shared:  # other pipelines use this encoder too: give it back unadapted
                self.adapter.suspend()
        batch.info["adapt"] = dict(self.adapter.stats)
        return batch

    def reset(self) -> None:
        self.adapter.reset()

    def state_dict(self) -> dict:
        return self.adapter.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.adapter.load_state_dict(state)
        if self.shared:
            self.adapter.suspend()

    def close(self) -> None:
        if self.adapter is not None:
            self.adapter.close()
            self.adapter = None
