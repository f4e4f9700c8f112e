"""QuARI's hypernetwork (Xing et al., "QuARI: Query Adaptive Retrieval Improvement",
arXiv 2505.21647, §3.2 and appendix A).

For a query embedding q ∈ R^E the network predicts a customised query q' and a rank-r
linear map T = Σ_j u_j v_jᵀ (Eq. 4, 7):

* a two-layer MLP (GELU, LayerNorm) encodes q into the control token, plus a learned
  step embedding (sinusoidal features of the step, through a linear layer);
* 2r U/V tokens start at zero and are refined for L steps by one shared pre-norm
  transformer encoder over [control; U; V] with sinusoidal positional encodings; each
  step adds the encoder's output to the tokens (Eq. 5–6);
* separate two-layer MLP decoders map U-tokens to u_j, V-tokens to v_j and the final
  control token to q'.

``one_step=True`` is the paper's "w/o iterative generation" ablation (L = 1). The hidden
size is not given in the paper; 256 is the default here (``hidden``).

Where the paper and the authors' released code (mvrl/QuARI) differ we follow the code,
because the paper's pure form learned nothing in our tests (scores start random instead
of at the backbone's ranking), and make the difference switchable:

* T = I + a·UᵀV / (‖U‖_F ‖V‖_F) with a = ``anchor`` (0.8, as in the code): an identity
  anchor plus the low-rank map; ``anchor=None`` is the paper's T = UᵀV = Σ_j u_j v_jᵀ.
* q' = normalise((1 − λ)·MLP(control) + λ·q) with λ = ``query_residual`` (0.5, as in
  the code); λ = 0 is the paper's q' = MLP(control).
* ``unit_query_head`` (reconstruction, off by default): MLP(control) is normalised before
  the mix, so that λ alone bounds how far q' moves (cos(q', q) ≥ 2λ − 1). Without it the
  head's output norm sets the mix: trained on world-ILIAS with λ = 0.9, cos(q', q) was
  still only ≈ 0.93 — a move larger than the gap between an instance's renderings.
* ``identity_init`` (reconstruction, off by default): T = I + a·UᵀV with U and V *not*
  normalised and the last layers of the U and q' decoders zero-initialised (LoRA's B = 0),
  so that at initialisation T = I and q' = q — QuARI starts exactly at the backbone's
  ranking — and the size of the low-rank change is learned (weight decay pulls it back
  to the identity). With the code's normalisation ‖a·UᵀV/(‖U‖‖V‖)‖_F ≤ a whatever the
  data says, and the start is a random rank-r perturbation of a.
* ``tied_query`` (reconstruction, off by default): the λ-mix takes the query *through its
  own transform*, q' = normalise((1 − λ)·MLP(control) + λ·T q), instead of q. Why: static
  task adaptation (TA), the query-independent special case QuARI should contain, maps
  query and gallery with one matrix (q' = Wq, T = W); untied, the head must learn W's
  action on the query separately. On World-ILIAS val (mini-clip) a static rank-32 map
  I + AᵀB trained like TA reaches 54.8 mAP@1k in 300 epochs (zero-shot 47.9), untied
  identity-start QuARI stays at 45–48 after 10–60 epochs, tied (λ = 1, 300 epochs) 51.9
  (bench/results/quari.md).
* ``static_base`` (reconstruction, off by default): U = U₀ + MLP_u(u_j) and V = V₀ + MLP_v(v_j)
  with learned query-independent U₀, V₀ ∈ R^{r×E} (U₀ zero at the start, V₀ random, as the
  rank-r TA map's A and B). Why: the decoders share one bias over the r tokens, so the
  query-independent part of T — static TA, the part that carries World-ILIAS — can only be
  built through the token positions and the transformer; with U₀, V₀ it is its own
  parameter, and the hypernetwork predicts the per-query deviation from it. World-ILIAS
  (tied, λ = 1, 300 epochs): val 52.9 mAP@1k against 51.9 without it; test 28.0 (zero-shot
  27.9). U₀, V₀ alone (the decoders silenced) score 49.3 val and 25.8 test, while the same
  rank-32 map trained as TA reaches 54.8 / 32.7 in those epochs — within QuARI's loss the
  static part learns little. Trained without semi-positives and query noise (TA's loss has
  neither): val 55.9, test 30.19 ± 0.56 (3 seeds; zero-shot 27.9), the static part alone still
  below zero-shot.
* ``static_rank`` r₀ (reconstruction, 0 by default = U₀, V₀ of rank r added to U, V): U₀, V₀ of
  rank r₀ are *appended* to the predicted rows, T = I + a·(UᵀV + U₀ᵀV₀), so the static part can
  have a higher rank than the per-query one at no cost in the transformer (its r tokens stay).
  Why: restricted to rank r₀, the TA map at 300 epochs scores 33.0 / 35.0 / 37.1 mAP@1k on
  World-ILIAS val-10k at r₀ = 32 / 64 / 128 (full rank 37.9, zero-shot 28.3) — rank 32 caps
  the static part. Needs ``identity_init`` (U, V are not normalised per query, so the static
  rows stay query-independent); scoring then applies T₀ = I + a·U₀ᵀV₀ to the gallery once and
  only the r predicted rows per query (``static_map``), so r₀ costs nothing per candidate.
  With r₀ = 128 (val-10k's pick: 31.8 against 31.2 without): World-ILIAS test 31.57 ± 0.36
  mAP@1k on 10k (zero-shot 27.89, 3 seeds; without r₀ 30.19 ± 0.56) and 14.46 ± 0.18 on 100k
  (zero-shot 13.56) — still short of TA's 43.5 / 26.8. With the static part fitted as TA first
  (:class:`~qshift.quari.train.QuARITrainConfig` ``static_init_epochs``): 40.14 ± 0.16 and
  23.37 ± 0.21, nearly all of it from the static part (alone 40.13 / 23.33).
* The control token is updated residually like the U/V tokens; U/V tokens are dropped
  at random (``token_dropout``, 5 %, as in the code) while training.

Δ in Eq. 5–6 is the shared encoder's update (its output minus its input).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from qshift.errors import InputError
from qshift.quari.scoring import apply_transform


@dataclass(frozen=True)
class QuARIConfig:
    dim: int                 # E, the backbone's embedding size
    rank: int = 64           # r
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    steps: int = 4           # L refinement steps
    one_step: bool = False   # ablation: no iterative generation
    anchor: float | None = 0.8   # T = I + a·UᵀV/(‖U‖‖V‖); None: T = UᵀV (the paper's form)
    query_residual: float = 0.5  # q' = norm((1-λ)·MLP(control) + λ·q); 0: q' = MLP(control)
    token_dropout: float = 0.05  # training only
    unit_query_head: bool = False  # normalise MLP(control) before the λ-mix (reconstruction)
    identity_init: bool = False    # start at T = I, q' = q; U, V not normalised (reconstruction)
    tied_query: bool = False       # q' mixes T q instead of q (reconstruction)
    static_base: bool = False      # U = U₀ + MLP_u, V = V₀ + MLP_v with learned U₀, V₀ (reconstruction)
    static_rank: int = 0           # > 0: U₀, V₀ of this rank appended to U, V instead of added (reconstruction)

    def __post_init__(self) -> None:
        for name in ("dim", "rank", "hidden", "layers", "heads", "steps"):
            if getattr(self, name) < 1:
                raise InputError(f"quari: {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise InputError(f"quari: hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if not 0 <= self.query_residual <= 1 or not 0 <= self.token_dropout < 1:
            raise InputError("quari: query_residual must be in [0, 1] and token_dropout in [0, 1)")
        if self.static_rank < 0 or (self.static_rank and not (self.static_base and self.identity_init)):
            raise InputError(f"quari: static_rank must be >= 0 and needs static_base and identity_init (U, V "
                             f"not normalised per query, so U₀, V₀ stay query-independent), got {self.static_rank}")
        if self.identity_init and (self.anchor is None or self.unit_query_head or self.query_residual == 0):
            raise InputError("quari: identity_init needs an anchor (T = I + a·UᵀV), query_residual > 0 and no "
                             "unit_query_head (q' = q at the start: the head starts at zero)")

    def to_dict(self) -> dict:
        return asdict(self)


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoidal features (Vaswani et al.) of integer positions: len × dim."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    ang = positions.float()[:, None] * freq[None]
    out = torch.cat([ang.sin(), ang.cos()], dim=1)
    return out if dim % 2 == 0 else torch.cat([out, torch.zeros(len(positions), 1)], dim=1)


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """Two-layer MLP with GELU and LayerNorm (appendix A)."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.LayerNorm(d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class QuARI(nn.Module):
    def __init__(self, cfg: QuARIConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, r = cfg.hidden, cfg.rank
        self.query_encoder = mlp(cfg.dim, h, h)
        self.step_embed = nn.Linear(h, h)
        layer = nn.TransformerEncoderLayer(h, cfg.heads, 4 * h, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(h)
        self.decode_u = mlp(h, h, cfg.dim)
        self.decode_v = mlp(h, h, cfg.dim)
        self.decode_q = mlp(h, h, cfg.dim)
        if cfg.identity_init:                                      # T = I and q' = q at the start
            for dec in (self.decode_u, self.decode_q):
                nn.init.zeros_(dec[-1].weight)
                nn.init.zeros_(dec[-1].bias)
        if cfg.static_base:                                        # U₀ = 0, V₀ random: T = I + a·U₀ᵀV₀ starts at I
            r0 = cfg.static_rank or r
            self.base_u = nn.Parameter(torch.zeros(r0, cfg.dim))
            self.base_v = nn.Parameter(torch.randn(r0, cfg.dim) / math.sqrt(cfg.dim))
        self.register_buffer("pos", sinusoid(torch.arange(1 + 2 * r), h), persistent=False)
        self.register_buffer("step_pos", sinusoid(torch.arange(cfg.steps), h), persistent=False)

    def static_part(self) -> "QuARI":
        """A copy whose U and V decoders' last layers are zero, so every query gets U = U₀,
        V = V₀: what a ``static_base`` model learned that is not per-query."""
        if not self.cfg.static_base:
            raise InputError("quari: static_part needs a static_base model (U₀, V₀)")
        out = copy.deepcopy(self)
        with torch.no_grad():
            for dec in (out.decode_u, out.decode_v):
                dec[-1].weight.zero_()
                dec[-1].bias.zero_()
        return out

    def static_map(self, x: torch.Tensor) -> torch.Tensor:
        """T₀ x = x + a·U₀ᵀ(V₀ x) for rows x (N × E) of a ``static_rank`` model: the
        query-independent part of T, applied to a gallery once, so that scoring needs only
        the r predicted rows per query (:func:`qshift.quari.scoring.lowrank_scores`, ``base``)."""
        if not self.cfg.static_rank:
            raise InputError("quari: static_map needs a static_rank model")
        return x + self.cfg.anchor * (x @ self.base_v.T) @ self.base_u

    def per_query_rows(self, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of U, V that differ per query: all of them, or the r predicted ones of a
        ``static_rank`` model (its static rows come last)."""
        r = self.cfg.rank
        return (u[:, :r], v[:, :r]) if self.cfg.static_rank else (u, v)

    @property
    def n_steps(self) -> int:
        return 1 if self.cfg.one_step else self.cfg.steps

    def forward(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B × E) → q' (B × E, unit), U (B × r × E), V (B × r × E).

        T = I + a·UᵀV (U, V already divided by their Frobenius norms) or T = UᵀV when
        ``cfg.anchor`` is None; :func:`qshift.quari.scoring.lowrank_scores` applies it.
        """
        if q.ndim != 2 or q.shape[1] != self.cfg.dim:
            raise InputError(f"quari: expected queries of shape (B, {self.cfg.dim}), got {tuple(q.shape)}")
        b, r = q.shape[0], self.cfg.rank
        ctrl = self.query_encoder(q)                               # control token
        tokens = q.new_zeros(b, 2 * r, self.cfg.hidden)           # zero-initialised U/V tokens
        for t in range(self.n_steps):
            x = torch.cat([(ctrl + self.step_embed(self.step_pos[t]))[:, None], tokens], dim=1) + self.pos
            delta = self.transformer(x) - x                        # the shared encoder's update Δ
            ctrl = ctrl + delta[:, 0]
            tokens = tokens + delta[:, 1:]                         # Eq. 5–6: u ← u + Δu, v ← v + Δv
            if self.training and self.cfg.token_dropout:
                tokens = tokens * (torch.rand(b, 2 * r, 1, device=q.device) >= self.cfg.token_dropout)
        tokens = self.norm(tokens)
        u = self.decode_u(tokens[:, :r])                           # Eq. 7: MLP_u(u_j)
        v = self.decode_v(tokens[:, r:])                           #        MLP_v(v_j)
        if self.cfg.static_rank:                                   # T = I + a·(UᵀV + U₀ᵀV₀): rank r + r₀
            u = torch.cat([u, self.base_u.expand(b, -1, -1)], dim=1)
            v = torch.cat([v, self.base_v.expand(b, -1, -1)], dim=1)
        elif self.cfg.static_base:                                 # the query-independent part
            u, v = u + self.base_u, v + self.base_v
        if self.cfg.anchor is not None and not self.cfg.identity_init:
            u = u / u.flatten(1).norm(dim=1).clamp_min(1e-8)[:, None, None]
            v = v / v.flatten(1).norm(dim=1).clamp_min(1e-8)[:, None, None]
        lam = self.cfg.query_residual
        head = self.decode_q(self.norm(ctrl))
        if self.cfg.unit_query_head:
            head = torch.nn.functional.normalize(head, dim=-1)
        base = apply_transform(q, u, v, self.cfg.anchor) if self.cfg.tied_query else q   # T q, or q
        qp = torch.nn.functional.normalize((1 - lam) * head + lam * base, dim=-1)
        return qp, u, v
