"""Encoders behind one protocol, resolved from spec strings.

=====================================  ==============================================
``openclip:ARCH@/path/ckpt.pt``        open_clip architecture + local checkpoint
``openclip:ARCH``                      same, random weights (tests)
``hf:/path/dir``                       transformers CLIP/SigLIP (``save_pretrained``)
``onnx:/path/dir``                     exported towers run by onnxruntime
``st:all-MiniLM-L6-v2`` / ``st:/dir``  sentence-transformers text encoder
``lit:CONFIG@/path/ckpt.safetensors``  frozen sentence-transformers text + trained ViT
``world:mini-clip``                    the shipped mini-CLIP trained on the world
``world:lit-minilm``                   the shipped LiT model (frozen MiniLM text)
``world:NAME@/path/model.safetensors`` a world model you trained yourself
``dar:/path/state.pt``                 a continual learner's image tower (DAR, …) on
                                       its base encoder (``qshift continual run``)
=====================================  ==============================================

Backends register themselves in ``BACKENDS``; third parties may add their own prefix
with :func:`register_backend`.
"""

from __future__ import annotations

from typing import Any, Callable

from qshift.encoders.base import IMAGE, TEXT, Encoder, TorchEncoder, check_texts
from qshift.errors import EncoderSpecError

__all__ = ["Encoder", "TorchEncoder", "create_encoder", "register_backend", "BACKENDS", "TEXT", "IMAGE",
           "check_texts"]


def _openclip(rest: str, **kw: Any) -> Encoder:
    from qshift.encoders.openclip import OpenCLIPEncoder

    arch, _, ckpt = rest.partition("@")
    return OpenCLIPEncoder(arch, pretrained=ckpt or None, **kw)


def _hf(rest: str, **kw: Any) -> Encoder:
    from qshift.encoders.hf import HFEncoder

    return HFEncoder(rest, **kw)


def _onnx(rest: str, **kw: Any) -> Encoder:
    from qshift.encoders.onnx import ONNXEncoder

    kw.pop("device", None)
    return ONNXEncoder(rest, **kw)


def _st(rest: str, **kw: Any) -> Encoder:
    from qshift.encoders.st import SentenceTransformerEncoder

    return SentenceTransformerEncoder(rest, **kw)


def _lit(rest: str, **kw: Any) -> Encoder:
    from qshift.encoders.lit import LiTEncoder

    config, _, ckpt = rest.partition("@")
    return LiTEncoder(config, ckpt or None, **kw)


def _world(rest: str, **kw: Any) -> Encoder:
    from qshift.world.models import create_world_encoder

    return create_world_encoder(rest, **kw)


def _dar(rest: str, **kw: Any) -> Encoder:
    from qshift.continual.encoder import ContinualEncoder

    return ContinualEncoder(rest, **kw)


BACKENDS: dict[str, Callable[..., Encoder]] = {"openclip": _openclip, "hf": _hf, "onnx": _onnx, "st": _st,
                                               "lit": _lit, "world": _world, "dar": _dar}


def register_backend(prefix: str, factory: Callable[..., Encoder]) -> None:
    """Make ``prefix:REST`` specs resolve through ``factory(REST, **kwargs)``."""
    BACKENDS[prefix] = factory


def create_encoder(spec: str, **kwargs: Any) -> Encoder:
    """Build the encoder a spec string names (see the module docstring)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise EncoderSpecError(f"encoder spec {spec!r} has no backend prefix; expected one of "
                               + ", ".join(f"'{p}:...'" for p in BACKENDS))
    prefix, rest = spec.split(":", 1)
    if prefix not in BACKENDS:
        raise EncoderSpecError(f"encoder spec {spec!r}: unknown backend {prefix!r}; known: {sorted(BACKENDS)}")
    if not rest:
        raise EncoderSpecError(f"encoder spec {spec!r}: nothing after {prefix!r}:")
    return BACKENDS[prefix](rest, **kwargs)
