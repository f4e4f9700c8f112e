"""The online test-time adaptation engine shared by every method.

Queries arrive in batches. For each batch the engine runs ``steps`` forward+update
passes of the query tower (only the selected parameters move; the gallery embeddings
stay fixed), then ranks the batch with the adapted tower. Methods differ only in their
objective (:mod:`.objectives`, :mod:`.tcr`, :mod:`.rest`).

**Query predictions** (REST §III-A, "refining the retrieval results into query
predictions"): a recognition-style loss needs a distribution per query, so each query's
candidates come from the gallery —

* ``batch-nn`` (TCR/REST): every query's nearest gallery item; the logits of query i
  are its similarities to the B candidates of the batch, divided by τ (B × B);
* ``topk``: each query's own k nearest gallery items (B × k);
* ``gallery``: the whole gallery (B × N), as TCR's code feeds the classic baselines;
* ``auto``: ``batch-nn`` for batches of ≥ 8 queries, else ``topk`` (a 1 × 1 prediction
  carries no signal).

Safety: a non-finite loss, parameter or score resets the tower to its initial state
with a warning and the batch is ranked by the frozen model — scores are never NaN.
``episodic`` resets after every batch; ``reset_on_collapse`` resets when the spread of
the adapted queries falls under ``collapse_ratio`` × the spread of the frozen ones.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from qshift.data.images import load_image
from qshift.errors import InputError, StoreMismatchError
from qshift.progress import progress_bar
from qshift.adapt.params import select_params

CANDIDATES = ("auto", "batch-nn", "topk", "gallery")


@dataclass
class AdaptConfig:
    method: str = "tcr"
    params: str = "norm"          # norm | last-k | lora
    last_k: int = 1
    lora_rank: int = 4
    lr: float = 3e-4
    weight_decay: float = 1e-4
    steps: int = 3
    batch_size: int = 64
    temperature: float = 0.02     # τ of the query predictions
    candidates: str = "auto"
    topk: int = 16
    episodic: bool = False
    reset_on_collapse: bool = True
    collapse_ratio: float = 0.25
    seed: int = 0
    options: dict = field(default_factory=dict)  # the objective's own settings

    def __post_init__(self) -> None:
        if not (0 < self.lr < 1):
            raise InputError(f"adapt: lr must be in (0, 1), got {self.lr}")
        if not (1 <= self.steps <= 100):
            raise InputError(f"adapt: steps must be in 1–100, got {self.steps}")
        if self.batch_size < 1:
            raise InputError(f"adapt: batch_size must be >= 1, got {self.batch_size}")
        if not self.temperature > 0:
            raise InputError(f"adapt: temperature must be > 0, got {self.temperature}")
        if self.candidates not in CANDIDATES:
            raise InputError(f"adapt: candidates must be one of {', '.join(CANDIDATES)}, got {self.candidates!r}")
        if self.topk < 2:
            raise InputError(f"adapt: topk must be >= 2, got {self.topk}")
        if self.weight_decay < 0:
            raise InputError(f"adapt: weight_decay must be >= 0, got {self.weight_decay}")


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


class Objective:
    """A method: a loss over query predictions, plus optional set-up and update hooks."""

    name = "objective"

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


class Adapter:
    """Wraps an encoder's query tower; ``run`` adapts over a stream and returns scores."""

    def __init__(self, encoder: Any, gallery: np.ndarray, direction: str, cfg: AdaptConfig,
                 objective: Objective, *, source_texts: Sequence[str] | None = None,
                 gallery_fingerprint: str | None = None) -> None:
        if direction not in ("t2i", "i2t", "t2t"):
            raise InputError(f"adapt: unknown direction {direction!r}")
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
        self.encoder, self.direction, self.cfg, self.objective = encoder, direction, cfg, objective
        self.modality = "image" if direction == "i2t" else "text"
        self.tower = encoder.image_tower if self.modality == "image" else encoder.text_tower
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.params = select_params(self.tower, cfg.params, cfg.last_k, cfg.lora_rank)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self._initial = [p.detach().clone() for p in self.params]
        self.gallery = F.normalize(torch.from_numpy(gallery), dim=-1)
        self.source_texts = list(source_texts) if source_texts is not None else None
        self.stats = {"batches": 0, "resets": 0, "divergences": 0, "collapses": 0}
        self._spread0: float | None = None
        self.objective.setup(self)

    # -- inputs and predictions ------------------------------------------------------
    def prepare(self, raw: Sequence[Any], index: int = 0) -> Batch:
        raw = list(raw)
        if not raw:
            raise InputError("adapt: a batch of size 0")
        if self.modality == "text":
            from qshift.encoders.base import check_texts

            return Batch(raw, self.encoder.tokenize(check_texts(raw)), index)
        return Batch(raw, self.encoder.preprocess([load_image(x) for x in raw]), index)

    def forward(self, inputs: Any) -> torch.Tensor:
        """Normalised query embeddings of prepared inputs, with the graph kept."""
        out = self.encoder.image_forward(inputs) if self.modality == "image" else self.encoder.text_forward(inputs)
        return F.normalize(out.float(), dim=-1)

    def candidates_mode(self, batch_size: int) -> str:
        if self.cfg.candidates != "auto":
            return self.cfg.candidates
        return "batch-nn" if batch_size >= 8 else "topk"

    def predict(self, q: torch.Tensor) -> Predictions:
        with torch.no_grad():
            sims = q.detach() @ self.gallery.T
            nn_idx = sims.argmax(dim=1)
        nn_feat = self.gallery[nn_idx]
        mode = self.candidates_mode(len(q))
        if mode == "batch-nn":
            logits = q @ nn_feat.T
        elif mode == "topk":
            k = min(self.cfg.topk, len(self.gallery))
            idx = sims.topk(k, dim=1).indices
            logits = torch.einsum("bd,bkd->bk", q, self.gallery[idx])
        else:
            logits = q @ self.gallery.T
        return Predictions(q, logits / self.cfg.temperature, nn_idx, nn_feat)

    # -- the online loop ----------------------------------------------------------------
    def adapt_batch(self, batch: Batch) -> np.ndarray:
        """Adapt on one batch, then score it against the gallery (B × N, float32)."""
        if self.cfg.episodic:
            self.reset()
        self.tower.eval()  # no dropout; norm layers use their affine parameters only
        with torch.no_grad():
            q0 = self.forward(batch.inputs)
        if not torch.isfinite(q0).all():
            raise InputError(f"adapt: the frozen encoder gives non-finite embeddings for batch {batch.index} "
                             "(check the queries)")
        if self._spread0 is None and len(q0) > 1:
            self._spread0 = float((q0 - q0.mean(0)).norm(dim=1).mean())
        diverged = False
        for step in range(self.cfg.steps):
            with torch.enable_grad():
                pred = self.predict(self.forward(batch.inputs))
                loss = self.objective.loss(self, batch, pred, step)
                if loss is None or not loss.requires_grad:
                    break  # nothing to learn from this batch (e.g. no reliable query)
                if not torch.isfinite(loss):
                    diverged = True
                    break
                self.objective.update(self, batch, loss, step)
            if not all(torch.isfinite(p).all() for p in self.params):
                diverged = True
                break
        with torch.no_grad():
            q = self.forward(batch.inputs)
            scores = q @ self.gallery.T
        if diverged or not torch.isfinite(scores).all():
            self.stats["divergences"] += 1
            warnings.warn(f"adapt ({self.objective.name}): diverged on batch {batch.index}; reset to the frozen "
                          "model", RuntimeWarning, stacklevel=2)
            self.reset()
            scores = q0 @ self.gallery.T
        elif self.cfg.reset_on_collapse and self._spread0 and len(q) > 1:
            spread = float((q - q.mean(0)).norm(dim=1).mean())
            if spread < self.cfg.collapse_ratio * self._spread0:
                self.stats["collapses"] += 1
                warnings.warn(f"adapt ({self.objective.name}): queries collapsed on batch {batch.index} "
                              f"(spread {spread:.3f} < {self.cfg.collapse_ratio} × {self._spread0:.3f}); reset",
                              RuntimeWarning, stacklevel=2)
                self.reset()
                scores = q0 @ self.gallery.T
        self.stats["batches"] += 1
        return scores.numpy().astype(np.float32)

    def run(self, queries: Sequence[Any], order: Sequence[int] | None = None, progress: bool = False) -> np.ndarray:
        """Scores (Q × N, rows in the original order) after adapting along ``order``."""
        n = len(queries)
        if n == 0:
            raise InputError("adapt: no queries")
        order = np.arange(n) if order is None else np.asarray(order)
        if sorted(order.tolist()) != list(range(n)):
            raise InputError("adapt: order must be a permutation of the query indices")
        out = np.empty((n, len(self.gallery)), np.float32)
        bs = self.cfg.batch_size
        with progress_bar(f"adapt ({self.objective.name})", n, progress) as bar:
            for b, start in enumerate(range(0, n, bs)):
                idx = order[start:start + bs]
                out[idx] = self.adapt_batch(self.prepare([queries[i] for i in idx], b))
                bar.advance(len(idx))
        return out

    def reset(self) -> None:
        """Back to the frozen model: initial parameters, fresh optimizer, objective state."""
        with torch.no_grad():
            for p, p0 in zip(self.params, self._initial):
                p.copy_(p0)
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.objective.reset()
        self.stats["resets"] += 1

    def close(self) -> None:
        """Restore the tower to its initial state (and remove LoRA updates)."""
        with torch.no_grad():
            for p, p0 in zip(self.params, self._initial):
                p.copy_(p0)
        if self.cfg.params == "lora":
            from qshift.adapt.params import remove_lora

            remove_lora(self.tower)
        for p in self.tower.parameters():
            p.requires_grad_(True)


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy of softmax(logits)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
