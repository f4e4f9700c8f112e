"""Exclusion-Guided Proxy Contrastive Learning (ReEx, ICML 2026) — reconstruction.

ReEx's abstract: entropy-style TTA (TCR, Tent) trusts only high-confidence queries and
ignores the ambiguous ones; EPCL adapts on the whole stream by telling the model what
each query's answer is *not* — "negative constraints via exclusion sets of unlikely
candidates". No formula is published; qshift's reading, every choice an option:

* **Positive proxy** (``k_pos`` = 3): p_i = normalise(Σ_{j ∈ top-k(i)} softmax(s_ij / τ) g_j),
  the soft mean of the query's top-k gallery candidates. For an ambiguous query it is the
  centre of its plausible answers rather than a bet on one of them.
* **Exclusion set** (``exclude_rank`` = 0.5): the gallery items ranked below the cut-off
  r = max(k_pos + 1, ⌈exclude_rank · N⌉) for that query — confidently not its answer,
  whatever its confidence; the top-1 can never be excluded.
* **Exclusion proxies** (``proxies``): ``prototypes`` (default) — the gallery summarised
  once by ``n_proxies`` k-means centroids (FAISS); prototype m joins E_i when every
  member of its cluster is ranked below the cut-off (its best member's score is below
  the cut-off score), so no excluded proxy stands for a plausible answer. ``items`` —
  ``n_items`` gallery items drawn at random (the adapter's seeded generator) from below
  the cut-off.
* **Loss** (InfoNCE over proxies, τ_p = ``proxy_temperature``, default the engine's τ):
  L_i = −log( exp(q_i·p_i/τ_p) / (exp(q_i·p_i/τ_p) + Σ_{e ∈ E_i} exp(q_i·e/τ_p)) ),
  averaged over every query whose exclusion set is non-empty — no confidence threshold,
  which is the point: the share of queries learnt from is ~100 % where TCR's is not.

  Measured weakness of the two gallery-proxy forms (bench/results/refine.md, tuning.md):
  their excluded proxies are far from every query, so at τ_p the negatives carry almost no
  gradient and the positive pull does the learning — self-training on every query, which
  drifts on long streams (COCO test 17.10 vs TCR 18.31).

* ``proxies: batch`` (reconstruction, the negative-learning reading of "negative
  constraints via exclusion sets"): the proxies are the engine's own query predictions —
  the batch's candidates (each query's nearest gallery item, TCR's B × B logits), hard
  negatives by construction. With p_i = softmax(logits_i), candidate j is excluded for
  query i when p_ij < ``exclude_ratio`` · max_j p_ij (never the top-1), and

      L_i = −log(1 − Σ_{e ∈ E_i} p_ie) = LSE_j(z_ij) − LSE_{j ∉ E_i}(z_ij)          (complementary)

  — "the answer is none of E_i" (negative learning, Kim et al., ICCV 2019): mass moves
  from the excluded candidates to the set the query still finds plausible, with no
  commitment *among* the plausible ones, so an ambiguous query (flat p, small E_i) pushes
  only from what it surely is not, and a confident one (large E_i) sharpens like a
  pseudo-label. No positive proxy and no k-means; ``k_pos``/``exclude_rank`` do not apply;
  ``proxy_temperature`` rescales the logits.

* **Spread** (``uniformity``, default 0): a batch's queries share most of their
  exclusion proxies, so the push moves them all the same way; TCR's uniformity term
  u = mean_i exp(−t‖q_i − q̄‖) (t = 0.1) with this weight keeps them apart.

``{adapt: {method: epcl}}`` alone; ``{adapt: {method: rest, epcl_weight: 1.0}}`` adds it
to REST's objective (with ``use_consistency: false, decouple: false``: to TCR's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from qshift.adapt.engine import Adapter, Batch, Objective, Predictions, register_objective
from qshift.errors import InputError

PROXIES = ("prototypes", "items", "batch")


@dataclass
class EPCLConfig:
    k_pos: int = 3
    exclude_rank: float = 0.5
    proxies: str = "prototypes"
    n_proxies: int = 32
    n_items: int = 64
    proxy_temperature: float | None = None
    exclude_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.k_pos < 1:
            raise InputError(f"epcl: k_pos must be >= 1, got {self.k_pos}")
        if not 0 < self.exclude_rank < 1:
            raise InputError(f"epcl: exclude_rank must be in (0, 1), got {self.exclude_rank}")
        if self.proxies not in PROXIES:
            raise InputError(f"epcl: proxies must be one of {', '.join(PROXIES)}, got {self.proxies!r}")
        if self.n_proxies < 2 or self.n_items < 1:
            raise InputError(f"epcl: n_proxies >= 2 and n_items >= 1 needed, got {self.n_proxies}, {self.n_items}")
        if self.proxy_temperature is not None and self.proxy_temperature <= 0:
            raise InputError(f"epcl: proxy_temperature must be > 0, got {self.proxy_temperature}")
        if not 0 < self.exclude_ratio < 1:
            raise InputError(f"epcl: exclude_ratio must be in (0, 1), got {self.exclude_ratio}")


class ExclusionProxies:
    """The gallery's k-means prototypes and each item's cluster (built once)."""

    def __init__(self, gallery: torch.Tensor, n: int, seed: int = 0) -> None:
        import faiss

        g = np.ascontiguousarray(gallery.detach().cpu().numpy(), dtype=np.float32)
        n = max(2, min(n, len(g) // 2))
        km = faiss.Kmeans(g.shape[1], n, niter=20, seed=seed, spherical=True, verbose=False,
                          min_points_per_centroid=1)
        km.train(g)
        _, assign = km.index.search(g, 1)
        self.centroids = F.normalize(torch.from_numpy(km.centroids.copy()), dim=-1).to(gallery.device)
        self.assign = torch.from_numpy(assign[:, 0].astype(np.int64)).to(gallery.device)
        self.n = n

    def state_dict(self) -> dict:
        return {"centroids": self.centroids.cpu(), "assign": self.assign.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.centroids = state["centroids"].to(self.centroids.device)
        self.assign = state["assign"].to(self.assign.device)
        self.n = len(self.centroids)


def epcl_loss(adapter: Adapter, pred: Predictions, cfg: EPCLConfig, proxies: ExclusionProxies | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over queries with a non-empty exclusion set, mask of those queries)."""
    if cfg.proxies == "batch":
        scale = adapter.cfg.temperature / cfg.proxy_temperature if cfg.proxy_temperature else 1.0
        return complementary_loss(pred.logits * scale, cfg.exclude_ratio, pred.reference() * scale)
    q, g = pred.q, adapter.gallery
    tau = cfg.proxy_temperature or adapter.cfg.temperature
    with torch.no_grad():
        s = q.detach() @ g.T                                             # B × N ranking scores
        n = s.shape[1]
        k = min(cfg.k_pos, n)
        top_s, top_i = s.topk(k, dim=1)
        w = (top_s / tau).softmax(1)
        pos = F.normalize(torch.einsum("bk,bkd->bd", w, g[top_i]), dim=-1)  # positive proxies
        cut = max(k + 1, math.ceil(cfg.exclude_rank * n))
        if cut > n:
            return q.sum() * 0.0, torch.zeros(len(q), dtype=torch.bool)
        thr = s.topk(cut, dim=1).values[:, -1:]                          # the cut-off score per query
        if cfg.proxies == "prototypes":
            best = torch.full((len(q), proxies.n), -torch.inf, device=s.device)
            best = best.scatter_reduce(1, proxies.assign.expand(len(q), -1), s, reduce="amax")
            excl = best < thr                                            # every member below the cut-off
            neg = proxies.centroids[None].expand(len(q), -1, -1)
        else:
            below = s < thr
            rnd = torch.rand(s.shape, generator=adapter.generator).to(s.device)
            pick = torch.where(below, rnd, torch.full_like(rnd, -1.0)).topk(min(cfg.n_items, n), dim=1).indices
            excl = below.gather(1, pick)
            neg = g[pick]
    has = excl.any(1)
    if not has.any():
        return q.sum() * 0.0, has
    l_pos = (q * pos).sum(1, keepdim=True) / tau                         # B × 1
    l_neg = torch.einsum("bd,bmd->bm", q, neg) / tau                     # B × M
    l_neg = l_neg.masked_fill(~excl, -torch.inf)
    logits = torch.cat([l_pos, l_neg], dim=1)
    loss = -(l_pos[:, 0] - torch.logsumexp(logits, dim=1))               # −log softmax(...)_positive
    return loss[has].mean(), has


def complementary_loss(logits: torch.Tensor, ratio: float, reference: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """L_i = −log(1 − Σ_{e ∈ E_i} softmax(logits_i)_e), E_i = {j : p_ij < ratio · max p_i}
    with p read from ``reference`` (default: the logits themselves; the engine's guide
    logits when a guide is given) — mean over queries with a non-empty E_i, mask of those."""
    with torch.no_grad():
        z = logits.detach() if reference is None else reference
        excl = z < z.max(1, keepdim=True).values + math.log(ratio)      # p_ij < ratio · p_i,max
    has = excl.any(1)
    if not has.any():
        return logits.sum() * 0.0, has
    keep = logits.masked_fill(excl, -torch.inf)                          # the plausible set (holds the top-1)
    loss = torch.logsumexp(logits, 1) - torch.logsumexp(keep, 1)         # −log Σ_{j ∉ E_i} p_ij
    return loss[has].mean(), has


@register_objective("epcl")
class EPCL(Objective):
    name = "epcl"

    def __init__(self, k_pos: int = 3, exclude_rank: float = 0.5, proxies: str = "prototypes", n_proxies: int = 32,
                 n_items: int = 64, proxy_temperature: float | None = None, uniformity: float = 0.0,
                 t: float = 0.1, exclude_ratio: float = 0.1) -> None:
        self.epcl = EPCLConfig(k_pos, exclude_rank, proxies, n_proxies, n_items, proxy_temperature, exclude_ratio)
        self.uniformity, self.t = float(uniformity), float(t)
        self.proxies: ExclusionProxies | None = None

    def setup(self, adapter: Adapter) -> None:
        if self.epcl.proxies == "prototypes":
            self.proxies = ExclusionProxies(adapter.gallery, self.epcl.n_proxies, adapter.cfg.seed)

    def loss(self, adapter: Adapter, batch: Batch, pred: Predictions, step: int) -> torch.Tensor:
        loss, has = epcl_loss(adapter, pred, self.epcl, self.proxies)
        self.learned = has
        if self.uniformity > 0 and len(pred.q) > 1:
            q = pred.q
            loss = loss + self.uniformity * torch.exp(-self.t * (q - q.mean(0)).norm(dim=1)).mean()
        return loss

    def state_dict(self) -> dict:  # k-means is seeded, but threads may order its sums differently
        return {"proxies": None if self.proxies is None else self.proxies.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["proxies"] is not None:
            self.proxies.load_state_dict(state["proxies"])
