"""The world's trained models, shipped with qshift: ``world:mini-clip``, ``world:lit-minilm``.

``world:NAME`` loads the checkpoint in ``assets/world/``; ``world:NAME@PATH`` loads a
checkpoint trained by ``qshift world train`` (same architecture). Each shipped
checkpoint has a card (``NAME.json``) with the command that reproduced it and its
measured recall.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qshift.errors import EncoderSpecError
from qshift.paths import ASSETS
from qshift.world.train import MODELS

WORLD_ASSETS = ASSETS / "world"


def shipped_checkpoint(name: str) -> Path:
    return WORLD_ASSETS / f"{name}.safetensors"


def create_world_encoder(rest: str, **kw: Any):  # noqa: ANN201 - an Encoder
    name, _, ckpt = rest.partition("@")
    if name not in MODELS:
        raise EncoderSpecError(f"world:{name}: unknown world model; known: {', '.join(MODELS)}")
    path = Path(ckpt) if ckpt else shipped_checkpoint(name)
    if not path.is_file():
        hint = "" if ckpt else (" (this install ships no trained checkpoint; train one with "
                                f"`qshift world train WORLD_DIR --model {name}` and use world:{name}@PATH)")
        raise EncoderSpecError(f"world:{name}: checkpoint {path} not found{hint}")
    spec = f"world:{name}" + (f"@{path}" if ckpt else "")
    if name == "mini-clip":
        from qshift.encoders.openclip import OpenCLIPEncoder

        return OpenCLIPEncoder(MODELS[name], pretrained=path, spec=spec, **kw)
    from qshift.encoders.lit import LiTEncoder

    return LiTEncoder(MODELS[name], path, spec=spec, **kw)
