"""Repair distillation — a qshift reconstruction of how ReEx's repair and adaptation meet.

ReEx's abstract says its two parts (query repair, exclusion-guided adaptation) work
together but not how. With ``guide: fused`` (the adapt stage after a fusing refine stage)
the adapter already reads its candidates from the frozen fused query, the pipeline's best
guess. Distillation makes that guess a *soft teacher* for the typed query (Hinton et al.,
"Distilling the Knowledge in a Neural Network", 2015): with t_i the guide's logits and z_i
the tower's own over the same candidates,

    L_i = KL( softmax(t_i) ‖ softmax(z_i) ) = Σ_j softmax(t_i)_j (log softmax(t_i)_j − log softmax(z_i)_j)

averaged over the batch. Why: the norm-affine parameters then learn, from the queries whose
repair the fusion trusted, to map noisy text towards where its repair lands — which should
carry over to later queries whose repair fails (an unknown word, a split token) — while a
query the repair left alone pulls the tower back to the frozen model (its guide is its own
frozen embedding), an anchor against drift. Unlike TCR's or EPCL's targets it needs no
confidence threshold and no exclusion cut-off.

Options: ``{adapt: {method: distill, guide: fused}}`` alone; ``{adapt: {method: rest,
distill_weight: w, guide: fused}}`` adds w · L to REST's objective (with EPCL, the full ReEx
pipeline). Without ``guide: fused`` the target is the query's own prediction and the loss
has no gradient, so the adapt stage refuses the combination.

Measured (bench/results/refine.md, reex-coco-t2t-distill-val: COCO dev, 500 queries × six
character corruptions at severity 5, mean over three corruption seeds; after spell + fusion):
the full pipeline guided by the fused query (REST + EPCL batch, lr 3e-4) 50.30 char mean;
with ``distill_weight: 1`` 50.23 (lr 3e-4) and 49.68 (lr 1e-3); distill alone (lr 1e-3)
49.87; the fusion without adaptation 50.00. Distillation does not help on dev, so it is an
option only and no test row was run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qshift.adapt.engine import Adapter, Batch, Objective, Predictions, register_objective
from qshift.errors import InputError


def distill_loss(pred: Predictions) -> torch.Tensor:
    """Mean over the batch of KL(softmax(guide logits) ‖ softmax(query logits))."""
    if pred.target is None:
        raise InputError("distill: the loss needs the guide's logits (adapt stage option guide: fused, after a "
                         "refine stage with mode: fuse)")
    return F.kl_div(pred.logits.log_softmax(1), pred.target.log_softmax(1), reduction="batchmean", log_target=True)


@register_objective("distill")
class Distill(Objective):
    name = "distill"
    needs_guide = True

    def loss(self, adapter: Adapter, batch: Batch, pred: Predictions, step: int) -> torch.Tensor:
        return distill_loss(pred)
