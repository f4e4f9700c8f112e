"""The oracle: how much norm-affine adaptation could win back at best (a ceiling row,
not a method).

The same parameters, steps and learning rate as the TTA methods, trained with the
*true* positives of each batch by supervised InfoNCE over the whole gallery,
L_i = −log Σ_{p ∈ P_i} softmax(q_i · G / τ)_p (several positives in I2T). Only a
benchmark row marked ``labels: true`` gives it the positives; the adapt stage refuses it
anywhere else.
"""

from __future__ import annotations

import torch

from qshift.adapt.engine import Adapter, Batch, Objective, Predictions, register_objective


@register_objective("oracle")
class Oracle(Objective):
    name = "oracle"
    needs_labels = True

    def loss(self, adapter: Adapter, batch: Batch, pred: Predictions, step: int) -> torch.Tensor:
        logp = ((pred.q @ adapter.gallery.T) / adapter.cfg.temperature).log_softmax(1)
        rows = [torch.logsumexp(logp[i, torch.as_tensor(pos, dtype=torch.long)], 0)
                for i, pos in enumerate(adapter.batch_labels)]
        return -torch.stack(rows).mean()
