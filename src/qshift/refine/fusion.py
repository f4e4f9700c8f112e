"""Confidence-Guided Dynamic Fusion (ReEx's GSR, reconstruction).

ReEx's abstract says only that LLM repairs are "anchored" by a confidence-guided fusion
that prevents semantic drift. qshift's reading, every choice an option:

* **Confidence** of a query embedding e over the gallery G (``confidence``):
  ``top1`` — the top-1 probability of softmax(e·G / τ), τ = the encoder's trained
  temperature (``temperature`` overrides; 0.05 when the encoder has none);
  ``margin`` — the top-1 minus top-2 cosine; ``entropy`` — 1 − H(p)/ln N.
* **Weight of the repair** w = w_max · c_r^β / (c_r^β + c_o^β): it grows with the
  repair's confidence c_r and falls with the original's c_o, is ½·w_max when both are
  equally sure, and never exceeds ½·w_max when the original is fully confident
  (c_o = 1 ≥ c_r), so a confident original is not overridden.
* **Prior odds of the repair** (``prior`` ρ, reconstruction): w = w_max · ρ·c_r^β /
  (ρ·c_r^β + c_o^β). ρ = 1 is the symmetric rule above; ρ > 1 says a repair is a priori
  more often right than the noisy text it replaces, which is what a corrector built for
  the domain is for — a confident original then holds at most ρ/(1 + ρ)·w_max. Why an
  option: with the symmetric rule a corrupted query's confidently wrong original keeps
  half the weight, and on the world T2I test the fused row fell well below plain
  replacement (mini-clip char mean 21.7 vs 28.1). ρ is picked on val: on world val
  ρ = 30 reaches 27.5 against 24.8 (ρ = 1) but plain replacement (28.0) stays best; on
  COCO dev ρ = 3 leads by one query per type (bench/results/tuning.md), so the default
  stays 1. On the world test (reex-world-t2i-prior) ρ = 30 gives 25.03 mean R@1 against
  23.03 at ρ = 1 and 25.51 for replacement. On test-length COCO dev streams
  (reex-coco-t2t-prior-val-long) ρ = 3 leads 50.59 vs 50.01; on COCO test
  (reex-coco-t2t-prior) it lifts the severity-5 char mean 31.18 → 31.61 but its worst type
  falls to −0.58 (back_translation, severity 3; ρ = 1: −0.4), past the 0.5 bound — so the
  default stays 1 and ρ is a per-collection choice.
* **Gate** (``gate``, reconstruction): ``none`` uses w as above; ``gain`` sets w = 0
  unless the repair is more confident than the original (c_r > c_o) — the repair must
  earn its place, which protects queries whose rare but correct words a corrector
  "fixes". Both keep identity, bounds and monotonicity. On val the gate did not win
  (mean R@1 at severity 5, spell + top1 fusion: COCO dev 55.76 with it vs 55.80 without,
  its worst type −0.6 vs −1.0; world val 24.48 vs 24.84), so ``none`` is the default.
* **Fused query** = normalise((1 − w)·e_o + w·e_r). For dot-product ranking this is
  also the fusion of the two score rows ((1 − w)·s_o + w·s_r, up to a per-query scale
  that does not change the ranking), and it keeps adapt/transform stages downstream.
* **Guards**: w = 0 when the repaired text equals the original (identity: nothing
  changes) or when cos(e_o, e_r) < ``min_cos`` (the repair drifted from the query).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qshift.confidence import CONFIDENCES, confidence
from qshift.errors import InputError

GATES = ("none", "gain")


def repair_weight(c_orig: np.ndarray, c_rep: np.ndarray, beta: float = 1.0, w_max: float = 1.0,
                  gate: str = "none", prior: float = 1.0) -> np.ndarray:
    """w = w_max · ρ·c_r^β / (ρ·c_r^β + c_o^β) (w_max·ρ/(1 + ρ) when both are zero); with
    ``gate="gain"``, 0 wherever c_r ≤ c_o."""
    if gate not in GATES:
        raise InputError(f"fusion: gate must be one of {', '.join(GATES)}, got {gate!r}")
    if prior <= 0:
        raise InputError(f"fusion: prior must be > 0, got {prior}")
    a = prior * np.power(np.clip(c_rep, 0, 1), beta)
    b = np.power(np.clip(c_orig, 0, 1), beta)
    den = a + b
    w = w_max * np.where(den > 0, a / np.where(den > 0, den, 1), prior / (1 + prior))
    return np.where(np.asarray(c_rep) > np.asarray(c_orig), w, 0.0) if gate == "gain" else w


def mix(e_o: np.ndarray, e_r: np.ndarray, w: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """normalise((1 − w)·e_o + w·e_r) per row; rows where ``keep`` stay e_o exactly."""
    fused = (1 - w)[:, None] * e_o + w[:, None] * e_r
    fused /= np.maximum(np.linalg.norm(fused, axis=1, keepdims=True), 1e-12)
    return np.where(keep[:, None], e_o, fused).astype(np.float32)


@dataclass
class ConfidenceFusion:
    """Fuses a batch's ``repaired`` view into its embeddings (applied by the encode stage)."""

    confidence: str = "top1"
    temperature: float | None = None
    beta: float = 1.0
    w_max: float = 1.0
    min_cos: float = 0.5
    gate: str = "none"
    prior: float = 1.0
    view: str = "repaired"

    def __post_init__(self) -> None:
        if self.confidence not in CONFIDENCES:
            raise InputError(f"fusion: confidence must be one of {', '.join(CONFIDENCES)}, got {self.confidence!r}")
        if not 0 <= self.w_max <= 1:
            raise InputError(f"fusion: w_max must be in [0, 1], got {self.w_max}")
        if self.gate not in GATES:
            raise InputError(f"fusion: gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if self.prior <= 0:
            raise InputError(f"fusion: prior must be > 0, got {self.prior}")
        if self.beta <= 0:
            raise InputError(f"fusion: beta must be > 0, got {self.beta}")
        if self.temperature is not None and self.temperature <= 0:
            raise InputError(f"fusion: temperature must be > 0, got {self.temperature}")

    def __call__(self, batch, ctx, weights: np.ndarray | None = None) -> None:  # noqa: ANN001
        """Fuse ``batch`` (a QueryBatch; ``ctx`` its PipelineContext) in place. ``weights``:
        the repair weights to apply instead of computing them (e.g. those the frozen model's
        confidences gave, re-applied after adaptation); the meta keeps the recorded ones."""
        if self.view not in batch.view_embeddings:
            return
        e_o = np.asarray(batch.embeddings, dtype=np.float32)
        e_r = np.asarray(batch.view_embeddings[self.view], dtype=np.float32)
        if weights is not None:
            w = np.asarray(weights, dtype=np.float32)
            if w.shape != (len(e_o),):
                raise InputError(f"fusion: {w.shape} weights for a batch of {len(e_o)} queries")
            batch.embeddings = mix(e_o, e_r, w, keep=w == 0)
            return
        g = ctx.gallery_vectors()
        tau = self.temperature or getattr(ctx.encoder, "temperature", lambda: None)() or 0.05
        c_o = confidence(e_o, g, self.confidence, tau)
        c_r = confidence(e_r, g, self.confidence, tau)
        w = repair_weight(c_o, c_r, self.beta, self.w_max, self.gate, self.prior)
        same = np.array([a == b for a, b in zip(batch.queries, batch.views[self.view])])
        cos = (e_o * e_r).sum(1)
        drift = cos < self.min_cos
        w = np.where(same | drift, 0.0, w).astype(np.float32)
        batch.embeddings = mix(e_o, e_r, w, keep=same)
        for i, m in enumerate(batch.meta):
            m.setdefault("refine", {}).update({"fusion_weight": float(w[i]), "confidence_original": float(c_o[i]),
                                               "confidence_repaired": float(c_r[i])})
            if drift[i] and not same[i]:
                m["refine"]["guard"] = f"embedding drift (cos {cos[i]:.2f} < {self.min_cos})"
