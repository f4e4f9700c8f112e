"""open_clip backend: any open_clip architecture + a local checkpoint.

Spec: ``openclip:ARCH@/path/to/ckpt.{pt,bin,safetensors}``. ``openclip:ARCH`` without a
checkpoint builds randomly initialised weights (seeded, for tests) and says so in a
warning. Architectures qshift ships (``src/qshift/model_configs/*.json``) are registered
with open_clip on import, as open_clip's own JSON configs are. The tokenizer is
open_clip's real CLIP BPE tokenizer, which ships inside the open_clip wheel.
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path

import open_clip
import torch
from PIL import Image

from qshift.encoders.base import TorchEncoder
from qshift.encoders.tower import Tower
from qshift.errors import CheckpointMismatchError, EncoderSpecError
from qshift.io import sha256_file

MODEL_CONFIGS = Path(__file__).resolve().parent.parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIGS)


def list_architectures() -> list[str]:
    return open_clip.list_models()


class OpenCLIPEncoder(TorchEncoder):
    """A CLIP-style dual encoder built by ``open_clip.create_model_and_transforms``."""

    def __init__(self, arch: str, pretrained: str | Path | None = None, device: str = "cpu",
                 seed: int = 0, batch_size: int = 64, spec: str | None = None) -> None:
        if arch not in open_clip.list_models():
            close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise EncoderSpecError(f"unknown open_clip architecture {arch!r}.{hint} "
                                   f"(`qshift models` lists all {len(open_clip.list_models())})")
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, device=device)
        self._ckpt: Path | None = None
        if pretrained is not None:
            self._ckpt = Path(pretrained)
            if not self._ckpt.is_file():
                raise EncoderSpecError(f"{self._ckpt}: checkpoint file not found (for open_clip {arch!r})")
            try:
                open_clip.load_checkpoint(model, str(self._ckpt), device=device)
            except (RuntimeError, KeyError, ValueError) as exc:
                first = str(exc).strip().splitlines()[:4]
                raise CheckpointMismatchError(
                    f"{self._ckpt}: does not match open_clip architecture {arch!r}: "
                    + " ".join(first)) from exc
            except Exception as exc:  # unreadable / not a checkpoint
                raise CheckpointMismatchError(f"{self._ckpt}: cannot be read as a checkpoint ({exc})") from exc
        else:
            warnings.warn(f"openclip:{arch} has no checkpoint: weights are random (seed {seed})",
                          stacklevel=2)
        model.eval()
        self.model = model
        self.arch = arch
        self.spec = spec or f"openclip:{arch}" + (f"@{self._ckpt}" if self._ckpt else "")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = open_clip.get_tokenizer(arch)
        self._preprocess = preprocess
        self.image_size = model.visual.image_size
        with torch.inference_mode():
            self.dim = int(self.text_forward(self.tokenize(["a"])).shape[-1])
        if hasattr(model, "text"):  # CustomTextCLIP (HF text towers, SigLIP-style)
            self.text_tower = Tower(model.encode_text, {"text": model.text})
        else:
            proj = model.text_projection
            self.text_tower = Tower(
                model.encode_text,
                {"token_embedding": model.token_embedding, "transformer": model.transformer,
                 "ln_final": model.ln_final,
                 "text_projection": proj if isinstance(proj, torch.nn.Module) else None},
                {"positional_embedding": model.positional_embedding,
                 "text_projection_weight": proj if isinstance(proj, torch.nn.Parameter) else None})
        self.image_tower = Tower(model.encode_image, {"visual": model.visual})

    def weights_hash(self) -> str:
        if self._ckpt is not None:
            if self._weights_hash is None:
                self._weights_hash = sha256_file(self._ckpt)
            return self._weights_hash
        return super().weights_hash()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.device)

    def text_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self._preprocess(im) for im in images]).to(self.device)

    def image_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def preprocess_config(self) -> dict:
        """Image preprocessing as plain data (for ONNX export and the store key)."""
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg.get("size", self.image_size)
        return {"size": list(size) if isinstance(size, (tuple, list)) else [size, size],
                "mean": list(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                "std": list(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
                "interpolation": cfg.get("interpolation", "bicubic"),
                "resize_mode": cfg.get("resize_mode", "shortest")}
