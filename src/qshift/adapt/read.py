"""READ (Yang et al., "Test-time adaptation against multi-modal reliability bias",
ICLR 2024), as the TCR authors' code applies it to retrieval: a reliability-aware loss
Σ p_max (1 − log p_max + log γ) with γ = e⁻¹, minus the entropy of the batch's summed
predictions (a balance term that keeps the batch from collapsing onto one item)."""

from __future__ import annotations

import math

import torch

from qshift.adapt.engine import Adapter, Batch, Objective, Predictions, register_objective


@register_objective("read")
class READ(Objective):
    name = "read"

    def __init__(self, gamma: float = math.exp(-1)) -> None:
        self.gamma = gamma

    def loss(self, adapter: Adapter, batch: Batch, pred: Predictions, step: int) -> torch.Tensor:
        probs = pred.logits.softmax(1)
        p_sum = probs.sum(0)
        balance = -(p_sum.softmax(0) * p_sum.log_softmax(0)).sum()      # H(softmax(Σ_i p_i))
        p_max = probs.max(1).values.clamp_min(1e-12)
        reliable = (p_max * (1 - p_max.log() + math.log(self.gamma))).mean()  # READ Eq. 5
        return reliable - balance
