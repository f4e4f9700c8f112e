"""Prototype routing (DAR, reconstruction after DAM).

Each domain keeps prototypes of the *frozen* model's embeddings of its training inputs:
their normalised mean (``per_domain=1``) or k-means centroids (FAISS). An input's frozen
embedding e is compared with every prototype by cosine; a domain scores its best
prototype. ``hard`` routing picks the best domain; ``soft`` keeps the ``top_k`` best and
weighs them by softmax(score / T) (weights sum to 1; T → 0 gives the argmax). When even
the best score is below ``threshold`` the input goes to the base model (all weights 0:
the out-of-distribution fallback). With ``ood_quantile`` q > 0 each domain also gets its
own threshold, the q-quantile of its training inputs' scores (reconstruction: the abstract
gives no rule; a fixed cosine does not carry over between encoders, an in-domain quantile
does), and a domain whose score is below its threshold gets no weight — no domain left:
the base model. No test labels are used: only frozen embeddings of training inputs.

``kind="gaussian"`` (reconstruction, for low-level routing features such as
:func:`pixel_statistics`, where a cosine to a mean means little): each domain keeps the
mean μ and variance σ² of every feature over its training inputs, and scores an input by
its mean per-feature Gaussian log-likelihood, −½·mean_j[(x_j − μ_j)²/σ²_j + log σ²_j]. The
rest (top-k, softmax over score / T, hard, ``ood_quantile``) is the same; the fixed
``threshold`` applies to cosine scores only. ``covariance="full"`` (reconstruction, picked on
val; see bench/configs/continual-world-corrupt-route-val.yaml) replaces the diagonal by the
full covariance Σ of the domain's features (plus a ridge of 1e-6·(1 + tr Σ / d)):
−½·[(x − μ)ᵀ Σ⁻¹ (x − μ) + log det Σ] / d. Low-level statistics are strongly correlated
(gradient, Laplacian and blur residual move together), so the diagonal form is broad and
keeps unseen corruptions near some domain; the full form rejects them at the same
in-domain quantile.

``add_base`` (reconstruction, DAR's ``route_base``): the frozen model becomes one more
routing candidate, described like a domain by its own source inputs (images it was trained
on) and scored the same way. It takes part in hard routing and in the top-k softmax like a
domain; whatever weight it wins goes to the base model (the banks give 1 − Σ_d w_d to the
frozen parameters). MoE-Adapters sends inputs unfamiliar to every task to the frozen model;
an in-domain quantile asks only "is this input far from each domain", so an unseen style
that lies near some domain's tail is still adapted. Comparing with the base's own
distribution asks "is it nearer to what the base model knows".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from qshift.errors import InputError, StoreMismatchError


@dataclass
class PrototypeRouter:
    fingerprint: str
    mode: str = "soft"          # soft | hard
    top_k: int = 2
    temperature: float = 0.05
    threshold: float = -1.0     # below this best cosine: the base model
    per_domain: int = 1
    ood_quantile: float = 0.0   # > 0: per-domain thresholds at this quantile of its training scores
    domains: list[str] = field(default_factory=list)
    prototypes: list[np.ndarray] = field(default_factory=list)  # per domain: m × d, unit rows
    thresholds: list[float] = field(default_factory=list)      # per domain (−inf without ood_quantile)
    kind: str = "cosine"        # cosine | gaussian (prototypes: per domain 2 × d, mean and variance)
    covariance: str = "diag"    # gaussian only: diag | full (prototypes: (1 + d) × d, mean and W, WWᵀ = Σ⁻¹)
    base: np.ndarray | None = None  # add_base: the frozen model's own prototype, a routing candidate

    def __post_init__(self) -> None:
        if self.mode not in ("soft", "hard"):
            raise InputError(f"router: mode must be soft or hard, got {self.mode!r}")
        if self.top_k < 1 or self.per_domain < 1:
            raise InputError(f"router: top_k and per_domain must be >= 1, got {self.top_k}, {self.per_domain}")
        if self.temperature < 0:
            raise InputError(f"router: temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.ood_quantile < 1:
            raise InputError(f"router: ood_quantile must be in [0, 1), got {self.ood_quantile}")
        if self.kind not in ("cosine", "gaussian"):
            raise InputError(f"router: kind must be cosine or gaussian, got {self.kind!r}")
        if self.covariance not in ("diag", "full"):
            raise InputError(f"router: covariance must be diag or full, got {self.covariance!r}")
        if self.covariance == "full" and self.kind != "gaussian":
            raise InputError("router: covariance='full' needs kind='gaussian'")
        if self.kind == "gaussian" and self.per_domain != 1:
            raise InputError(f"router: the gaussian router keeps one mean per domain, got per_domain "
                             f"{self.per_domain}")

    def add(self, domain: str, frozen: np.ndarray, seed: int = 0) -> None:
        if domain in self.domains:
            raise InputError(f"router: domain {domain!r} has prototypes already")
        x, protos = self._fit(domain, frozen, seed)
        self.domains.append(domain)
        self.prototypes.append(protos)
        own = self._score(x, protos)
        self.thresholds.append(float(np.quantile(own, self.ood_quantile)) if self.ood_quantile > 0 else -np.inf)

    def add_base(self, frozen: np.ndarray, seed: int = 0) -> None:
        """Make the base model a routing candidate, with a prototype of its own source
        inputs' features (the same kind as a domain's)."""
        if self.base is not None:
            raise InputError("router: the base model has prototypes already")
        self.base = self._fit("base (source)", frozen, seed)[1]

    def _fit(self, domain: str, frozen: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(prepared features, prototypes) of one domain's inputs."""
        x = np.asarray(frozen, dtype=np.float32)
        if len(x) == 0:
            raise InputError(f"router: domain {domain!r} has no data")
        if not np.isfinite(x).all():
            raise InputError(f"router: domain {domain!r} has non-finite features")
        x = self._prepare(x)
        if self.kind == "gaussian" and self.covariance == "full":
            protos = self._full_gaussian(domain, x)
        elif self.kind == "gaussian":
            var = x.var(0) + 1e-6 + 1e-3 * float(x.var(0).mean())  # floor: a constant feature stays usable
            protos = np.stack([x.mean(0), var]).astype(np.float32)
        elif self.per_domain == 1 or len(x) < 2 * self.per_domain:
            protos = x.mean(0, keepdims=True)
        else:
            import faiss

            km = faiss.Kmeans(x.shape[1], self.per_domain, niter=20, seed=seed, spherical=True, verbose=False,
                              min_points_per_centroid=1)
            km.train(x)
            protos = km.centroids.copy()
        if self.kind == "cosine":
            protos = protos / np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
        return x, protos

    @staticmethod
    def _full_gaussian(domain: str, x: np.ndarray) -> np.ndarray:
        """(1 + d) × d: the mean, then W (lower-triangular, W Wᵀ = Σ⁻¹) of the features."""
        n, d = x.shape
        if n <= d:
            raise InputError(f"router: domain {domain!r} has {n} inputs; a full covariance of {d} features "
                             f"needs more than {d} (or covariance='diag')")
        cov = np.cov(x.astype(np.float64), rowvar=False)
        cov += 1e-6 * (1 + np.trace(cov) / d) * np.eye(d)
        w = np.linalg.cholesky(np.linalg.inv(cov))
        return np.concatenate([x.mean(0, keepdims=True), w]).astype(np.float32)

    def scores(self, frozen: np.ndarray) -> np.ndarray:
        """B × D: each domain's score (cosine: its best prototype's cosine; gaussian: the
        mean per-feature log-likelihood)."""
        return self._scores(self._prepare(np.asarray(frozen, dtype=np.float32)))

    def _scores(self, e: np.ndarray, base: bool = False) -> np.ndarray:
        """B × D of prepared features (B × (D + 1) with the base model's score last)."""
        if not self.domains:
            raise InputError("router: no domain has prototypes yet (learn a domain first)")
        protos = [*self.prototypes, self.base] if base and self.base is not None else self.prototypes
        return np.stack([self._score(e, p) for p in protos], 1)

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        """Features as the scores read them: unit rows for cosine, as given for gaussian."""
        if self.kind == "gaussian":
            return x
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def _score(self, x: np.ndarray, proto: np.ndarray) -> np.ndarray:
        """One domain's score of prepared features: the best prototype cosine, or the
        log-likelihood per feature under the domain's diagonal or full Gaussian (up to a
        constant)."""
        if self.kind == "gaussian" and self.covariance == "full":
            mu, w = proto[0], proto[1:].astype(np.float64)
            z = (x - mu).astype(np.float64) @ w                        # ‖z‖² = (x − μ)ᵀ Σ⁻¹ (x − μ)
            logdet = -2.0 * np.log(np.diag(w)).sum()                    # log det Σ
            return (-0.5 * ((z ** 2).sum(1) + logdet) / len(mu)).astype(np.float32)
        if self.kind == "gaussian":
            mu, var = proto[0], proto[1]
            return -0.5 * (((x - mu) ** 2) / var + np.log(var)).mean(1)
        return (x @ proto.T).max(1)

    def weights(self, frozen: np.ndarray) -> np.ndarray:
        """B × D routing weights (rows sum to 1, or less: the rest goes to the base model —
        all of it for the out-of-distribution fallback)."""
        s = self._scores(self._prepare(np.asarray(frozen, dtype=np.float32)), base=True)
        limits = [*self.thresholds, -np.inf][:s.shape[1]]             # the base model (column D) has none
        below = s < np.asarray(limits, dtype=s.dtype)[None]           # a domain too far from this input
        s = np.where(below, -np.inf, s)
        w = np.zeros_like(s)
        rows = np.arange(len(s))
        if self.mode == "hard" or self.temperature == 0:
            w[rows, s.argmax(1)] = 1.0
        else:
            k = min(self.top_k, s.shape[1])
            top = np.argsort(-s, axis=1, kind="stable")[:, :k]
            z = np.take_along_axis(s, top, 1) / self.temperature
            with np.errstate(invalid="ignore"):
                z = np.exp(z - z.max(1, keepdims=True))                  # a row of −inf: NaN, zeroed below
                np.put_along_axis(w, top, np.nan_to_num(z / z.sum(1, keepdims=True)), 1)
        w[below] = 0.0
        w = w[:, :len(self.domains)]                                  # the base's own weight: the rest
        fixed = s[:, :len(self.domains)].max(1) < self.threshold if self.kind == "cosine" else False
        w[fixed | below.all(1)] = 0.0
        return w

    def torch_weights(self, frozen: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.weights(frozen).astype(np.float32))

    def state_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "mode": self.mode, "top_k": self.top_k,
                "temperature": self.temperature, "threshold": self.threshold, "per_domain": self.per_domain,
                "ood_quantile": self.ood_quantile, "thresholds": list(self.thresholds), "kind": self.kind,
                "covariance": self.covariance, "base": None if self.base is None else torch.from_numpy(self.base),
                "domains": list(self.domains), "prototypes": [torch.from_numpy(p) for p in self.prototypes]}

    @classmethod
    def from_state(cls, state: dict, fingerprint: str) -> "PrototypeRouter":
        if state["fingerprint"] != fingerprint:
            raise StoreMismatchError(f"router: prototypes of encoder {state['fingerprint']}, not {fingerprint}")
        protos = [p.numpy() for p in state.pop("prototypes")]
        state.setdefault("thresholds", [-np.inf] * len(protos))   # states saved before ood_quantile
        base = state.pop("base", None)                             # states saved before add_base: none
        return cls(**{**state, "prototypes": protos, "base": None if base is None else base.numpy()})


def pixel_statistics(pixels: torch.Tensor, batch: int = 512) -> np.ndarray:
    """Low-level statistics of preprocessed images (N × 3 × H × W) as routing features:
    per-channel mean and standard deviation; of the grey image its standard deviation, 5th
    and 95th percentiles, mean gradient magnitude, mean |Laplacian| (and its log) and the
    mean residual after a 3 × 3 box blur — what weather, contrast and noise corruptions
    change and image content mostly does not (reconstruction: DAR's abstract routes by
    prototypes without saying of what). N × 13 float32."""
    import torch.nn.functional as F

    lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    out = []
    with torch.no_grad():
        for s in range(0, len(pixels), batch):
            x = pixels[s:s + batch].float()
            g = x.mean(1, keepdim=True)
            flat = g.flatten(1)
            gy, gx = g[..., 1:, :-1] - g[..., :-1, :-1], g[..., :-1, 1:] - g[..., :-1, :-1]
            lap_abs = F.conv2d(g, lap.to(g), padding=1)[..., 1:-1, 1:-1].abs().flatten(1).mean(1)
            box = F.avg_pool2d(g, 3, stride=1, padding=1, count_include_pad=False)
            out.append(torch.cat([x.mean((2, 3)), x.std((2, 3)), flat.std(1, keepdim=True),
                                  flat.quantile(0.05, dim=1, keepdim=True), flat.quantile(0.95, dim=1, keepdim=True),
                                  (gx ** 2 + gy ** 2).sqrt().flatten(1).mean(1, keepdim=True),
                                  lap_abs[:, None], (lap_abs[:, None] + 1e-6).log(),
                                  (g - box).abs().flatten(1).mean(1, keepdim=True)], 1))
    return torch.cat(out).numpy().astype(np.float32)
