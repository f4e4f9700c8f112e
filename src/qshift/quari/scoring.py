"""QuARI scores without materialising T (E × E) per query.

U, V ∈ R^{r×E} (rows u_j, v_j) per query, and T = I + a·UᵀV (``anchor`` a, the authors'
code) or T = UᵀV (``anchor=None``, the paper's Eq. 4). With z = V d and y = U d:

    T d      = d + a·Uᵀ z
    q'ᵀ T d  = q'ᵀ d + a·(U q')ᵀ z
    ‖T d‖²   = ‖d‖² + 2a·yᵀ z + a²·zᵀ (U Uᵀ) z

(without the anchor only the a-terms remain, with a = 1), so scoring N candidates costs
O(N·E·r + N·r²) per query instead of O(E²·(r + N)). score(q, d) = cos(q', T d).
``materialized_scores`` is the reference computation (build T, transform every
candidate), used by the tests and the speed benchmark.

Full search: the numerator is linear in d, q'ᵀ T d = wᵀ d with w = Tᵀ q' = q' + a·Vᵀ U q',
so a MIPS index over the raw gallery finds candidates with w; they are over-fetched and
re-scored exactly (the norm ‖T d‖ differs between candidates).
"""

from __future__ import annotations

import numpy as np
import torch

from qshift.errors import InputError

EPS = 1e-12


def _check(qp: torch.Tensor, u: torch.Tensor, v: torch.Tensor, d: torch.Tensor) -> None:
    if qp.ndim != 2 or u.ndim != 3 or v.shape != u.shape or u.shape[0] != qp.shape[0] or u.shape[2] != qp.shape[1]:
        raise InputError(f"quari scores: inconsistent shapes q' {tuple(qp.shape)}, U {tuple(u.shape)}, "
                         f"V {tuple(v.shape)}")
    if d.shape[-1] != qp.shape[1]:
        raise InputError(f"quari scores: candidate dim {d.shape[-1]} ≠ model dim {qp.shape[1]}")
    if d.ndim == 3 and d.shape[0] != qp.shape[0]:
        raise InputError(f"quari scores: {d.shape[0]} candidate lists for {qp.shape[0]} queries")
    if d.shape[-2] == 0:
        raise InputError("quari scores: empty candidate list")


def lowrank_scores(qp: torch.Tensor, u: torch.Tensor, v: torch.Tensor, d: torch.Tensor,
                   anchor: float | None = None, dtype: torch.dtype | None = None,
                   base: torch.Tensor | None = None) -> torch.Tensor:
    """cos(q'_b, T_b d) for candidates ``d``: N × E (shared) or B × K × E (per query).

    ``dtype`` (float16/bfloat16) runs the big product [V; U] d in half precision with
    the gallery in that type; the rest is float32. ``base`` (shaped as ``d``, with an
    anchor): the candidates through a query-independent T₀, when T = T₀ + a·UᵀV — then
    T d = d̃ + a·Uᵀz with d̃ = T₀ d, so d̃ replaces d in q'ᵀd, ‖d‖² and y = U d̃.
    """
    _check(qp, u, v, d)
    if base is not None and (base.shape != d.shape or anchor is None):
        raise InputError(f"quari scores: base must have the candidates' shape {tuple(d.shape)} and needs an anchor")
    r = u.shape[1]
    half = dtype is not None and dtype != torch.float32

    def rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:   # x (N × E or B × K × E) · wᵀ per query
        if half:
            x, w = x.to(dtype), w.to(dtype)
        return (x @ w.transpose(1, 2) if x.ndim == 3 else torch.matmul(x[None], w.transpose(1, 2))).float()

    if base is None:
        zy = rows(d, v if anchor is None else torch.cat([v, u], dim=1))   # one GEMM gives z (and y)
    else:
        zy = torch.cat([rows(d, v), rows(base, u)], dim=-1)             # z = V d, y = U d̃
        d = base
    z = zy[..., :r]
    a_q = torch.einsum("bre,be->br", u, qp)                         # U q'
    gram = u @ u.transpose(1, 2)                                    # U Uᵀ, r × r
    num = torch.einsum("bnr,br->bn", z, a_q)                        # (U q')ᵀ z
    norm2 = ((z @ gram) * z).sum(-1)                                # zᵀ U Uᵀ z
    if anchor is not None:
        y = zy[..., r:]
        dq = torch.einsum("bne,be->bn", d.float(), qp) if d.ndim == 3 else qp @ d.float().T
        dd = (d.float() ** 2).sum(-1)
        num = dq + anchor * num
        norm2 = dd + 2 * anchor * (y * z).sum(-1) + anchor ** 2 * norm2
    return num / (qp.norm(dim=1, keepdim=True) * norm2.clamp_min(EPS).sqrt() + EPS)


def materialize(u: torch.Tensor, v: torch.Tensor, anchor: float | None = None) -> torch.Tensor:
    """T per query (B × E × E), as the reference implementation builds it."""
    t = u.transpose(1, 2) @ v
    return t if anchor is None else torch.eye(u.shape[2], dtype=t.dtype) + anchor * t


def materialized_scores(qp: torch.Tensor, u: torch.Tensor, v: torch.Tensor, d: torch.Tensor,
                        anchor: float | None = None) -> torch.Tensor:
    """Reference: build T (E × E) per query and transform every candidate."""
    _check(qp, u, v, d)
    t = materialize(u, v, anchor)
    td = torch.einsum("bef,nf->bne", t, d) if d.ndim == 2 else torch.einsum("bef,bnf->bne", t, d)
    return torch.nn.functional.cosine_similarity(qp[:, None], td, dim=-1)


def lowrank_scores_numpy(qp: np.ndarray, u: np.ndarray, v: np.ndarray, d: np.ndarray,
                         anchor: float | None = None) -> np.ndarray:
    """The same computation in numpy (float32), shared candidates only."""
    z = np.matmul(d[None], np.transpose(v, (0, 2, 1)))              # B × N × r
    num = np.einsum("bnr,br->bn", z, np.einsum("bre,be->br", u, qp))
    norm2 = np.einsum("bnr,bnr->bn", z @ (u @ np.transpose(u, (0, 2, 1))), z)
    if anchor is not None:
        y = np.matmul(d[None], np.transpose(u, (0, 2, 1)))
        num = qp @ d.T + anchor * num
        norm2 = (d ** 2).sum(1)[None] + 2 * anchor * np.einsum("bnr,bnr->bn", y, z) + anchor ** 2 * norm2
    return num / (np.linalg.norm(qp, axis=1, keepdims=True) * np.sqrt(np.maximum(norm2, EPS)) + EPS)


def apply_transform(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, anchor: float | None = None) -> torch.Tensor:
    """T x per query (B × E) without materialising T: x + a·Uᵀ(V x), or Uᵀ(V x) without the anchor."""
    w = torch.einsum("br,bre->be", torch.einsum("bre,be->br", v, x), u)
    return w if anchor is None else x + anchor * w


def search_vectors(qp: torch.Tensor, u: torch.Tensor, v: torch.Tensor, anchor: float | None = None) -> torch.Tensor:
    """w = Tᵀ q' (B × E): MIPS with w ranks by the numerator q'ᵀ T d. Tᵀ is T with U and V
    swapped."""
    return apply_transform(qp, v, u, anchor)
