"""A continual learner's state as an encoder: ``dar:/path/state.pt``.

``qshift continual run`` saves each method's learner after every step
(``runs/continual/NAME/orderK/METHOD/state.pt``). This backend loads one onto its base
encoder (named in the state, fingerprint checked), so the adapted image tower — DAR's
routed adapters, or any baseline's fine-tuned tower — serves every entry point of the
query pipeline: ``qshift encode`` / ``index`` / ``search`` / ``serve`` and the benchmark
runner. Text goes through the frozen text tower, as in the protocol; images go through
the learner's ``embed`` (for DAR: the frozen forward routes, the adapted forward mixes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qshift.errors import EncoderSpecError


class ContinualEncoder:
    """The base encoder with a continual learner's image tower."""

    def __init__(self, path: str, batch_size: int = 256, **kw: Any) -> None:
        import torch

        from qshift.continual.methods import TrainSettings, create_learner
        from qshift.encoders import create_encoder
        from qshift.io import sha256_file

        p = Path(path).expanduser()
        if not p.is_file():
            raise EncoderSpecError(f"dar:{path}: no such state file (qshift continual run writes "
                                   "runs/continual/NAME/orderK/METHOD/state.pt)")
        try:
            state = torch.load(p, weights_only=False, map_location="cpu")
            learnt = state["learner"]
            base_spec = learnt["encoder"]
        except Exception as exc:  # noqa: BLE001 - any unreadable file, named
            raise EncoderSpecError(f"dar:{path}: not a continual learner state ({type(exc).__name__}: {exc})"
                                   ) from None
        self.base = create_encoder(base_spec, **kw)
        settings = TrainSettings(**learnt.get("settings", {}))
        self.learner = create_learner(learnt["method_spec"], self.base, settings, len(learnt["seen"]))
        self.learner.load_state_dict(learnt, {})
        self.spec = f"dar:{p}"
        self.dim, self.modalities = self.base.dim, self.base.modalities
        self.batch_size = batch_size
        self._fp = f"dar:{learnt['method_spec']}:{sha256_file(p)[:16]}+{self.base.fingerprint()}"

    def encode_text(self, texts: Sequence[str], *, batch_size: int | None = None,
                    progress: bool = False) -> np.ndarray:
        return self.base.encode_text(texts, batch_size=batch_size, progress=progress)

    def encode_images(self, images: Sequence[Any], *, batch_size: int | None = None,
                      progress: bool = False) -> np.ndarray:
        images = list(images)
        b = batch_size or self.batch_size
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate([self.learner.embed(self.base.prepare(images[s:s + b], "image"))
                               for s in range(0, len(images), b)]).astype(np.float32)

    def temperature(self) -> float | None:
        return self.base.temperature()

    def fingerprint(self) -> str:
        return self._fp
