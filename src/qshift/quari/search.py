"""Retrieval with a trained QuARI on embedding arrays: exact full scoring, top-k
re-ranking, full search on a FAISS index; TA checkpoints. (The pipeline stages are in
:mod:`qshift.quari.stage`.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from qshift.errors import CheckpointMismatchError, InputError
from qshift.quari.model import QuARI
from qshift.quari.scoring import lowrank_scores, search_vectors

@torch.inference_mode()
def quari_scores(model: QuARI, queries: np.ndarray, gallery: np.ndarray, batch: int = 64,
                 dtype: torch.dtype | None = None) -> np.ndarray:
    """Exact QuARI scores of every query against every gallery row (Q × N)."""
    if gallery.shape[1] != model.cfg.dim or queries.shape[1] != model.cfg.dim:
        raise InputError(f"quari: embeddings of dim {queries.shape[1]}/{gallery.shape[1]}, model expects "
                         f"{model.cfg.dim}")
    g = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32))
    base = model.static_map(g) if model.cfg.static_rank else None      # static part: once, not per query
    out = np.empty((len(queries), len(gallery)), np.float32)
    for s in range(0, len(queries), batch):
        qp, u, v = model(torch.from_numpy(np.ascontiguousarray(queries[s:s + batch], dtype=np.float32)))
        out[s:s + batch] = lowrank_scores(qp, *model.per_query_rows(u, v), g, model.cfg.anchor, dtype=dtype,
                                          base=base).numpy()
    return out


@torch.inference_mode()
def quari_rerank(model: QuARI, queries: np.ndarray, gallery: np.ndarray, candidates: np.ndarray,
                 batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Re-score each query's first-stage candidates (B × K indices); returns (scores, labels)
    sorted by QuARI score."""
    if candidates.ndim != 2 or candidates.shape[1] == 0:
        raise InputError("quari rerank: empty candidate lists")
    if candidates.max() >= len(gallery) or candidates.min() < 0:
        raise InputError(f"quari rerank: candidate index out of range for a gallery of {len(gallery)}")
    g = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32))
    scores = np.empty(candidates.shape, np.float32)
    for s in range(0, len(queries), batch):
        qp, u, v = model(torch.from_numpy(np.ascontiguousarray(queries[s:s + batch], dtype=np.float32)))
        cand = torch.from_numpy(candidates[s:s + batch])
        scores[s:s + batch] = lowrank_scores(qp, u, v, g[cand], model.cfg.anchor).numpy()   # K rows: all of U, V
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, 1), np.take_along_axis(candidates, order, 1)


@torch.inference_mode()
def quari_search(model: QuARI, index: Any, gallery: np.ndarray, queries: np.ndarray, k: int = 10,
                 overfetch: int = 10, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Full search: MIPS on ``index`` (built over ``gallery``) with w = Vᵀ U q', fetch
    k·overfetch candidates, re-score them exactly."""
    if k < 1 or k > len(gallery):
        raise InputError(f"quari search: k={k} must be in 1..{len(gallery)}")
    fetch = min(len(gallery), k * overfetch)
    out_s, out_l = [], []
    for s in range(0, len(queries), batch):
        q = torch.from_numpy(np.ascontiguousarray(queries[s:s + batch], dtype=np.float32))
        qp, u, v = model(q)
        w = search_vectors(qp, u, v, model.cfg.anchor).numpy()
        _, cand = index.search(np.ascontiguousarray(w, dtype=np.float32), fetch)
        cand = np.where(cand < 0, cand.max(), cand)
        g = torch.from_numpy(gallery[cand.reshape(-1)].reshape(len(q), fetch, -1))
        sc = lowrank_scores(qp, u, v, g, model.cfg.anchor).numpy()
        order = np.argsort(-sc, axis=1, kind="stable")[:, :k]
        out_s.append(np.take_along_axis(sc, order, 1))
        out_l.append(np.take_along_axis(cand, order, 1))
    return np.concatenate(out_s), np.concatenate(out_l)


def save_ta(path: str | Path, projection: np.ndarray, backbone: str = "") -> None:
    from safetensors.numpy import save_file

    from qshift.io import atomic_path

    with atomic_path(Path(path), suffix=".safetensors") as tmp:
        save_file({"ta_projection": np.ascontiguousarray(projection, dtype=np.float32)}, str(tmp),
                  metadata={"backbone": backbone})


def load_ta(path: str | Path, expect_backbone: str | None = None) -> np.ndarray:
    """A TA projection; refused when it was trained on another encoder's embeddings."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise InputError(f"ta: {path} not found")
    try:
        with safe_open(str(path), "np") as fh:
            backbone = (fh.metadata() or {}).get("backbone")
            if "ta_projection" not in fh.keys():
                raise InputError(f"ta: {path} holds no 'ta_projection' tensor")
            p = fh.get_tensor("ta_projection")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise InputError(f"ta: {path} is not a readable safetensors file ({exc})") from None
    if expect_backbone is not None and backbone and backbone != expect_backbone:
        raise CheckpointMismatchError(f"ta: {path} was trained on embeddings of {backbone}, not {expect_backbone}")
    return p

