"""transformers backend: CLIP or SigLIP dual encoders from a local directory.

Spec: ``hf:/path/to/dir`` — a directory written by ``save_pretrained`` holding the
model (``CLIPModel`` or ``SiglipModel``), its tokenizer and image processor.
Hub names are not resolved: qshift runs offline (``HF_HUB_OFFLINE=1`` is set here).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch
from PIL import Image

from qshift.encoders.base import TorchEncoder
from qshift.encoders.tower import Tower
from qshift.errors import CheckpointMismatchError, EncoderSpecError
from qshift.io import sha256_file, stable_hash

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _features(out: object) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose pooler_output is the projection."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]


class HFEncoder(TorchEncoder):
    """CLIP/SigLIP via ``AutoModel`` + ``AutoTokenizer`` + ``AutoImageProcessor``."""

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 64) -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise EncoderSpecError(f"{self.path}: not a transformers model directory (no config.json)")
        try:
            model = AutoModel.from_pretrained(self.path, local_files_only=True).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self.processor = AutoImageProcessor.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointMismatchError(f"{self.path}: cannot load model/tokenizer/processor ({exc})") from exc
        if not (hasattr(model, "get_text_features") and hasattr(model, "get_image_features")):
            raise EncoderSpecError(f"{self.path}: {type(model).__name__} is not a dual image-text encoder")
        self.model = model
        self.model_type = model.config.model_type
        self.spec = f"hf:{self.path}"
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.dim = int(getattr(model.config, "projection_dim", 0) or model.config.text_config.hidden_size)
        text_proj = getattr(model, "text_projection", None)
        visual_proj = getattr(model, "visual_projection", None)
        self.text_tower = Tower(lambda **kw: _features(model.get_text_features(**kw)),
                                {"text_model": model.text_model, "text_projection": text_proj})
        self.image_tower = Tower(lambda **kw: _features(model.get_image_features(**kw)),
                                 {"vision_model": model.vision_model, "visual_projection": visual_proj})

    def weights_hash(self) -> str:
        if self._weights_hash is None:
            files = sorted(p for p in self.path.iterdir() if p.is_file())
            self._weights_hash = stable_hash([(p.name, sha256_file(p)) for p in files])
        return self._weights_hash

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        # SigLIP was trained with max-length padding and has no attention mask.
        padding = "max_length" if self.model_type == "siglip" else True
        max_len = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        enc = self.tokenizer(texts, padding=padding, truncation=True, max_length=max_len,
                             return_tensors="pt")
        keep = ("input_ids", "attention_mask") if self.model_type != "siglip" else ("input_ids",)
        return {k: v.to(self.device) for k, v in enc.items() if k in keep}

    def text_forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.text_tower(**tokens)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)

    def image_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_tower(pixel_values=pixels)


def write_clip_tokenizer_files(outdir: str | Path) -> Path:
    """Write HF ``vocab.json``/``merges.txt`` built from open_clip's shipped CLIP BPE.

    The two tokenizers then share one vocabulary (ids agree), so a tiny CLIP saved with
    ``save_pretrained`` needs no hub download for its tokenizer.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (outdir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), "utf-8")
    (outdir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    return outdir
