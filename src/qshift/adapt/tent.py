"""Tent (Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization",
ICLR 2021), in the query-prediction form: minimise the entropy of each query's
distribution over its gallery candidates (engine ``predict``)."""

from __future__ import annotations

import torch

from qshift.adapt.engine import Adapter, Batch, Objective, Predictions, register_objective, softmax_entropy


@register_objective("tent")
class Tent(Objective):
    name = "tent"

    def loss(self, adapter: Adapter, batch: Batch, pred: Predictions, step: int) -> torch.Tensor:
        return softmax_entropy(pred.logits).mean()  # Tent, Eq. 1: H(ŷ) = −Σ p log p
