"""The encoder protocol and the batching shared by every torch-backed encoder.

An encoder turns captions and images into L2-normalised float32 vectors of one
dimension. ``encode_text``/``encode_images`` run under ``torch.inference_mode`` in
batches with an optional progress bar.

Test-time adaptation needs more than vectors: :class:`AdaptableEncoder` is that
contract — ``prepare`` (validate + tokenize texts, or load + preprocess images, exactly
as ``encode_*`` do), ``forward`` (the differentiable query-tower forward of prepared
inputs, unnormalised), ``tower`` (the tower's ``nn.Module``, whose parameters adapt) and
``device``. Every :class:`TorchEncoder` implements it from its four hooks; the
adaptation engine calls only these.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from qshift.data.images import ImageLike, load_image
from qshift.errors import InputError
from qshift.progress import progress_bar

if TYPE_CHECKING:  # torch is imported where it is used: a cache hit never needs it
    import torch

TEXT, IMAGE = "text", "image"


@runtime_checkable
class Encoder(Protocol):
    """What every backend offers; see :class:`TorchEncoder` for the torch ones."""

    spec: str
    dim: int
    modalities: frozenset[str]

    def encode_text(self, texts: Sequence[str], *, batch_size: int | None = None,
                    progress: bool = False) -> np.ndarray: ...

    def encode_images(self, images: Sequence[ImageLike], *, batch_size: int | None = None,
                      progress: bool = False) -> np.ndarray: ...

    def fingerprint(self) -> str: ...


@runtime_checkable
class AdaptableEncoder(Encoder, Protocol):
    """What the adaptation engine calls (see the module docstring)."""

    device: Any

    def prepare(self, queries: Sequence[Any], modality: str) -> Any: ...

    def forward(self, prepared: Any, modality: str) -> torch.Tensor: ...

    def tower(self, modality: str) -> torch.nn.Module | None: ...


def check_texts(texts: Sequence[str]) -> list[str]:
    """Reject non-strings and empty/whitespace captions, naming their position."""
    if isinstance(texts, str):
        texts = [texts]
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise InputError(f"text #{i}: expected a string, got {type(t).__name__}")
        if not t.strip():
            raise InputError(f"text #{i}: empty or whitespace-only caption")
    return out


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.nn.functional.normalize(x.float(), dim=-1)


def state_dict_hash(module: torch.nn.Module) -> str:
    """SHA-256 over a module's tensors (names, shapes and bytes), for random-init models."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


class TorchEncoder:
    """Batching, normalisation and no-grad plumbing for torch-backed encoders.

    Subclasses set ``spec``, ``dim``, ``modalities``, ``text_tower``/``image_tower`` and
    implement the four hooks ``tokenize``, ``text_forward``, ``preprocess`` and
    ``image_forward`` (forward hooks return unnormalised embeddings).
    """

    spec: str
    dim: int
    modalities: frozenset[str] = frozenset({TEXT, IMAGE})
    text_tower: torch.nn.Module | None = None
    image_tower: torch.nn.Module | None = None
    batch_size: int = 64
    device: Any = "cpu"
    _weights_hash: str | None = None

    # -- hooks -------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> Any:
        raise NotImplementedError

    def text_forward(self, tokens: Any) -> torch.Tensor:
        raise NotImplementedError

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def image_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weights_hash(self) -> str:
        """Identity of the weights; backends with a checkpoint file override this."""
        if self._weights_hash is None:
            towers = [t for t in (self.text_tower, self.image_tower) if t is not None]
            self._weights_hash = hashlib.sha256(
                "".join(state_dict_hash(t) for t in towers).encode()).hexdigest()
        return self._weights_hash

    # -- public API --------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Spec + weights hash: two encoders with equal fingerprints give equal vectors."""
        return f"{self.spec}#{self.weights_hash()[:16]}"

    def _require(self, modality: str) -> None:
        if modality not in self.modalities:
            raise InputError(f"encoder {self.spec!r} has no {modality} tower "
                             f"(it encodes: {', '.join(sorted(self.modalities))})")

    def temperature(self) -> float | None:
        """The trained softmax temperature (1 / exp(logit_scale)) of a contrastive model,
        or None when the encoder was not trained with one (e.g. sentence-transformers)."""
        scale = getattr(getattr(self, "model", None), "logit_scale", None)
        if scale is None or not hasattr(scale, "detach"):
            return None
        import torch

        return float(1.0 / torch.exp(scale.detach().float().reshape(-1)[0]))

    # -- AdaptableEncoder ----------------------------------------------------------------
    def prepare(self, queries: Sequence[Any], modality: str) -> Any:
        """Model inputs of ``queries``: checked + tokenized texts, or loaded + preprocessed images."""
        self._require(modality)
        if modality == TEXT:
            return self.tokenize(check_texts(queries))
        return self.preprocess([load_image(x) for x in queries])

    def forward(self, prepared: Any, modality: str) -> torch.Tensor:
        """Unnormalised embeddings of prepared inputs, with the autograd graph kept."""
        return self.text_forward(prepared) if modality == TEXT else self.image_forward(prepared)

    def tower(self, modality: str) -> torch.nn.Module | None:
        return self.text_tower if modality == TEXT else self.image_tower

    def encode_text_torch(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised text embeddings with the autograd graph kept (for adaptation)."""
        return l2_normalize(self.forward(self.prepare(texts, TEXT), TEXT))

    def encode_images_torch(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Normalised image embeddings with the autograd graph kept (for adaptation)."""
        return l2_normalize(self.forward(self.prepare(images, IMAGE), IMAGE))

    def encode_text(self, texts: Sequence[str], *, batch_size: int | None = None,
                    progress: bool = False) -> np.ndarray:
        self._require(TEXT)
        texts = check_texts(texts)
        # Longest first: batches of similar length waste less padding.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        return self._run(order, lambda idx: self.text_forward(self.tokenize([texts[i] for i in idx])),
                         len(texts), batch_size, progress, "encode text")

    def encode_images(self, images: Sequence[ImageLike], *, batch_size: int | None = None,
                      progress: bool = False) -> np.ndarray:
        self._require(IMAGE)
        images = list(images)
        order = np.arange(len(images))
        return self._run(order, lambda idx: self.image_forward(
            self.preprocess([load_image(images[i]) for i in idx])),
            len(images), batch_size, progress, "encode images")

    def _run(self, order: np.ndarray, fn: Any, n: int, batch_size: int | None, progress: bool,
             label: str) -> np.ndarray:
        bs = int(batch_size or self.batch_size)
        if bs < 1:
            raise InputError(f"batch_size must be >= 1, got {bs}")
        import torch

        out = np.empty((n, self.dim), dtype=np.float32)
        with torch.inference_mode(), progress_bar(label, n, progress and n > 0) as bar:
            for start in range(0, n, bs):
                idx = order[start:start + bs]
                emb = l2_normalize(fn(idx)).cpu().numpy()
                if emb.shape[1] != self.dim:
                    raise InputError(f"{self.spec}: model returned dim {emb.shape[1]}, expected {self.dim}")
                out[idx] = emb
                bar.advance(len(idx))
        if not np.isfinite(out).all():
            bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
            raise InputError(f"{self.spec}: non-finite embeddings for inputs {bad[:10].tolist()}")
        return out
