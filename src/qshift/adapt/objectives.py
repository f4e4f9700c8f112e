"""Classic TTA baselines in the query-prediction form (logits over gallery candidates).

Each is the paper's loss applied to the engine's query predictions; C is the number of
candidates per query, and entropy margins scale with ln C as the papers scale them with
ln(#classes).

* Tent (Wang et al., ICLR 2021): mean prediction entropy.
* EATA (Niu et al., ICML 2022): entropy of reliable (H < e_margin = 0.4 ln C) and
  non-redundant queries, weighted by
  1 / exp(H − e_margin), plus the Fisher anti-forgetting term λ Σ F (θ − θ₀)². Redundancy
  (cosine to the running mean prediction ≥ d_margin) is measured on the prediction over
  the whole gallery, because candidate columns differ between batches. The Fisher
  information comes from the clean paired texts of the gallery when there are any (the
  paper uses in-distribution test samples), else from the first batch.
* SAR (Niu et al., ICLR 2023): reliable entropy (H < e₀ = 0.4 ln C), sharpness-aware
  update (SAM, ρ = 0.05) with the reliable set re-filtered after the ascent step, and
  model recovery when the moving average of that loss drops below 0.2.
* READ (Yang et al., ICLR 2024): reliability-aware loss Σ p_max (1 − log p_max + log γ),
  γ = e⁻¹, minus the entropy of the batch's summed predictions (balance term), as in
  the TCR authors' code.
* DeYO (Lee et al., ICLR 2024): PLPD = p(ŷ | x) − p(ŷ | x̃) with x̃ an object-destroying
  view (image: 4×4 patch shuffle; text: word shuffle); queries with H < 0.5 ln C and
  PLPD > 0.2 are kept, weighted by exp(−(H − margin)) + exp(PLPD).
"""

from __future__ import annotations

import math
import random

import torch

from qshift.adapt.engine import Adapter, Batch, Objective, Predictions, softmax_entropy


class Tent(Objective):
    name = "tent"

    def loss(self, adapter: Adapter, batch: Batch, pred: Predictions, step: int) -> torch.Tensor:
        return softmax_entropy(pred.logits).mean()  # Tent, Eq. 1: H(ŷ) = −Σ p log p


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
        # Redundancy is judged in a space that is the same for every batch: the prediction
        # over the whole gallery (the candidate columns change from batch to batch).
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


class SAR(Objective):
    name = "sar"

    def __init__(self, e0: float = 0.4, rho: float = 0.05, reset_constant: float = 0.2) -> None:
        self.e0, self.rho, self.reset_constant = e0, rho, reset_constant
        self.ema: float | None = None

    def loss(self, adapter: Adapter, batch: Batch, pred: Predictions, step: int) -> torch.Tensor:
        ent = softmax_entropy(pred.logits)
        self._margin = self.e0 * math.log(pred.logits.shape[1])
        keep = ent < self._margin                                      # SAR Eq. 2: reliable entropy
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
            opt.step()
            value = float(loss2.detach())
            self.ema = value if self.ema is None else 0.9 * self.ema + 0.1 * value
            if self.ema < self.reset_constant:                         # model recovery (Sec. 4.3)
                adapter.reset()
                adapter.stats["recoveries"] = adapter.stats.get("recoveries", 0) + 1
        opt.zero_grad(set_to_none=True)

    def reset(self) -> None:
        self.ema = None


class READ(Objective):
    name = "read"

    def loss(self, adapter: Adapter, batch: Batch, pred: Predictions, step: int) -> torch.Tensor:
        probs = pred.logits.softmax(1)
        p_sum = probs.sum(0)
        balance = -(p_sum.softmax(0) * p_sum.log_softmax(0)).sum()
        p_max = probs.max(1).values.clamp_min(1e-12)
        reliable = (p_max * (1 - p_max.log() + math.log(math.exp(-1)))).mean()
        return reliable - balance


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
            return adapter.encoder.tokenize(shuffled)
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
        if not keep.any():
            return ent.sum() * 0.0
        weight = torch.exp(-(ent.detach() - margin)) + torch.exp(plpd)  # Eq. 10: sample weighting
        return (ent * weight)[keep].mean()
