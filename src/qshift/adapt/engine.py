"""The online test-time adaptation engine shared by every method.

Queries arrive in batches. For each batch the engine runs ``steps`` forward+update
passes of the query tower (only the selected parameters move; the gallery embeddings
stay fixed), then embeds the batch with the adapted tower. Methods differ only in their
objective (one module each: :mod:`.tent`, :mod:`.eata`, :mod:`.sar`, :mod:`.read`,
:mod:`.deyo`, :mod:`.tcr`, :mod:`.rest`), registered with ``@register_objective``.

The engine talks to the encoder only through :class:`~qshift.encoders.base.AdaptableEncoder`
(``prepare``, ``forward``, ``tower``, ``device``); the gallery lives on the encoder's device.

**Defaults** (lr 3e-4, τ = 2 × the encoder's trained temperature, 3 steps, batches of 64):
on one continual pass over all 5,000 world val captions under mixed corruptions
(bench/configs/tta-world-t2i-tune-long.yaml), lr 3e-4 at τ 2× gave every method its best
stream R@1 (TCR: tied with τ 4×) with forgetting ≤ 1.04 R@1; lr 1e-3–1e-2, which short 500-query
val cells prefer, drift over a long stream (forgetting 3–19 R@1).

**Query predictions** (REST §III-A, "refining the retrieval results into query
predictions"): a recognition-style loss needs a distribution per query, so each query's
candidates come from the gallery —

* ``batch-nn`` (TCR/REST): every query's nearest gallery item; the logits of query i
  are its similarities to the B candidates of the batch, divided by τ (B × B);
* ``topk``: each query's own k nearest gallery items (B × k);
* ``gallery``: the whole gallery (B × N), as TCR's code feeds the classic baselines;
* ``auto``: ``batch-nn`` for batches of ≥ 8 queries, else ``topk`` (a 1 × 1 prediction
  carries no signal).

With a ``guide`` (``step(batch, guide=…)``: other embeddings of the same queries, e.g. the
pipeline's fused query after a repair) the candidates are chosen by the guide and its logits
over them are ``Predictions.target``; the loss still runs on the tower's own embeddings.

**Ranking** (``rank_with``): ``updated`` embeds the batch once more after its last
update; ``last-step`` ranks with the embeddings of the last step's own forward (taken
before that step's update), as the reference implementations of Tent and TCR do — one
forward less per batch, with the batch ranked by the model as of ``steps − 1`` updates.
On world val (bench/configs/tta-world-t2i-rank-tune.yaml, each method at its val pick)
``updated`` was ahead — TCR +1.94 vs +1.90, Tent +1.71 vs +1.50, READ +1.48 vs +1.45
R@1 over zero-shot — so it stays the default.

Safety: a non-finite loss, parameter or embedding resets the tower to its initial state
with a warning and the batch keeps the frozen model's embeddings — never NaN.
``episodic`` resets after every batch; ``reset_on_collapse`` resets when the spread of
the adapted queries falls under ``collapse_ratio`` × the spread of the frozen ones.

**Frozen gate** (``frozen_gate``, a qshift addition, not from a seed; off by default): a
query the *frozen* model already retrieves confidently keeps the frozen embedding; the
rest get the adapted one. Confident means ``gate_confidence`` (``margin``: top-1 minus
top-2 cosine over the gallery; ``top1``: top-1 softmax probability at the encoder's
trained temperature; ``entropy``: one minus the normalised entropy — the fusion stage's
measures, :mod:`qshift.confidence`) of the frozen embedding ≥ the ``frozen_gate``
quantile of the same confidence over the source texts (clean, disjoint from the test queries; at most
``gate_samples`` of them). Why: adaptation along a shifted stream moves the tower for every
query, and the queries the frozen model handles well — clean ones, mild shifts — lose most
(forgetting 2–9 R@1 on world test after the mixed stream, bench/results/tta.md). The
gate changes only what is ranked, not what the objective learns from. On world val
(bench/results/tta.md, tta-world-t2i-gate-val; each method at its val pick), gate 0.25 cut
forgetting after the full-length mixed stream from 2.6–8.4 to −0.1–1.1 R@1 at a cost of
at most 0.08 stream R@1, but lost 0.4–1.3 R@1 on the mean of the 500-query per-type cells:
hence off by default.

State: ``state_dict()`` holds the adapted parameters, the optimizer, the objective's
own state (queues, centres, moving averages), the counters and the random generator, so
a stream stopped after batch k and resumed from it gives the same embeddings as an
uninterrupted one. ``close()`` restores the tower exactly: parameter values, LoRA
removed, ``requires_grad`` flags and train/eval mode as they were.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from qshift.confidence import CONFIDENCES, score_confidence
from qshift.directions import check_direction, query_modality
from qshift.errors import InputError, StoreMismatchError
from qshift.adapt.params import TowerFlags, select_params
from qshift.registry import Registry

CANDIDATES = ("auto", "batch-nn", "topk", "gallery")
NORM_STATS = ("running", "batch", "blend")
RANK_WITH = ("updated", "last-step")
GATE_CONFIDENCES = CONFIDENCES  # the fusion stage's measures (qshift.confidence)
# the trained temperature assumed for encoders that have none (sentence-transformers), so
# that the default τ (2 ×) is 0.05
UNTRAINED_TEMPERATURE = 0.025


@dataclass
class AdaptConfig:
    params: str = "norm"          # norm | last-k | lora
    last_k: int = 1
    lora_rank: int = 4
    lr: float = 3e-4
    weight_decay: float = 1e-4
    steps: int = 3
    batch_size: int = 64
    temperature: float | None = None  # τ of the query predictions; None: temperature_scale × the encoder's τ
    temperature_scale: float = 2.0
    norm_stats: str = "running"   # BatchNorm statistics: running | batch (Tent) | blend
    norm_prior: float = 16.0      # blend: weight of the running statistics, in samples
    candidates: str = "auto"
    topk: int = 16
    rank_with: str = "updated"    # updated: one more forward after the last update | last-step: Tent/TCR's
    episodic: bool = False
    reset_on_collapse: bool = True
    collapse_ratio: float = 0.25
    frozen_gate: float | None = None  # quantile of the source texts' frozen confidence; None: off
    gate_confidence: str = "margin"   # margin | top1 | entropy (qshift.confidence)
    gate_samples: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0 < self.lr < 1):
            raise InputError(f"adapt: lr must be in (0, 1), got {self.lr}")
        if not (1 <= self.steps <= 100):
            raise InputError(f"adapt: steps must be in 1–100, got {self.steps}")
        if self.batch_size < 1:
            raise InputError(f"adapt: batch_size must be >= 1, got {self.batch_size}")
        if self.temperature is not None and not self.temperature > 0:
            raise InputError(f"adapt: temperature must be > 0, got {self.temperature}")
        if not self.temperature_scale > 0:
            raise InputError(f"adapt: temperature_scale must be > 0, got {self.temperature_scale}")
        if self.norm_stats not in NORM_STATS:
            raise InputError(f"adapt: norm_stats must be one of {', '.join(NORM_STATS)}, got {self.norm_stats!r}")
        if self.norm_prior <= 0:
            raise InputError(f"adapt: norm_prior must be > 0, got {self.norm_prior}")
        if self.candidates not in CANDIDATES:
            raise InputError(f"adapt: candidates must be one of {', '.join(CANDIDATES)}, got {self.candidates!r}")
        if self.topk < 2:
            raise InputError(f"adapt: topk must be >= 2, got {self.topk}")
        if self.rank_with not in RANK_WITH:
            raise InputError(f"adapt: rank_with must be one of {', '.join(RANK_WITH)}, got {self.rank_with!r}")
        if self.weight_decay < 0:
            raise InputError(f"adapt: weight_decay must be >= 0, got {self.weight_decay}")
        if self.frozen_gate is not None and not (0 <= self.frozen_gate <= 1):
            raise InputError(f"adapt: frozen_gate must be a quantile in [0, 1] (or null: off), got {self.frozen_gate}")
        if self.gate_confidence not in GATE_CONFIDENCES:
            raise InputError(f"adapt: gate_confidence must be one of {', '.join(GATE_CONFIDENCES)}, "
                             f"got {self.gate_confidence!r}")
        if self.gate_samples < 1:
            raise InputError(f"adapt: gate_samples must be >= 1, got {self.gate_samples}")


@dataclass
class Batch:
    raw: list[Any]                # texts, or images / paths
    inputs: Any                   # token ids / feature dict / pixel tensor
    index: int = 0                # position of the batch in the stream


@dataclass
class Predictions:
    q: torch.Tensor               # B × d adapted, normalised query embeddings (with grad)
    logits: torch.Tensor          # B × C similarities / τ
    nn: torch.Tensor              # B, gallery index of each query's top-1
    nn_feat: torch.Tensor         # B × d, that gallery item's embedding (fixed)
    # B × C logits of the guide over the same candidates (fixed; None: no guide) — what
    # EPCL's exclusion sets are read from when a guide is given
    target: torch.Tensor | None = None

    def reference(self) -> torch.Tensor:
        """The logits an objective reads its targets from (no grad; EPCL batch: its
        exclusion sets): the guide's when there is one, else the query's own."""
        return self.target if self.target is not None else self.logits.detach()


class Objective:
    """A method: a loss over query predictions, plus optional set-up and update hooks.

    After ``loss`` an objective may set ``learned`` to a boolean mask of the batch's
    queries its loss learnt from (None: all of them); the engine reports the share.
    """

    name = "objective"
    learned: Any = None
    # per-method defaults of engine and objective options, under what a config gives
    defaults: dict[str, Any] = {}
    # a ceiling (the oracle), not a method: it reads the batch's true positives
    needs_labels = False
    # learns from the guide's logits (``Predictions.target``): the adapt stage needs ``guide: fused``
    needs_guide = False

    def setup(self, adapter: "Adapter") -> None:
        """Called once before the stream (e.g. Fisher information, source anchors)."""

    def loss(self, adapter: "Adapter", batch: Batch, pred: Predictions, step: int) -> torch.Tensor:
        raise NotImplementedError

    def update(self, adapter: "Adapter", batch: Batch, loss: torch.Tensor, step: int) -> None:
        adapter.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        adapter.optimizer.step()

    def reset(self) -> None:
        """Forget per-stream state (queues, moving averages)."""

    def state_dict(self) -> dict:
        """Per-stream state that must survive a stop and resume."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict`."""


OBJECTIVES: Registry[Callable[..., Objective]] = Registry("adaptation method")


def register_objective(name: str) -> Callable[[type], type]:
    """Class decorator: an objective ``name`` — also the adapt stage ``{adapt: name}`` and
    the method ``name`` (encode + adapt + rank)."""

    def deco(cls: type) -> type:
        from qshift.methods import register_method
        from qshift.pipeline.stage import register_stage

        OBJECTIVES.add(name, cls)

        def stage(**options: Any) -> Any:
            from qshift.adapt.stage import AdaptStage

            return AdaptStage(name, **options)

        stage.option_names = lambda: None  # validated by AdaptStage itself  # type: ignore[attr-defined]
        register_stage("adapt", name)(stage)
        register_method(name)(lambda **params: [{"adapt": {"method": name, **params}}])
        return cls

    return deco


class Adapter:
    """Wraps an encoder's query tower; ``adapt`` adapts on one batch and embeds it."""

    def __init__(self, encoder: Any, gallery: np.ndarray, direction: str, cfg: AdaptConfig,
                 objective: Objective, *, source_texts: Sequence[str] | None = None,
                 gallery_fingerprint: str | None = None) -> None:
        from qshift.encoders.base import AdaptableEncoder

        check_direction(direction)
        if not isinstance(encoder, AdaptableEncoder):
            raise InputError(f"encoder {getattr(encoder, 'spec', encoder)!r} does not expose a differentiable query "
                             "tower (prepare/forward/tower), so it cannot be adapted")
        if gallery_fingerprint is not None and gallery_fingerprint != encoder.fingerprint():
            raise StoreMismatchError(f"adapt: the gallery was encoded by {gallery_fingerprint}, not by the "
                                     f"query encoder {encoder.fingerprint()}; re-encode it with the same encoder")
        gallery = np.asarray(gallery, dtype=np.float32)
        if gallery.ndim != 2 or gallery.shape[0] == 0:
            raise InputError(f"adapt: gallery must be a non-empty N × d array, got shape {gallery.shape}")
        if gallery.shape[1] != encoder.dim:
            raise InputError(f"adapt: gallery dim {gallery.shape[1]} ≠ encoder dim {encoder.dim}")
        if not np.isfinite(gallery).all():
            raise InputError("adapt: gallery has non-finite rows "
                             f"{np.flatnonzero(~np.isfinite(gallery).all(1))[:10].tolist()}")
        if cfg.temperature is None:  # τ relative to the encoder (TCR's 0.02 is twice CLIP's 0.01)
            trained = getattr(encoder, "temperature", lambda: None)() or UNTRAINED_TEMPERATURE
            cfg = dataclasses.replace(cfg, temperature=cfg.temperature_scale * trained)
        self.encoder, self.direction, self.cfg, self.objective = encoder, direction, cfg, objective
        self.modality = query_modality(direction)
        self.tower = encoder.tower(self.modality)
        if self.tower is not None:  # what close() must give back exactly
            self._flags = TowerFlags(self.tower)
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.device = torch.device(getattr(encoder, "device", "cpu"))
        self.gallery = F.normalize(torch.from_numpy(gallery), dim=-1).to(self.device)
        self.source_texts = list(source_texts) if source_texts is not None else None
        self.stats = {"batches": 0, "queries": 0, "resets": 0, "divergences": 0, "collapses": 0, "learning_share": 0.0,
                      "temperature": cfg.temperature, "kept_frozen": 0}
        self.batch_labels: list | None = None  # the batch's true positives: for the oracle only
        self._spread0: float | None = None
        self.gate_limit: float | None = None
        self.params: list[torch.nn.Parameter] = []
        self._initial: list[torch.Tensor] = []
        self._norms: NormStats | None = None
        try:  # from here on the tower changes: a failure gives it back before raising
            self.params = select_params(self.tower, cfg.params, cfg.last_k, cfg.lora_rank)
            self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            self._initial = [p.detach().clone() for p in self.params]
            self._norms = NormStats(self.tower, cfg.norm_stats, cfg.norm_prior)
            self.gate_limit = self._gate_limit()
            self.objective.setup(self)
        except BaseException:
            if self.tower is not None:
                self.close()
            raise

    # -- inputs and predictions ------------------------------------------------------
    def prepare(self, raw: Sequence[Any], index: int = 0) -> Batch:
        raw = list(raw)
        if not raw:
            raise InputError("adapt: a batch of size 0")
        return Batch(raw, self.encoder.prepare(raw, self.modality), index)

    def forward(self, inputs: Any) -> torch.Tensor:
        """Normalised query embeddings of prepared inputs, with the graph kept."""
        return F.normalize(self.encoder.forward(inputs, self.modality).float(), dim=-1)

    def candidates_mode(self, batch_size: int) -> str:
        if self.cfg.candidates != "auto":
            return self.cfg.candidates
        return "batch-nn" if batch_size >= 8 else "topk"

    def predict(self, q: torch.Tensor, guide: torch.Tensor | None = None) -> Predictions:
        """Query predictions of ``q``; with ``guide`` (B × d, e.g. the pipeline's fused
        embedding of the same queries) the candidates are the guide's and ``target`` holds
        the guide's logits over them."""
        with torch.no_grad():
            sims = (q.detach() if guide is None else guide) @ self.gallery.T
            nn_idx = sims.argmax(dim=1)
        nn_feat = self.gallery[nn_idx]
        mode = self.candidates_mode(len(q))
        if mode == "batch-nn":
            cand = nn_feat                                   # C × d, shared by the batch
        elif mode == "topk":
            cand = self.gallery[sims.topk(min(self.cfg.topk, len(self.gallery)), dim=1).indices]  # B × k × d
        else:
            cand = self.gallery

        def logits(x: torch.Tensor) -> torch.Tensor:
            s = x @ cand.T if cand.dim() == 2 else torch.einsum("bd,bkd->bk", x, cand)
            return s / self.cfg.temperature

        target = None
        if guide is not None:
            with torch.no_grad():
                target = logits(guide)
        return Predictions(q, logits(q), nn_idx, nn_feat, target)

    # -- the frozen gate -----------------------------------------------------------------
    def gate_confidence(self, q: torch.Tensor) -> torch.Tensor:
        """Per-row retrieval confidence of embeddings ``q`` over the gallery (``gate_confidence``;
        :func:`qshift.confidence.score_confidence`, the fusion stage's measure too)."""
        with torch.no_grad():
            trained = self.cfg.temperature / self.cfg.temperature_scale
            return score_confidence(q.float().to(self.device) @ self.gallery.T, self.cfg.gate_confidence, trained)

    def _gate_limit(self) -> float | None:
        """The ``frozen_gate`` quantile of the frozen model's confidence on the source texts."""
        if self.cfg.frozen_gate is None:
            return None
        if self.modality != "text":
            raise InputError(f"adapt: frozen_gate calibrates on source texts, so it needs text queries; "
                             f"direction {self.direction!r} queries with images")
        if not self.source_texts:
            raise InputError("adapt: frozen_gate needs source texts (clean queries disjoint from the test ones) "
                             "to set its confidence limit; give the benchmark a `source:` or the pipeline "
                             "`source_texts`")
        texts = self.source_texts[: self.cfg.gate_samples]
        with torch.no_grad():
            conf = torch.cat([self.gate_confidence(self.forward(self.encoder.prepare(texts[i:i + 256], self.modality)))
                              for i in range(0, len(texts), 256)])
        return float(torch.quantile(conf, self.cfg.frozen_gate))

    def gate(self, q: torch.Tensor, q0: torch.Tensor) -> torch.Tensor:
        """Rows whose frozen embedding ``q0`` is confident (≥ the gate's limit) keep ``q0``."""
        if self.gate_limit is None:
            return q
        keep = self.gate_confidence(q0) >= self.gate_limit
        self.stats["kept_frozen"] += int(keep.sum())
        return torch.where(keep[:, None].to(q.device), q0.to(q.device), q)

    # -- the online loop ----------------------------------------------------------------
    def step(self, batch: Batch, q0: torch.Tensor | None = None, guide: torch.Tensor | None = None) -> torch.Tensor:
        """Adapt on one batch and return its embeddings for ranking (B × d, no graph; see
        ``rank_with``). ``q0``: the frozen model's embeddings of the batch, when the caller
        has them (the pipeline's encode stage does; otherwise one more forward). ``guide``:
        embeddings the query predictions are read from instead of the batch's own
        (:meth:`predict`)."""
        if self.cfg.episodic:
            self.reset()
        self.tower.eval()  # no dropout; BatchNorm statistics as ``norm_stats`` says
        with torch.no_grad():
            q0 = self.forward(batch.inputs) if q0 is None else F.normalize(q0.float().to(self.device), dim=-1)
        if not torch.isfinite(q0).all():
            raise InputError(f"adapt: the frozen encoder gives non-finite embeddings for batch {batch.index} "
                             "(check the queries)")
        if guide is not None:
            guide = F.normalize(guide.float().to(self.device), dim=-1)
            if guide.shape != q0.shape or not torch.isfinite(guide).all():
                raise InputError(f"adapt: the guide of batch {batch.index} must be finite and shaped like the "
                                 f"batch's embeddings {tuple(q0.shape)}, got {tuple(guide.shape)}")
        if self._spread0 is None and len(q0) > 1:
            self._spread0 = float((q0 - q0.mean(0)).norm(dim=1).mean())
        diverged = False
        last = None  # the embeddings of the last step's forward, before its update
        for step in range(self.cfg.steps):
            with torch.enable_grad():
                pred = self.predict(self.forward(batch.inputs), guide)
                last = pred.q.detach()
                self.objective.learned = None
                loss = self.objective.loss(self, batch, pred, step)
                if step == 0:
                    self._record_share(len(q0))
                if loss is None or not loss.requires_grad:
                    break  # nothing to learn from this batch (e.g. no reliable query)
                if not torch.isfinite(loss):
                    diverged = True
                    break
                self.objective.update(self, batch, loss, step)
            if not all(torch.isfinite(p).all() for p in self.params):
                diverged = True
                break
        if self.cfg.rank_with == "last-step" and last is not None:
            q = last  # as Tent's and TCR's reference code rank: no forward after the last update
        else:
            with torch.no_grad():
                q = self.forward(batch.inputs)
        if diverged or not torch.isfinite(q).all():
            self.stats["divergences"] += 1
            warnings.warn(f"adapt ({self.objective.name}): diverged on batch {batch.index}; reset to the frozen "
                          "model", RuntimeWarning, stacklevel=2)
            self.reset()
            q = q0
        elif self._collapsed(q, batch.index):
            self.reset()
            q = q0
        else:
            q = self.gate(q, q0)
        self.stats["batches"] += 1
        self.stats["queries"] += len(q)
        return q

    def _collapsed(self, q: torch.Tensor, index: int) -> bool:
        """``reset_on_collapse``: the adapted queries' spread under ``collapse_ratio`` × the frozen one's."""
        if not (self.cfg.reset_on_collapse and self._spread0 and len(q) > 1):
            return False
        spread = float((q - q.mean(0)).norm(dim=1).mean())
        if spread >= self.cfg.collapse_ratio * self._spread0:
            return False
        self.stats["collapses"] += 1
        warnings.warn(f"adapt ({self.objective.name}): queries collapsed on batch {index} "
                      f"(spread {spread:.3f} < {self.cfg.collapse_ratio} × {self._spread0:.3f}); reset",
                      RuntimeWarning, stacklevel=3)
        return True

    def _record_share(self, n: int) -> None:
        """Running mean over batches of the share of queries the loss learnt from."""
        learned = self.objective.learned
        share = 1.0 if learned is None else float(torch.as_tensor(learned, dtype=torch.float32).mean())
        b = self.stats["batches"]
        self.stats["learning_share"] = (self.stats["learning_share"] * b + share) / (b + 1)

    def adapt(self, queries: Sequence[Any], frozen: np.ndarray | None = None, index: int = 0,
              guide: np.ndarray | None = None) -> np.ndarray:
        """Adapt on a batch of raw queries; their adapted embeddings (B × d float32)."""
        q0 = None if frozen is None else torch.from_numpy(np.ascontiguousarray(frozen, dtype=np.float32))
        g = None if guide is None else torch.from_numpy(np.ascontiguousarray(guide, dtype=np.float32))
        return self.step(self.prepare(queries, index), q0, g).cpu().numpy().astype(np.float32)

    def embed(self, queries: Sequence[Any], frozen: np.ndarray | None = None) -> np.ndarray:
        """Embeddings of ``queries`` by the tower as adapted so far (no step taken). With
        ``frozen`` (the frozen model's embeddings of the same queries) the frozen gate, if
        any, applies as it does along the stream."""
        with torch.no_grad():
            q = self.forward(self.encoder.prepare(list(queries), self.modality))
            if frozen is not None:
                q = self.gate(q, torch.from_numpy(np.ascontiguousarray(frozen, dtype=np.float32)))
        return q.cpu().numpy().astype(np.float32)

    def reset(self) -> None:
        """Back to the frozen model: initial parameters, fresh optimizer, objective state."""
        self._live = None
        with torch.no_grad():
            for p, p0 in zip(self.params, self._initial):
                p.copy_(p0)
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.objective.reset()
        self.stats["resets"] += 1

    # -- sharing the encoder ------------------------------------------------------------
    def suspend(self) -> None:
        """Put the frozen values back into the tower and keep the adapted ones aside, so
        that other users of the same encoder object see it unadapted (the service runs
        several pipelines on one encoder); :meth:`resume` swaps them back in."""
        if getattr(self, "_live", None) is None:
            self._live = [p.detach().clone() for p in self.params]
            with torch.no_grad():
                for p, p0 in zip(self.params, self._initial):
                    p.copy_(p0)

    def resume(self) -> None:
        live = getattr(self, "_live", None)
        if live is not None:
            with torch.no_grad():
                for p, v in zip(self.params, live):
                    p.copy_(v)
            self._live = None

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        live = getattr(self, "_live", None)
        return {"params": [p.detach().cpu().clone() for p in (live if live is not None else self.params)],
                "optimizer": self.optimizer.state_dict(), "objective": self.objective.state_dict(),
                "stats": dict(self.stats), "spread0": self._spread0, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.resume()
        params = state["params"]
        if len(params) != len(self.params) or any(a.shape != b.shape for a, b in zip(params, self.params)):
            raise StoreMismatchError("adapt: the saved parameters do not fit this tower "
                                     f"({len(params)} tensors saved, {len(self.params)} here)")
        with torch.no_grad():
            for p, v in zip(self.params, params):
                p.copy_(v.to(p.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.objective.load_state_dict(state["objective"])
        self.stats = {"queries": 0, "kept_frozen": 0, **state["stats"]}
        self._spread0 = state["spread0"]
        self.generator.set_state(state["generator"])

    def close(self) -> None:
        """Restore the tower exactly as it was before adaptation."""
        self._live = None
        with torch.no_grad():
            for p, p0 in zip(self.params, self._initial):
                p.copy_(p0)
        if self.cfg.params == "lora":
            from qshift.adapt.params import remove_lora

            remove_lora(self.tower)
        self._flags.restore_flags(self.tower)
        if self._norms is not None:
            self._norms.restore()
        self._flags.restore_modes(self.tower)


class NormStats:
    """Which statistics the tower's BatchNorm layers normalise with during adaptation.

    ``running`` (default): the stored running statistics, so that batches of 1 and
    all-OOD batches behave like any other (only the affine parameters adapt). ``batch``:
    each test batch's own statistics, Tent's choice for BN networks (running statistics
    dropped while adapting). ``blend``: the prior-weighted mix of Schneider et al.
    (NeurIPS 2020), μ = (N μ_run + B μ_batch) / (N + B) with N = ``norm_prior``. The
    original buffers come back on ``restore``.
    """

    def __init__(self, tower: torch.nn.Module | None, mode: str, prior: float) -> None:
        self.mode, self.prior = mode, prior
        self.layers = [] if tower is None or mode == "running" else \
            [m for m in tower.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        self.saved = [(m.running_mean, m.running_var, m.track_running_stats) for m in self.layers]
        self.hooks = []
        for m, (mean, var, _) in zip(self.layers, self.saved):
            if mode == "batch":
                m.track_running_stats = False
                m.running_mean = m.running_var = None  # F.batch_norm then uses the batch's statistics
            else:
                self.hooks.append(m.register_forward_pre_hook(self._blend(mean.clone(), var.clone())))

    def _blend(self, mean0: torch.Tensor, var0: torch.Tensor) -> Any:
        def hook(m: torch.nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach()
            dims = [d for d in range(x.ndim) if d != 1]
            b = x.shape[0]
            w = self.prior / (self.prior + b)
            m.running_mean = w * mean0 + (1 - w) * x.mean(dims)
            m.running_var = w * var0 + (1 - w) * x.var(dims, unbiased=False)
        return hook

    def restore(self) -> None:
        for h in self.hooks:
            h.remove()
        for m, (mean, var, track) in zip(self.layers, self.saved):
            m.running_mean, m.running_var, m.track_running_stats = mean, var, track
        self.layers, self.hooks = [], []


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy of softmax(logits)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
