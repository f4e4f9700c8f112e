"""Test helpers shared by several test modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

D_IN, DIM = 12, 8


class FeatureEncoder:
    """An AdaptableEncoder over a fixed feature table."""

    spec = "test:features"
    modalities = frozenset({"text", "image"})
    device = "cpu"

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.feats = torch.randn(n, D_IN, generator=g)
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(D_IN, DIM), nn.LayerNorm(DIM))
        self.dim = DIM

    def prepare(self, queries, modality):
        return self.feats[torch.tensor([int(q) for q in queries])]

    def forward(self, x, modality):
        return self.net(x)

    def tower(self, modality):
        return self.net

    def fingerprint(self) -> str:
        return "test:features#0"

    def encode_text(self, texts, *, batch_size=None, progress=False):
        with torch.no_grad():
            return F.normalize(self.forward(self.prepare(texts, "text"), "text"), dim=-1).numpy()

    encode_images = encode_text
