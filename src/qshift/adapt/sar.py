"""SAR (Niu et al., "Towards Stable Test-Time Adaptation in Dynamic Wild World",
ICLR 2023): entropy of reliable queries (H < e₀ = 0.4 ln C, Eq. 2), minimised with a
sharpness-aware update (SAM, ρ = 0.05, Eq. 5) whose reliable set is re-filtered after
the ascent step, and model recovery when the moving average of that loss falls below
0.2 (Sec. 4.3)."""

from __future__ import annotations

import math

import torch

from qshift.adapt.engine import Adapter, Batch, Objective, Predictions, register_objective, softmax_entropy


@register_objective("sar")
class SAR(Objective):
    name = "sar"

    def __init__(self, e0: float = 0.4, rho: float = 0.05, reset_constant: float = 0.2) -> None:
        self.e0, self.rho, self.reset_constant = e0, rho, reset_constant
        self.ema: float | None = None

    def loss(self, adapter: Adapter, batch: Batch, pred: Predictions, step: int) -> torch.Tensor:
        ent = softmax_entropy(pred.logits)
        self._margin = self.e0 * math.log(pred.logits.shape[1])
        keep = ent < self._margin                                      # SAR Eq. 2: reliable entropy
        self.learned = keep
        return ent[keep].mean() if keep.any() else ent.sum() * 0.0

    def update(self, adapter: Adapter, batch: Batch, loss: torch.Tensor, step: int) -> None:
        opt = adapter.optimizer
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in adapter.params]
        norm = torch.norm(torch.stack([g.norm() for g in grads if g is not None])) if any(
            g is not None for g in grads) else torch.tensor(0.0)
        eps = []
        with torch.no_grad():                                          # SAM ascent: θ + ρ g / ‖g‖ (Eq. 5)
            for p, g in zip(adapter.params, grads):
                e = torch.zeros_like(p) if g is None else self.rho * g / (norm + 1e-12)
                p.add_(e)
                eps.append(e)
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            ent2 = softmax_entropy(adapter.predict(adapter.forward(batch.inputs)).logits)
            keep = ent2 < self._margin                                 # re-filter after the ascent
            loss2 = ent2[keep].mean() if keep.any() else None
            if loss2 is not None:
                loss2.backward()
        with torch.no_grad():
            for p, e in zip(adapter.params, eps):
                p.sub_(e)
        if loss2 is not None:
            opt.step()                                                 # descent with the gradient at θ + ε
            value = float(loss2.detach())
            self.ema = value if self.ema is None else 0.9 * self.ema + 0.1 * value
            if self.ema < self.reset_constant:                         # model recovery (Sec. 4.3)
                adapter.reset()
                adapter.stats["recoveries"] = adapter.stats.get("recoveries", 0) + 1
        opt.zero_grad(set_to_none=True)

    def reset(self) -> None:
        self.ema = None

    def state_dict(self) -> dict:
        return {"ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        self.ema = state["ema"]
