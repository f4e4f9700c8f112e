"""EATA (Niu et al., "Efficient Test-Time Model Adaptation without Forgetting",
ICML 2022): entropy minimisation on reliable, non-redundant queries with an
anti-forgetting Fisher regulariser.

* Reliable (Eq. 6): H < e_margin = 0.4 ln C (the paper's 0.4 ln 1000 for ImageNet,
  scaled to the C candidates of a query prediction).
* Non-redundant (Eq. 8): cosine between the query's prediction and the moving average
  of past reliable predictions below d_margin. Judged on the prediction over the whole
  gallery, because the candidate columns change from batch to batch.
* Weight (Eq. 10): S(x) = 1 / exp(H − e_margin).
* Anti-forgetting (Eq. 9): λ Σ_i F_i (θ_i − θ_i⁰)², with the diagonal Fisher
  information as EATA's code computes it: the source samples in batches (the stream's
  batch size), the gradient of the cross-entropy of each batch's predictions against
  their own arg-max (pseudo-labels), squared, averaged over the batches. The source
  samples are the clean source texts when there are any (the paper uses 2,000
  in-distribution images; at most ``fisher_samples`` here), else the stream's first
  batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qshift.adapt.engine import Adapter, Batch, Objective, Predictions, register_objective, softmax_entropy


def fisher_information(adapter: Adapter, queries: list) -> list[torch.Tensor]:
    """Diagonal Fisher of the adapted parameters: mean over batches of the squared
    gradient of CE(logits, arg-max logits) (EATA's ``compute_fishers``)."""
    total = [torch.zeros_like(p) for p in adapter.params]
    bs, n = adapter.cfg.batch_size, 0
    for start in range(0, len(queries), bs):
        batch = adapter.prepare(queries[start:start + bs])
        with torch.enable_grad():
            logits = adapter.predict(adapter.forward(batch.inputs)).logits
            loss = F.cross_entropy(logits, logits.detach().argmax(1))
            grads = torch.autograd.grad(loss, adapter.params, allow_unused=True)
        total = [t + (g.detach() ** 2 if g is not None else 0) for t, g in zip(total, grads)]
        n += 1
    return [t / max(n, 1) for t in total]


@register_objective("eata")
class EATA(Objective):
    name = "eata"

    def __init__(self, e_margin: float = 0.4, d_margin: float = 0.05, fisher_alpha: float = 2000.0,
                 fisher_samples: int = 256) -> None:
        self.e_margin, self.d_margin, self.fisher_alpha, self.fisher_samples = e_margin, d_margin, fisher_alpha, fisher_samples
        self.mean_prob: torch.Tensor | None = None
        self.fisher: list[torch.Tensor] | None = None

    def setup(self, adapter: Adapter) -> None:
        if adapter.source_texts and adapter.modality == "text":
            self.fisher = fisher_information(adapter, adapter.source_texts[: self.fisher_samples])

    def loss(self, adapter: Adapter, batch: Batch, pred: Predictions, step: int) -> torch.Tensor:
        if self.fisher is None:
            self.fisher = fisher_information(adapter, batch.raw)
        ent = softmax_entropy(pred.logits)
        margin = self.e_margin * math.log(pred.logits.shape[1])
        keep = ent < margin                                           # EATA Eq. 6: reliable
        with torch.no_grad():
            p_full = ((pred.q.detach() @ adapter.gallery.T) / adapter.cfg.temperature).softmax(1)
        if self.mean_prob is not None:
            cos = torch.nn.functional.cosine_similarity(self.mean_prob[None], p_full, dim=1)
            keep &= cos < self.d_margin                               # Eq. 8: non-redundant
        if keep.any() and step == 0:
            new = p_full[keep].mean(0)
            self.mean_prob = new if self.mean_prob is None else 0.9 * self.mean_prob + 0.1 * new
        self.learned = keep
        weight = torch.exp(-(ent.detach() - margin))                  # Eq. 10: S(x) = 1 / exp(E − E0)
        loss = (ent * weight)[keep].sum() / max(1, int(keep.sum())) if keep.any() else ent.sum() * 0.0
        reg = sum(((f * (p - p0) ** 2).sum() for f, p, p0 in zip(self.fisher, adapter.params, adapter._initial)))
        return loss + self.fisher_alpha * reg                          # Eq. 9: anti-forgetting

    def reset(self) -> None:
        self.mean_prob = None

    def state_dict(self) -> dict:
        return {"mean_prob": self.mean_prob, "fisher": self.fisher}

    def load_state_dict(self, state: dict) -> None:
        self.mean_prob, self.fisher = state["mean_prob"], state["fisher"]
