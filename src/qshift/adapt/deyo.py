"""DeYO (Lee et al., "Entropy is not Enough for Test-Time Adaptation: From the
Perspective of Disentangled Factors", ICLR 2024): PLPD = p(ŷ | x) − p(ŷ | x̃) with x̃
an object-destroying view (image: 4×4 patch shuffle; text: word shuffle); queries with
H < 0.5 ln C and PLPD > 0.2 are kept (Eq. 9), weighted by exp(−(H − margin)) +
exp(PLPD) (Eq. 10)."""

from __future__ import annotations

import math
import random

import torch

from qshift.adapt.engine import Adapter, Batch, Objective, Predictions, register_objective, softmax_entropy


@register_objective("deyo")
class DeYO(Objective):
    name = "deyo"

    def __init__(self, margin: float = 0.5, plpd_threshold: float = 0.2, patches: int = 4) -> None:
        self.margin, self.plpd_threshold, self.patches = margin, plpd_threshold, patches

    def destroy(self, adapter: Adapter, batch: Batch) -> object:
        """An object-destroying view: patch shuffle (images) or word shuffle (texts)."""
        g = adapter.generator
        if adapter.modality == "text":
            rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=g)))
            shuffled = []
            for t in batch.raw:
                words = t.split()
                rng.shuffle(words)
                shuffled.append(" ".join(words))
            return adapter.encoder.prepare(shuffled, "text")
        x = batch.inputs
        b, c, h, w = x.shape
        n = self.patches
        ph, pw = h // n, w // n
        x = x[:, :, : ph * n, : pw * n]
        tiles = x.reshape(b, c, n, ph, n, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, c, ph, pw)
        perm = torch.randperm(n * n, generator=g)
        tiles = tiles[:, perm].reshape(b, n, n, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, ph * n, pw * n)
        return torch.nn.functional.interpolate(tiles, size=(h, w)) if (ph * n, pw * n) != (h, w) else tiles

    def loss(self, adapter: Adapter, batch: Batch, pred: Predictions, step: int) -> torch.Tensor:
        ent = softmax_entropy(pred.logits)
        margin = self.margin * math.log(pred.logits.shape[1])
        keep = ent < margin
        probs = pred.logits.softmax(1)
        yhat = probs.argmax(1)
        with torch.no_grad():
            q_aug = adapter.forward(self.destroy(adapter, batch))
            mode = adapter.candidates_mode(len(q_aug))
            if mode == "batch-nn":
                logits_aug = q_aug @ pred.nn_feat.T
            elif mode == "topk":
                k = pred.logits.shape[1]
                idx = (pred.q.detach() @ adapter.gallery.T).topk(k, dim=1).indices
                logits_aug = torch.einsum("bd,bkd->bk", q_aug, adapter.gallery[idx])
            else:
                logits_aug = q_aug @ adapter.gallery.T
            p_aug = (logits_aug / adapter.cfg.temperature).softmax(1)
            plpd = probs.detach().gather(1, yhat[:, None])[:, 0] - p_aug.gather(1, yhat[:, None])[:, 0]
        keep &= plpd > self.plpd_threshold                             # DeYO Eq. 9: sample selection
        self.learned = keep
        if not keep.any():
            return ent.sum() * 0.0
        weight = torch.exp(-(ent.detach() - margin)) + torch.exp(plpd)  # Eq. 10: sample weighting
        return (ent * weight)[keep].mean()
