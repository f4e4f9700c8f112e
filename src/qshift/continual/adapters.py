"""Per-domain adapters on a frozen tower (DAR, reconstruction): residual bottlenecks
(:class:`AdapterBank`) or norm affines (:class:`NormBank`).

An adapter is a small residual branch h ← h + up(GELU(down(h))) after each residual
block of the tower (a 1×1-conv pair on feature maps, a linear pair on token features),
``up`` zero-initialised so a new adapter starts as the identity. One :class:`AdapterBank`
holds a branch set per domain and runs, per forward: no adapter, one domain's, or a
per-sample mixture Σ_d w_d(x) · branch_d(h) with weights from the router — a mixture of
the branches' outputs (DAM merges adapter *weights* per sample; for non-linear branches
mixing outputs is the well-defined choice, and with one-hot weights both are the same).

Adding a domain creates its branches from a seed and trains only them; every earlier
domain's tensors stay bit-identical (tested).

A norm adapter (``adapter: norm``) is a domain's own copy of every normalisation layer's
affine (γ, β) — BatchNorm with the frozen running statistics, LayerNorm — started at the
base values (the identity). Reconstruction: the abstract does not name the adapter; the
world's domains are image corruptions, which shift low-level feature statistics, and
domain-specific normalisation is the classic fix for that (DSBN; norm layers are also
what Tent/REST adapt). Mixing is exact weight merging: γ(x) = (1 − Σ_d w_d)·γ₀ + Σ_d
w_d·γ_d (the same for β), so all-zero weights give the base model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qshift.errors import InputError

SITE_CLASSES = ("Bottleneck", "ResidualAttentionBlock", "BertLayer", "Block")


def adapter_sites(tower: nn.Module) -> list[tuple[str, nn.Module]]:
    """The tower's residual blocks, in forward order."""
    sites = [(n, m) for n, m in tower.named_modules() if type(m).__name__ in SITE_CLASSES]
    if not sites:
        raise InputError(f"{type(tower).__name__}: no residual blocks to attach adapters to "
                         f"(looked for {', '.join(SITE_CLASSES)})")
    return sites


class Branch(nn.Module):
    """One residual bottleneck: feature maps (B×C×H×W) or tokens (…×D)."""

    def __init__(self, width: int, rank: int, conv: bool) -> None:
        super().__init__()
        if conv:
            self.down, self.up = nn.Conv2d(width, rank, 1), nn.Conv2d(rank, width, 1)
        else:
            self.down, self.up = nn.Linear(width, rank), nn.Linear(rank, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = nn.GELU()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h)))


def _probe_shapes(tower: nn.Module, sites: list[tuple[str, nn.Module]], example: Any,
                  forward: Any) -> list[tuple[int, bool, int]]:
    """(width, is-feature-map, batch dim) of every site's output, from one forward."""
    shapes: list[tuple[int, bool, int]] = [None] * len(sites)  # type: ignore[list-item]
    hooks = []
    for i, (_, m) in enumerate(sites):
        def hook(mod: nn.Module, inp: Any, out: Any, i: int = i) -> None:
            h = out[0] if isinstance(out, tuple) else out
            batch_dim = 1 if getattr(mod, "batch_first", True) is False and h.ndim == 3 else 0
            shapes[i] = (h.shape[1], True, 0) if h.ndim == 4 else (h.shape[-1], False, batch_dim)
        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            forward(example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


class _Bank(nn.Module):
    """What both banks share: per-domain modules in ``domains``, hooks in ``_hooks``."""

    domains: nn.ModuleDict
    _hooks: list

    def parameters_of(self, name: str) -> list[nn.Parameter]:
        return list(self.domains[name].parameters())

    def n_parameters(self, name: str | None = None) -> int:
        names = [name] if name else list(self.domains)
        return sum(p.numel() for n in names for p in self.domains[n].parameters())

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class AdapterBank(_Bank):
    """Branches per domain on the sites of one tower, applied by forward hooks."""

    def __init__(self, tower: nn.Module, example: Any, forward: Any, rank: int = 16) -> None:
        super().__init__()
        self.sites = adapter_sites(tower)
        self.shapes = _probe_shapes(tower, self.sites, example, forward)
        self.rank = int(rank)
        self.domains = nn.ModuleDict()
        self.weights: torch.Tensor | None = None   # B × D per-sample mixture, or None
        self.active: str | None = None             # one domain for the whole batch
        self._hooks = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(self.sites)]

    def add_domain(self, name: str, seed: int = 0) -> nn.ModuleList:
        if name in self.domains:
            raise InputError(f"adapters: a domain named {name!r} exists already")
        torch.manual_seed(seed)
        branches = nn.ModuleList([Branch(w, self.rank, conv) for w, conv, _ in self.shapes])
        self.domains[name] = branches
        return branches

    def _hook(self, i: int) -> Any:
        def hook(mod: nn.Module, inp: Any, out: Any) -> Any:
            if self.active is None and self.weights is None:
                return out
            h = out[0] if isinstance(out, tuple) else out
            if self.active is not None:
                h = h + self.domains[self.active][i](h)
            else:
                batch_dim = self.shapes[i][2]
                extra = torch.zeros_like(h)
                for k, name in enumerate(self.domains):
                    w = self.weights[:, k]
                    if not bool((w > 0).any()):
                        continue
                    shape = [1] * h.ndim
                    shape[batch_dim] = -1
                    extra = extra + w.view(shape).to(h.dtype) * self.domains[name][i](h)
                h = h + extra
            return (h, *out[1:]) if isinstance(out, tuple) else h
        return hook


NORM_CLASSES = (nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm)


class NormBank(_Bank):
    """Per-domain γ, β of the tower's norm layers, applied by forward hooks (same interface
    as :class:`AdapterBank`: ``add_domain``, ``active``, ``weights``, ``remove``)."""

    def __init__(self, tower: nn.Module, example: Any = None, forward: Any = None, rank: int = 0) -> None:
        super().__init__()
        self.norms = [m for m in tower.modules() if isinstance(m, NORM_CLASSES) and getattr(m, "weight", None)
                      is not None]
        if not self.norms:
            raise InputError(f"{type(tower).__name__}: no affine norm layers to adapt")
        # token tensors are (seq, batch, dim) in towers that are not batch-first
        self.batch_first = all(getattr(m, "batch_first", True) for m in tower.modules() if hasattr(m, "batch_first"))
        self.domains = nn.ModuleDict()
        self.weights: torch.Tensor | None = None
        self.active: str | None = None
        self._hooks = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.norms)]

    def add_domain(self, name: str, seed: int = 0) -> nn.ParameterList:
        if name in self.domains:
            raise InputError(f"adapters: a domain named {name!r} exists already")
        params = nn.ParameterList()
        for m in self.norms:
            params.append(nn.Parameter(m.weight.detach().clone()))
            params.append(nn.Parameter(m.bias.detach().clone() if m.bias is not None else torch.zeros_like(m.weight)))
        self.domains[name] = params
        return params

    @staticmethod
    def _normalised(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(mod, nn.LayerNorm):
            return torch.nn.functional.layer_norm(x, mod.normalized_shape, None, None, mod.eps)
        shape = [1, -1] + [1] * (x.ndim - 2)
        return (x - mod.running_mean.view(shape)) / torch.sqrt(mod.running_var.view(shape) + mod.eps)

    def _hook(self, i: int) -> Any:
        def hook(mod: nn.Module, inp: Any, out: Any) -> Any:
            if self.active is None and self.weights is None:
                return out
            x = inp[0]
            xh = self._normalised(mod, x)
            cdim = x.ndim - len(mod.normalized_shape) if isinstance(mod, nn.LayerNorm) else 1
            if self.active is not None:
                g, b = self.domains[self.active][2 * i], self.domains[self.active][2 * i + 1]
                shape = [1] * x.ndim
                shape[cdim:cdim + g.ndim] = list(g.shape)
                return xh * g.view(shape) + b.view(shape)
            w = self.weights.to(x.dtype)                                        # B × D
            g = (1 - w.sum(1, keepdim=True)) * mod.weight.detach()[None].flatten(1)
            b = (1 - w.sum(1, keepdim=True)) * (mod.bias.detach() if mod.bias is not None
                                                else torch.zeros_like(mod.weight))[None].flatten(1)
            for k, name in enumerate(self.domains):
                g = g + w[:, k:k + 1] * self.domains[name][2 * i].flatten()[None]
                b = b + w[:, k:k + 1] * self.domains[name][2 * i + 1].flatten()[None]
            bdim = 0 if not isinstance(mod, nn.LayerNorm) or x.ndim == 2 or self.batch_first else 1
            shape = [1] * x.ndim
            shape[bdim] = -1
            shape[cdim:cdim + mod.weight.ndim] = list(mod.weight.shape)
            return xh * g.view(shape) + b.view(shape)
        return hook


BANKS = {"bottleneck": AdapterBank, "norm": NormBank}
