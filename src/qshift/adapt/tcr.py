"""TCR (Li et al., "Test-time adaptation for cross-modal retrieval with query shift",
ICLR 2025): the query-shift-robust objective REST builds on.

With each query's nearest gallery item as its candidate and logits = q·c / τ over the
batch's candidates:

* **Source-like pairs** (§3.2): a query–candidate pair is source-like when its gap is
  small relative to the spread of the queries and of the candidates,
  s_i = 2‖q_i − c_i‖ − ‖q_i − q̄‖ − ‖c_i − c̄‖ (smaller = more source-like). During the
  first ``fill_batches`` batches the ``ratio`` share of each batch with the smallest s
  enters a queue of at most ``queue_size`` pairs (the smallest s are kept); each entry
  stores the pair and its prediction entropy.
* **Noise-robust entropy** (Eq. 4): the threshold E* is the largest entropy in the
  queue; queries with H > E* are dropped, the others weighted by max(0, 1 − H / E*).
* **Query uniformity** (Eq. 9 of REST): mean exp(−t‖q_i − q̄‖), t = 0.1, pushes the
  queries away from their centre.
* **Modality gap** (Eq. 6): (‖q̄ − c̄‖ − Δ_S)², where Δ_S is the gap between the mean
  query and mean candidate of the queued source-like pairs.

Beyond the paper (its open questions, documented choices):

* **Batch size 1** — batch statistics do not exist, so the centres q̄ and c̄ are an
  exponential moving average (momentum ``ema``) of past batches blended with the
  current one, and candidates fall back to each query's top-k (engine ``auto``).
* **All-OOD streams** — a pair only enters the queue when its s is no larger than the
  ``anchor_quantile`` of s over *source anchors*: the gallery's own clean paired texts
  (T2I/T2T) run through the frozen model once at set-up. A batch with no such pair is
  counted as all-OOD (``stats['ood_batches']``) and leaves the queue untouched; while
  the queue is empty the anchors stand in for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qshift.adapt.engine import Adapter, Batch, Objective, Predictions, register_objective, softmax_entropy


def source_likeness(q: torch.Tensor, c: torch.Tensor, q_center: torch.Tensor | None = None,
                    c_center: torch.Tensor | None = None) -> torch.Tensor:
    """s_i = 2‖q_i − c_i‖ − ‖q_i − q̄‖ − ‖c_i − c̄‖ (TCR §3.2; smaller is more source-like)."""
    qc = q.mean(0) if q_center is None else q_center
    cc = c.mean(0) if c_center is None else c_center
    return 2 * (q - c).norm(dim=1) - (q - qc).norm(dim=1) - (c - cc).norm(dim=1)


def modality_gap(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """‖mean(q) − mean(c)‖ over L2-normalised features."""
    return (torch.nn.functional.normalize(q, dim=-1).mean(0) - torch.nn.functional.normalize(c, dim=-1).mean(0)).norm()


@dataclass
class Queue:
    size: int
    score: list[float] = field(default_factory=list)
    q: list[torch.Tensor] = field(default_factory=list)
    c: list[torch.Tensor] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    raw: list[object] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.score)

    def add(self, score: torch.Tensor, q: torch.Tensor, c: torch.Tensor, ent: torch.Tensor, raw: list) -> None:
        for i in range(len(score)):
            self.score.append(float(score[i]))
            self.q.append(q[i].detach())
            self.c.append(c[i].detach())
            self.entropy.append(float(ent[i]))
            self.raw.append(raw[i])
        if len(self.score) > self.size:  # keep the most source-like
            keep = sorted(range(len(self.score)), key=self.score.__getitem__)[: self.size]
            for name in ("score", "q", "c", "entropy", "raw"):
                vals = getattr(self, name)
                setattr(self, name, [vals[i] for i in keep])

    def margin(self) -> torch.Tensor:
        return modality_gap(torch.stack(self.q), torch.stack(self.c))

    def state_dict(self) -> dict:
        return {"size": self.size, "score": list(self.score), "entropy": list(self.entropy),
                "q": torch.stack(self.q) if self.q else None, "c": torch.stack(self.c) if self.c else None,
                "raw": [raw_to_state(r) for r in self.raw]}

    @classmethod
    def from_state(cls, state: dict | None) -> "Queue | None":
        if state is None:
            return None
        n = len(state["score"])
        return cls(state["size"], list(state["score"]), [state["q"][i] for i in range(n)],
                   [state["c"][i] for i in range(n)], list(state["entropy"]),
                   [raw_from_state(r) for r in state["raw"]])

    def threshold(self) -> float:
        return max(self.entropy)


def raw_to_state(item: object) -> object:
    """A queued query in a form ``torch.load(weights_only=True)`` reads back: texts and
    paths as strings, images as uint8 tensors."""
    import numpy as np
    from PIL import Image

    if isinstance(item, Image.Image):
        return torch.from_numpy(np.asarray(item.convert("RGB"), dtype=np.uint8).copy())
    if isinstance(item, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(item))
    return str(item)


def raw_from_state(item: object) -> object:
    return item.numpy() if isinstance(item, torch.Tensor) else item


@register_objective("tcr")
class TCR(Objective):
    name = "tcr"

    def __init__(self, ratio: float = 0.3, queue_size: int = 64, fill_batches: int = 10, t: float = 0.1,
                 ema: float = 0.9, small_batch: int = 8, anchors: int = 256, anchor_quantile: float = 0.9,
                 use_entropy: bool = True, use_uniformity: bool = True, use_gap: bool = True) -> None:
        self.ratio, self.queue_size, self.fill_batches, self.t = ratio, queue_size, fill_batches, t
        self.ema, self.small_batch, self.n_anchors, self.anchor_quantile = ema, small_batch, anchors, anchor_quantile
        self.use_entropy, self.use_uniformity, self.use_gap = use_entropy, use_uniformity, use_gap
        self.anchor_queue: Queue | None = None
        self.anchor_limit: float | None = None
        self.reset()

    def reset(self) -> None:
        self.queue = Queue(self.queue_size)
        anchors = getattr(self, "_anchor_centers", None)
        self.q_center: torch.Tensor | None = anchors[0] if anchors else None
        self.c_center: torch.Tensor | None = anchors[1] if anchors else None
        self.seen_batches = 0
        self.ood_batches = 0

    # -- set-up: source anchors ---------------------------------------------------------
    def setup(self, adapter: Adapter) -> None:
        if not adapter.source_texts or adapter.modality != "text":
            return
        texts = adapter.source_texts[: self.n_anchors]
        with torch.no_grad():
            q = adapter.forward(adapter.prepare(texts).inputs)
            pred = adapter.predict(q)
            c = pred.nn_feat
            # s depends on the batch its centres come from: score the anchors in chunks of the
            # stream's batch size (or, for small batches, against the anchor-set centres,
            # which also start the moving averages)
            self._anchor_centers = (q.mean(0), c.mean(0))
            bs = adapter.cfg.batch_size if adapter.cfg.batch_size >= self.small_batch else len(q)
            s = torch.cat([source_likeness(q[i:i + bs], c[i:i + bs],
                                           None if bs >= self.small_batch else self._anchor_centers[0],
                                           None if bs >= self.small_batch else self._anchor_centers[1])
                           for i in range(0, len(q), bs)])
            ent = softmax_entropy((q @ c.T) / adapter.cfg.temperature)
        self.anchor_limit = float(torch.quantile(s, self.anchor_quantile))
        self.anchor_queue = Queue(self.queue_size)
        best = s.argsort()[: self.queue_size]
        self.anchor_queue.add(s[best], q[best], c[best], ent[best], [texts[int(i)] for i in best])
        self.q_center, self.c_center = self._anchor_centers

    def reference(self) -> Queue | None:
        """The queue of source-like pairs, or the anchors while it is empty."""
        return self.queue if len(self.queue) else self.anchor_queue

    # -- centres that survive batch size 1 -------------------------------------------------
    def centers(self, q: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(q) >= self.small_batch or self.q_center is None:
            return q.mean(0), c.mean(0)
        a = self.ema
        return a * self.q_center + (1 - a) * q.mean(0), a * self.c_center + (1 - a) * c.mean(0)

    def _track(self, q: torch.Tensor, c: torch.Tensor) -> None:
        qm, cm = q.detach().mean(0), c.detach().mean(0)
        if self.q_center is None:
            self.q_center, self.c_center = qm, cm
        else:
            self.q_center = self.ema * self.q_center + (1 - self.ema) * qm
            self.c_center = self.ema * self.c_center + (1 - self.ema) * cm

    def observe(self, adapter: Adapter, batch: Batch, pred: Predictions) -> None:
        """Step 0 of a batch: update the source-like queue (first batches only) and centres."""
        q, c = pred.q.detach(), pred.nn_feat
        qc, cc = self.centers(q, c)
        s = source_likeness(q, c, qc, cc)
        if self.seen_batches < self.fill_batches:
            n = max(1, int(self.ratio * len(q)))
            pick = s.argsort()[:n]
            if self.anchor_limit is not None:
                pick = pick[s[pick] <= self.anchor_limit]
            if len(pick) == 0:
                self.ood_batches += 1
                adapter.stats["ood_batches"] = self.ood_batches
            else:
                ent = softmax_entropy(pred.logits.detach())
                self.queue.add(s[pick], q[pick], c[pick], ent[pick], [batch.raw[int(i)] for i in pick])
        self.seen_batches += 1
        self._track(q, c)

    # -- the objective ------------------------------------------------------------------------
    def terms(self, adapter: Adapter, batch: Batch, pred: Predictions, step: int) -> dict[str, torch.Tensor]:
        if step == 0:
            self.observe(adapter, batch, pred)
        ref = self.reference()
        q, c = pred.q, pred.nn_feat
        out: dict[str, torch.Tensor] = {}
        ent = softmax_entropy(pred.logits)
        if self.use_entropy and ref is not None and len(ref):
            thr = ref.threshold() + 1e-3
            w = (1 - ent.detach() / thr).clamp_min(0)                   # Eq. 4: noise-robust weights
            keep = ent.detach() <= thr
            self.learned = keep & (w > 0)                               # the queries the entropy term weighs
            out["entropy"] = (ent * w)[keep].mean() if keep.any() else ent.sum() * 0.0
        elif self.use_entropy:
            out["entropy"] = ent.mean()
        qc, cc = self.centers(q, c)
        if self.use_uniformity:
            out["uniformity"] = torch.exp(-self.t * (q - qc).norm(dim=1)).mean()  # Eq. 9
        if self.use_gap and ref is not None and len(ref):
            gap = (qc - cc).norm() if len(q) < self.small_batch else modality_gap(q, c)
            out["gap"] = (gap - ref.margin()) ** 2                      # Eq. 6
        return out

    def loss(self, adapter: Adapter, batch: Batch, pred: Predictions, step: int) -> torch.Tensor:
        terms = self.terms(adapter, batch, pred, step)
        return sum(terms.values()) if terms else pred.q.sum() * 0.0

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"queue": self.queue.state_dict(), "q_center": self.q_center, "c_center": self.c_center,
                "seen_batches": self.seen_batches, "ood_batches": self.ood_batches,
                "anchor_queue": None if self.anchor_queue is None else self.anchor_queue.state_dict(),
                "anchor_limit": self.anchor_limit, "anchor_centers": getattr(self, "_anchor_centers", None)}

    def load_state_dict(self, state: dict) -> None:
        self.queue = Queue.from_state(state["queue"])
        self.q_center, self.c_center = state["q_center"], state["c_center"]
        self.seen_batches, self.ood_batches = state["seen_batches"], state["ood_batches"]
        self.anchor_queue = Queue.from_state(state["anchor_queue"])
        self.anchor_limit = state["anchor_limit"]
        if state["anchor_centers"] is not None:
            self._anchor_centers = tuple(state["anchor_centers"])
