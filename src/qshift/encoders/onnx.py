"""onnxruntime backend: separate image and text ONNX graphs in one directory.

Spec: ``onnx:/path/to/dir``. The directory holds ``text.onnx`` and/or ``image.onnx`` and
``qshift_onnx.json``, which names the tokenizer and image preprocessing so that the
graphs see exactly the inputs the torch model saw. :func:`export_onnx` writes such a
directory from an open_clip or transformers encoder.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from qshift.encoders.base import IMAGE, TEXT, TorchEncoder
from qshift.errors import EncoderSpecError
from qshift.io import read_json, sha256_file, stable_hash, write_json

CONFIG = "qshift_onnx.json"


class ONNXEncoder(TorchEncoder):
    """Runs exported towers with onnxruntime; no torch towers, so it cannot be adapted."""

    def __init__(self, path: str | Path, batch_size: int = 64, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not (self.path / CONFIG).is_file():
            raise EncoderSpecError(f"{self.path}: not a qshift ONNX directory (no {CONFIG}; "
                                   "write one with qshift.encoders.onnx.export_onnx)")
        self.cfg = read_json(self.path / CONFIG)
        self.spec = f"onnx:{self.path}"
        self.dim = int(self.cfg["dim"])
        self.batch_size = batch_size
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.sessions: dict[str, Any] = {}
        for modality in (TEXT, IMAGE):
            if modality in self.cfg:
                f = self.path / self.cfg[modality]["file"]
                if not f.is_file():
                    raise EncoderSpecError(f"{f}: ONNX graph named in {CONFIG} is missing")
                self.sessions[modality] = ort.InferenceSession(str(f), opts, providers=["CPUExecutionProvider"])
        self.modalities = frozenset(self.sessions)
        self._tokenizer = self._load_tokenizer(self.cfg.get(TEXT, {}).get("tokenizer"))
        self._transform = self._load_transform(self.cfg.get(IMAGE, {}).get("preprocess"))

    def _load_tokenizer(self, cfg: dict | None) -> Any:
        if cfg is None:
            return None
        if cfg["kind"] == "openclip":
            import open_clip

            import qshift.encoders.openclip  # noqa: F401  (registers qshift's configs)
            return open_clip.get_tokenizer(cfg["arch"])
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path / cfg["path"], local_files_only=True)

    def _load_transform(self, cfg: dict | None) -> Any:
        if cfg is None:
            return None
        if cfg["kind"] == "openclip":
            import open_clip

            return open_clip.image_transform(tuple(cfg["size"]), is_train=False, mean=tuple(cfg["mean"]),
                                             std=tuple(cfg["std"]), resize_mode=cfg["resize_mode"],
                                             interpolation=cfg["interpolation"])
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(self.path / cfg["path"], local_files_only=True)
        return lambda im: proc(images=[im], return_tensors="pt")["pixel_values"][0]

    def weights_hash(self) -> str:
        if self._weights_hash is None:
            files = sorted(p for p in self.path.rglob("*") if p.is_file())
            self._weights_hash = stable_hash([(str(p.relative_to(self.path)), sha256_file(p)) for p in files])
        return self._weights_hash

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        tcfg = self.cfg[TEXT]
        if tcfg["tokenizer"]["kind"] == "openclip":
            return {"input_ids": self._tokenizer(texts).numpy().astype(np.int64)}
        enc = self._tokenizer(texts, padding=tcfg["tokenizer"].get("padding", True), truncation=True,
                              max_length=tcfg["context_length"], return_tensors="np")
        return {k: enc[k].astype(np.int64) for k in tcfg["inputs"]}

    def text_forward(self, tokens: dict[str, np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(self.sessions[TEXT].run(None, tokens)[0])

    def preprocess(self, images: list[Image.Image]) -> np.ndarray:
        return torch.stack([self._transform(im) for im in images]).numpy()

    def image_forward(self, pixels: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.sessions[IMAGE].run(None, {"pixel_values": pixels})[0])


def export_onnx(encoder: TorchEncoder, outdir: str | Path, opset: int = 17) -> Path:
    """Export the towers of an open_clip or transformers encoder to ``outdir``."""
    from qshift.encoders.hf import HFEncoder
    from qshift.encoders.openclip import OpenCLIPEncoder

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {"dim": encoder.dim, "source": encoder.fingerprint()}
    sample_text = encoder.tokenize(["a photo of a cat", "two dogs"])
    sample_px = encoder.preprocess([Image.new("RGB", (48, 40), (120, 30, 200))] * 2)
    if isinstance(encoder, OpenCLIPEncoder):
        text_inputs = {"input_ids": sample_text}
        cfg[TEXT] = {"file": "text.onnx", "tokenizer": {"kind": "openclip", "arch": encoder.arch},
                     "inputs": ["input_ids"], "context_length": int(sample_text.shape[1])}
        cfg[IMAGE] = {"file": "image.onnx", "preprocess": {"kind": "openclip", **encoder.preprocess_config()}}
    elif isinstance(encoder, HFEncoder):
        text_inputs = dict(sample_text)
        encoder.tokenizer.save_pretrained(outdir / "tokenizer")
        encoder.processor.save_pretrained(outdir / "processor")
        padding = "max_length" if encoder.model_type == "siglip" else True
        cfg[TEXT] = {"file": "text.onnx", "inputs": sorted(text_inputs),
                     "tokenizer": {"kind": "hf", "path": "tokenizer", "padding": padding},
                     "context_length": int(encoder.model.config.text_config.max_position_embeddings)}
        cfg[IMAGE] = {"file": "image.onnx", "preprocess": {"kind": "hf", "path": "processor"}}
    else:
        raise EncoderSpecError(f"ONNX export supports open_clip and transformers encoders, not {encoder.spec!r}")

    names = list(text_inputs)

    class _Text(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower = encoder.text_tower  # registers the weights as parameters

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return encoder.text_forward(dict(zip(names, args)) if len(names) > 1 or
                                        not isinstance(encoder, OpenCLIPEncoder) else args[0])

    class _Image(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower = encoder.image_tower

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return encoder.image_forward(pixels)

    axes_t = {n: {0: "batch", 1: "seq"} for n in names} | {"embedding": {0: "batch"}}
    # Trace with autograd on: under no_grad nn.MultiheadAttention takes a fused fast
    # path (aten::_native_multi_head_attention) that has no ONNX symbolic.
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about constant shapes / legacy exporter
        torch.onnx.export(_Text(), tuple(text_inputs[n] for n in names), str(outdir / "text.onnx"),
                          input_names=names, output_names=["embedding"], dynamic_axes=axes_t,
                          opset_version=opset, dynamo=False)
        torch.onnx.export(_Image(), (sample_px,), str(outdir / "image.onnx"), input_names=["pixel_values"],
                          output_names=["embedding"],
                          dynamic_axes={"pixel_values": {0: "batch"}, "embedding": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    write_json(outdir / CONFIG, cfg)
    return outdir
