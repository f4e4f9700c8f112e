"""EATA (Niu et al., "Efficient Test-Time Model Adaptation without Forgetting",
ICML 2022): entropy minimisation on reliable, non-redundant queries with an
anti-forgetting Fisher regulariser.

* Reliable (Eq. 6): H < e_margin = 0.4 ln C (the paper's 0.4 ln 1000 for ImageNet,
  scaled to the C candidates of a query prediction).
* Non-redundant (Eq. 8): cosine between the query's prediction and the moving average
  of past reliable predictions below d_margin. Judged on the prediction over the whole
  gallery, because the candidate columns change from batch to batch.
* Weight (Eq. 10): S(x) = 1 / exp(H − e_margin).
* Anti-forgetting (Eq. 9): λ Σ_i F_i (θ_i − θ_i⁰)². The Fisher information comes from
  the clean source texts when there are any (the paper uses in-distribution samples),
  else from the first batch.
"""

from __future__ import annotations

import math

import torch

from qshift.adapt.engine import Adapter, Batch, Objective, Predictions, register_objective, softmax_entropy


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
            texts = adapter.source_texts[: self.fisher_samples]
            self._fisher(adapter, adapter.prepare(texts))

    def _fisher(self, adapter: Adapter, batch: Batch) -> None:
        adapter.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            pred = adapter.predict(adapter.forward(batch.inputs))
            softmax_entropy(pred.logits).mean().backward()
        self.fisher = [(p.grad.detach() ** 2 if p.grad is not None else torch.zeros_like(p)) for p in adapter.params]
        adapter.optimizer.zero_grad(set_to_none=True)

    def loss(self, adapter: Adapter, batch: Batch, pred: Predictions, step: int) -> torch.Tensor:
        if self.fisher is None:
            self._fisher(adapter, batch)
            pred = adapter.predict(adapter.forward(batch.inputs))
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
