"""LiT-style dual encoder: a frozen pretrained sentence-transformers text model, a
trained linear text head, and a trained open_clip vision tower.

Configs are JSON files with ``embed_dim``, ``vision_cfg`` (open_clip's) and
``text_st`` (``model``: an ``st:`` name or folder, ``dim``: its output size), e.g.
``model_configs/qshift-lit-minilm.json``. A checkpoint holds only the trained tensors
(``visual.*``, ``text_proj.weight``, ``logit_scale``); the text model's own weights come
from its package and are part of the fingerprint, so a different text model cannot be
mixed in silently. Text-side test-time adaptation acts on the real pretrained text
model's parameters (its LayerNorms), reachable through ``text_tower``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import _build_vision_tower
from open_clip.transform import image_transform
from PIL import Image
from torch import nn

from qshift.encoders.base import TorchEncoder
from qshift.encoders.st import SentenceTransformerEncoder
from qshift.encoders.tower import Tower
from qshift.errors import CheckpointMismatchError, EncoderSpecError
from qshift.io import sha256_file, stable_hash

MODEL_CONFIGS = Path(__file__).resolve().parent.parent / "model_configs"


def load_lit_config(name: str | Path) -> dict:
    """A LiT config by name (``model_configs/NAME.json``) or path."""
    path = Path(name)
    if not path.is_file():
        path = MODEL_CONFIGS / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in MODEL_CONFIGS.glob("*.json") if "text_st" in json.loads(p.read_text()))
        raise EncoderSpecError(f"unknown LiT config {str(name)!r}; known: {known}")
    cfg = json.loads(path.read_text("utf-8"))
    for key in ("embed_dim", "vision_cfg", "text_st"):
        if key not in cfg:
            raise EncoderSpecError(f"{path}: LiT config lacks {key!r}")
    return cfg


class LiTModel(nn.Module):
    """Vision tower + linear head over a frozen text model's sentence embedding."""

    def __init__(self, cfg: dict, text_model: nn.Module) -> None:
        super().__init__()
        self.visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"])
        self.text = text_model
        self.text_proj = nn.Linear(int(cfg["text_st"]["dim"]), cfg["embed_dim"], bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        for p in self.text.parameters():
            p.requires_grad_(False)

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("text.")}

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)

    def project_text(self, sentence_embedding: torch.Tensor) -> torch.Tensor:
        return self.text_proj(sentence_embedding)

    def encode_text(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.project_text(self.text(features)["sentence_embedding"])


class LiTEncoder(TorchEncoder):
    def __init__(self, config: str | Path, checkpoint: str | Path | None = None, device: str = "cpu",
                 batch_size: int = 64, seed: int = 0, spec: str | None = None) -> None:
        self.cfg = load_lit_config(config)
        self._st = SentenceTransformerEncoder(self.cfg["text_st"]["model"], device=device)
        torch.manual_seed(seed)
        self.model = LiTModel(self.cfg, self._st.model).to(device)
        self._ckpt = Path(checkpoint) if checkpoint else None
        if self._ckpt is not None:
            load_trained(self.model, self._ckpt)
        self.model.eval()
        self.spec = spec or f"lit:{config}" + (f"@{self._ckpt}" if self._ckpt else "")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.dim = int(self.cfg["embed_dim"])
        vcfg = self.cfg["vision_cfg"]
        self.image_size = vcfg["image_size"]
        self._preprocess = image_transform(self.image_size, is_train=False, mean=OPENAI_DATASET_MEAN,
                                           std=OPENAI_DATASET_STD)
        self.text_tower = Tower(self.model.encode_text, {"text": self.model.text, "text_proj": self.model.text_proj})
        self.image_tower = Tower(self.model.encode_image, {"visual": self.model.visual})

    def weights_hash(self) -> str:
        if self._weights_hash is None:
            own = sha256_file(self._ckpt) if self._ckpt else super().weights_hash()
            self._weights_hash = stable_hash([own, self._st.weights_hash()])
        return self._weights_hash

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self._st.tokenize(texts)

    def text_forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.encode_text(tokens)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self._preprocess(im) for im in images]).to(self.device)

    def image_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


def load_trained(model: nn.Module, path: Path) -> None:
    """Load a trained-tensor checkpoint (safetensors) into ``model``, strictly."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise EncoderSpecError(f"{path}: checkpoint file not found")
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise CheckpointMismatchError(f"{path}: cannot be read as a safetensors checkpoint ({exc})") from exc
    own = model.trained_state_dict() if hasattr(model, "trained_state_dict") else model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or extra or shapes:
        raise CheckpointMismatchError(f"{path}: does not match the model config "
                                      f"(missing {missing[:4]}, unexpected {extra[:4]}, shapes {shapes[:4]})")
    model.load_state_dict(state, strict=False)
