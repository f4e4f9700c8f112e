"""A view onto the modules of one tower of a dual encoder.

Dual encoders keep both towers in one ``nn.Module``; test-time adaptation must see only
the query-side tower's parameters. ``Tower`` registers exactly those submodules and
parameters (shared, not copied) and forwards through the model's own encode function.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Tower(nn.Module):
    def __init__(self, forward_fn: Callable[..., torch.Tensor], modules: dict[str, nn.Module],
                 params: dict[str, nn.Parameter] | None = None) -> None:
        super().__init__()
        self._forward_fn = forward_fn
        for name, mod in modules.items():
            if mod is not None:
                self.add_module(name, mod)
        for name, p in (params or {}).items():
            if p is not None:
                self.register_parameter(name, p)

    def forward(self, *args, **kwargs) -> torch.Tensor:  # noqa: D102
        return self._forward_fn(*args, **kwargs)
