"""Which parameters of the query tower adapt (the ``configure_model``/``collect_params``
of Tent, for towers of CLIP-style and BERT-style encoders).

* ``norm`` (default): affine weight and bias of every LayerNorm (and any *Norm layer),
  and of BatchNorm layers in CNN towers (e.g. open_clip's ModifiedResNet). Documented
  choice: BatchNorm keeps its running statistics (the engine runs the tower in eval
  mode) instead of Tent's per-batch statistics, so that batches of 1 and all-OOD
  batches behave like any other batch; only the affine parameters adapt.
* ``last-k``: every parameter of the last k transformer blocks.
* ``lora``: rank-r low-rank updates W + B·A on the attention projections (open_clip's
  ``in_proj_weight``/``out_proj``, BERT's query/key/value), via torch parametrizations;
  B starts at zero, so the adapted model starts equal to the frozen one.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn.utils import parametrize

from qshift.errors import InputError

MODES = ("norm", "last-k", "lora")
_ATTN_LINEAR = re.compile(r"(attn\.out_proj|attention\.self\.(query|key|value)|attention\.output\.dense)$")


class TowerFlags:
    """A tower's ``requires_grad`` flags and train/eval modes, by name, to put back exactly
    (modules or parameters added since, e.g. LoRA's, are left as they are)."""

    def __init__(self, tower: nn.Module) -> None:
        self.flags = {n: p.requires_grad for n, p in tower.named_parameters()}
        self.modes = {n: m.training for n, m in tower.named_modules()}

    def restore_flags(self, tower: nn.Module) -> None:
        for n, p in tower.named_parameters():
            p.requires_grad_(self.flags.get(n, p.requires_grad))

    def restore_modes(self, tower: nn.Module) -> None:
        for n, m in tower.named_modules():
            m.training = self.modes.get(n, m.training)


class LoRA(nn.Module):
    """W ↦ W + (alpha / r) · B A, with A ~ N(0, 1/r) and B = 0 at the start."""

    def __init__(self, shape: torch.Size, rank: int, alpha: float = 1.0) -> None:
        super().__init__()
        out_f, in_f = shape
        self.A = nn.Parameter(torch.randn(rank, in_f) / rank)
        self.B = nn.Parameter(torch.zeros(out_f, rank))
        self.scale = alpha / rank

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.scale * (self.B @ self.A).to(w.dtype)


def _blocks(tower: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a tower, in order."""
    best: list[nn.Module] = []
    for _, mod in tower.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) > len(best) and len(mod) > 1:
            kinds = {type(m) for m in mod}
            if len(kinds) == 1:
                best = list(mod)
    return best


def select_params(tower: nn.Module | None, mode: str = "norm", last_k: int = 1, lora_rank: int = 4,
                  generator: torch.Generator | None = None) -> list[nn.Parameter]:
    """Freeze ``tower`` except the chosen parameters; returns them (empty list: error)."""
    if tower is None:
        raise InputError("this encoder exposes no torch module for its query tower, so it cannot be adapted "
                         "(ONNX encoders are inference-only; use the torch/open_clip/st spec of the model)")
    if mode not in MODES:
        raise InputError(f"unknown parameter selection {mode!r}; known: {', '.join(MODES)}")
    for p in tower.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    if mode == "norm":
        for mod in tower.modules():
            if isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) \
                    or type(mod).__name__.endswith(("LayerNorm", "RMSNorm")):
                params += [p for p in (getattr(mod, "weight", None), getattr(mod, "bias", None))
                           if isinstance(p, nn.Parameter)]
    elif mode == "last-k":
        blocks = _blocks(tower)
        if last_k < 1:
            raise InputError(f"last_k must be >= 1, got {last_k}")
        for b in blocks[-last_k:]:
            params += list(b.parameters())
    else:
        if lora_rank < 1:
            raise InputError(f"lora_rank must be >= 1, got {lora_rank}")
        for name, mod in list(tower.named_modules()):
            targets = []
            if isinstance(mod, nn.MultiheadAttention) and mod.in_proj_weight is not None:
                targets.append("in_proj_weight")
            if isinstance(mod, nn.Linear) and _ATTN_LINEAR.search(name):
                targets.append("weight")
            for t in targets:
                if parametrize.is_parametrized(mod, t):
                    lora = mod.parametrizations[t][0]
                else:
                    w = getattr(mod, t)
                    lora = LoRA(w.shape, lora_rank).to(w.device)
                    parametrize.register_parametrization(mod, t, lora)
                params += [lora.A, lora.B]
    seen, unique = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    for p in unique:
        p.requires_grad_(True)
    if not unique:
        raise InputError(f"the query tower has no parameters for selection {mode!r} "
                         f"({type(tower).__name__}: no norm layers / blocks / attention projections found)")
    return unique


def remove_lora(tower: nn.Module) -> None:
    """Undo :func:`select_params` with ``mode='lora'`` (drop the low-rank updates)."""
    for mod in tower.modules():
        if parametrize.is_parametrized(mod):
            for t in list(mod.parametrizations.keys()):
                parametrize.remove_parametrizations(mod, t, leave_parametrized=False)
