"""Vector indexes behind one small protocol: ``add``, ``search``, ``save``, ``load``.

``build_index(factory, dim)`` takes a factory string:

- ``"Exact"`` (default): qshift's exact inner-product search — blocked GEMM over gallery
  chunks with a running top-k merge (:class:`ExactIndex`). ``"Exact,fp16"`` and
  ``"Exact,bf16"`` store the gallery in half precision.
- anything else goes to ``faiss.index_factory`` with inner-product metric: ``"Flat"``,
  ``"IVF1024,Flat"``, ``"HNSW32"``, ``"IVF256,PQ32"``, ``"OPQ16,IVF256,PQ16"``, …

``search(q, k)`` returns ``(scores, labels)``: float32 and int64 arrays of shape
(nq, k), best first, labels being positions in insertion order; ``index.ids`` maps
them to external ids. Every index saves to a directory (``index.json`` + data).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from qshift.errors import InputError, StoreMismatchError
from qshift.io import atomic_path, read_json, save_npy, write_json
from qshift.metrics import sort_hits

DEFAULT_FACTORY = "Exact"


@runtime_checkable
class Index(Protocol):
    dim: int
    factory: str
    ids: list[str]
    meta: dict

    def __len__(self) -> int: ...
    def add(self, vectors: np.ndarray, ids: Sequence[str] | None = None) -> None: ...
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...
    def save(self, path: str | Path) -> None: ...


def as_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """Queries as C-contiguous float32 (nq, dim); float64/strided input is converted."""
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2:
        raise InputError(f"queries: expected shape (nq, {dim}), got {q.shape}")
    if q.shape[1] != dim:
        raise InputError(f"queries: dimension {q.shape[1]} does not match the index dimension {dim}")
    if not (np.issubdtype(q.dtype, np.floating) or np.issubdtype(q.dtype, np.integer)):
        raise InputError(f"queries: expected floating-point numbers, got dtype {q.dtype}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(q).all():
        bad = np.flatnonzero(~np.isfinite(q).all(axis=1))
        raise InputError(f"queries: rows {bad[:10].tolist()} contain NaN or inf")
    return q


def top_k_block(scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best (score, column) of a block, with equal scores at the cut taken
    by lowest column — so that merging blocks or shards reproduces one total order
    (score descending, label ascending). torch.topk alone picks among ties at random."""
    kk = min(k, scores.shape[1])
    vals, idx = torch.topk(scores, kk, dim=1)
    cut = vals[:, -1:]
    tied = torch.nonzero((scores >= cut).sum(1) > kk).flatten().tolist()
    vals, idx = vals.numpy().copy(), idx.numpy().copy()
    for r in tied:  # more items score >= the cut than fit: keep the lowest columns of the tied ones
        row = scores[r]
        above = torch.nonzero(row > cut[r]).flatten()
        at = torch.nonzero(row == cut[r]).flatten()[: kk - len(above)]
        pick = torch.cat([above, at])
        vals[r], idx[r] = row[pick].numpy(), pick.numpy()
    return vals, idx


def _check_k(k: int, n: int) -> int:
    if not isinstance(k, (int, np.integer)) or k <= 0:
        raise InputError(f"k must be a positive integer, got {k!r}")
    if n == 0:
        raise InputError("the index is empty: add vectors before searching")
    if k > n:
        raise InputError(f"k={k} exceeds the {n} vectors in the index; ask for k <= {n}")
    return int(k)


class _IdsMixin:
    ids: list[str]
    meta: dict

    def _add_ids(self, n_before: int, n_new: int, ids: Sequence[str] | None) -> None:
        new = [str(i) for i in ids] if ids is not None else [str(n_before + i) for i in range(n_new)]
        if len(new) != n_new:
            raise InputError(f"add: {len(new)} ids for {n_new} vectors")
        self.ids.extend(new)

    def check_fingerprint(self, fingerprint: str) -> None:
        """Raise if the index was built from another encoder's embeddings."""
        have = self.meta.get("fingerprint")
        if have and have != fingerprint:
            raise StoreMismatchError(f"index was built from {have} embeddings, but the encoder in use is "
                                     f"{fingerprint}: re-encode the collection and rebuild the index")


class ExactIndex(_IdsMixin):
    """Exact inner-product search at GEMM speed.

    The gallery is scanned in blocks: one BLAS GEMM (OpenBLAS via numpy) scores a block
    of queries against a block of gallery rows, ``torch.topk`` keeps each row's best k,
    and a running merge combines blocks. The score buffer never exceeds
    ``memory_budget_mb``. From ``FAISS_KNN_MIN_QUERIES`` float32 queries on, the call
    goes to FAISS's brute-force kernel on the same array, which was faster there.
    Results equal a flat scan; within the returned list, equal scores are ordered by
    label. A gallery stored in ``float16`` is widened to float32
    block by block (and single queries use torch's half-precision GEMV); ``bfloat16``
    uses native bf16 matrix products with float32 accumulation (queries are rounded
    to bf16 too, so scores agree with float32 to about 3 significant digits).
    """

    # From this many float32 queries on, FAISS's brute-force kernel (faiss.knn, run on
    # our gallery array without a copy) measured faster here than our GEMM + top-k:
    # it reaches 76-94 % of the SGEMM peak at batch 256 (bench/results/exact_search.md).
    FAISS_KNN_MIN_QUERIES = 128
    # Up to this many queries, an fp16 gallery is scanned once per query with torch's
    # half-precision GEMV rather than widened to float32 for one GEMM (measured here).
    HALF_GEMV_MAX_QUERIES = 16
    DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
              "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

    def __init__(self, dim: int, dtype: str = "float32", memory_budget_mb: float = 256.0,
                 query_block: int = 1024) -> None:
        if dim < 1:
            raise InputError(f"dim must be >= 1, got {dim}")
        if dtype not in self.DTYPES:
            raise InputError(f"unknown gallery dtype {dtype!r}; use one of float32, float16, bfloat16")
        self.dim, self.dtype = int(dim), self.DTYPES[dtype]
        self.memory_budget = int(memory_budget_mb * 2**20)
        self.query_block = int(query_block)
        self._chunks: list[torch.Tensor] = []
        self._gallery: torch.Tensor | None = None
        self.ids: list[str] = []
        self.meta: dict = {}
        short = {torch.float32: "", torch.float16: ",fp16", torch.bfloat16: ",bf16"}[self.dtype]
        self.factory = f"Exact{short}"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def gallery(self) -> torch.Tensor:
        if self._gallery is None or self._chunks:
            parts = ([self._gallery] if self._gallery is not None else []) + self._chunks
            self._gallery = torch.cat(parts) if parts else torch.empty((0, self.dim), dtype=self.dtype)
            self._chunks = []
        return self._gallery

    def add(self, vectors: np.ndarray, ids: Sequence[str] | None = None) -> None:
        from qshift.store import check_embeddings

        vecs = check_embeddings(vectors, self.dim, what="vectors added to the index")
        self._add_ids(len(self), len(vecs), ids)
        self._chunks.append(torch.from_numpy(vecs.copy()).to(self.dtype))

    def _block_rows(self, nq: int) -> int:
        # per gallery row: nq float32 scores (+ a widened float32 row for fp16 storage)
        per_row = 4 * nq + (4 * self.dim if self.dtype == torch.float16 else 0)
        rows = self.memory_budget // per_row
        if rows < 1:
            raise InputError(f"memory budget {self.memory_budget} B is too small for one block "
                             f"({per_row} B per gallery row for {nq} queries)")
        # Measured here: fewer, larger blocks win (per-call GEMM and top-k overheads
        # dominate cache effects), so a block takes the whole budget.
        return int(rows)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = as_queries(queries, self.dim)
        g = self.gallery
        k = _check_k(k, len(g))
        scores = np.empty((len(q), k), dtype=np.float32)
        labels = np.empty((len(q), k), dtype=np.int64)
        for s in range(0, len(q), self.query_block):
            scores[s:s + self.query_block], labels[s:s + self.query_block] = self._search_block(
                q[s:s + self.query_block], g, k)
        return scores, labels

    def _scores(self, q: np.ndarray, block: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.float32:
            return torch.from_numpy(q @ block.numpy().T)
        if self.dtype == torch.float16 and len(q) <= self.HALF_GEMV_MAX_QUERIES:
            # half-precision GEMV reads half the bytes; F16C kernels accumulate in float32
            qh = torch.from_numpy(q).to(torch.float16)
            return torch.stack([torch.mv(block, row) for row in qh]).float()
        if self.dtype == torch.float16:
            return torch.from_numpy(q @ block.float().numpy().T)
        return (torch.from_numpy(q).to(torch.bfloat16) @ block.T).float()

    def _search_block(self, q: np.ndarray, g: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.dtype == torch.float32 and len(q) >= self.FAISS_KNN_MIN_QUERIES:
            import faiss

            kk = min(k + 1, len(g))  # one more, to see whether the cut falls inside a run of equal scores
            s_np, i_np = faiss.knn(q, g.numpy(), kk, metric=faiss.METRIC_INNER_PRODUCT)
            s_np, i_np = sort_hits(s_np, i_np)
            if kk > k:
                tied = np.flatnonzero(s_np[:, k - 1] == s_np[:, k])
                if len(tied):  # rare: those rows again through the exact-tie path below
                    s_np[tied, :k], i_np[tied, :k] = self._blocked(q[tied], g, k)
            return s_np[:, :k], i_np[:, :k]
        return self._blocked(q, g, k)

    def _blocked(self, q: np.ndarray, g: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self._block_rows(len(q))
        best_s = best_i = None
        for start in range(0, len(g), rows):
            bs, bi = top_k_block(self._scores(q, g[start:start + rows]), k)
            bi += start
            if best_s is None:
                best_s, best_i = bs, bi
            else:  # the merged winners by score, then label: the same total order as the final list
                ms, mi = sort_hits(np.concatenate([best_s, bs], 1), np.concatenate([best_i, bi], 1))
                best_s, best_i = ms[:, :k], mi[:, :k]
        return sort_hits(best_s, best_i)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        g = self.gallery
        # numpy has no bfloat16: keep its raw 16-bit patterns
        arr = g.view(torch.int16).numpy() if self.dtype == torch.bfloat16 else g.numpy()
        save_npy(path / "gallery.npy", arr)
        _save_meta(path, self, {"dtype": str(self.dtype).removeprefix("torch.")})

    @classmethod
    def _load(cls, path: Path, info: dict) -> "ExactIndex":
        idx = cls(info["dim"], dtype=info["dtype"])
        arr = np.load(path / "gallery.npy", allow_pickle=False)
        t = torch.from_numpy(arr)
        idx._gallery = t.view(torch.bfloat16) if idx.dtype == torch.bfloat16 else t
        return idx


class FaissIndex(_IdsMixin):
    """A FAISS index (inner product) built from a factory string; trains on first add."""

    def __init__(self, dim: int, factory: str = "Flat", **search_params: float) -> None:
        import faiss

        self.dim, self.factory = int(dim), factory
        try:
            self.index = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise InputError(f"bad index factory string {factory!r} for dim {dim}: "
                             f"{str(exc).strip().splitlines()[-1]}") from exc
        self.ids: list[str] = []
        self.meta: dict = {}
        self.search_params: dict = {}
        self.set_search_params(**search_params)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def set_search_params(self, **params: float) -> None:
        """E.g. ``nprobe=16`` for IVF, ``efSearch=128`` for HNSW."""
        import faiss

        ps = faiss.ParameterSpace()
        for name, value in params.items():
            try:
                ps.set_index_parameter(self.index, name, value)
            except RuntimeError as exc:
                raise InputError(f"index {self.factory!r} has no search parameter {name!r}") from exc
            self.search_params[name] = value

    def add(self, vectors: np.ndarray, ids: Sequence[str] | None = None) -> None:
        from qshift.store import check_embeddings

        vecs = check_embeddings(vectors, self.dim, what="vectors added to the index")
        if not self.index.is_trained:
            n_list = getattr(self.index, "nlist", 0) or 0
            if len(vecs) < max(n_list, 1) * 39:
                warnings.warn(f"training {self.factory!r} on only {len(vecs)} vectors "
                              f"(FAISS suggests >= {max(n_list, 1) * 39})", stacklevel=2)
            if len(vecs) < n_list:
                raise InputError(f"{self.factory!r} needs at least {n_list} vectors to train, got {len(vecs)}")
            self.index.train(vecs)
        self._add_ids(len(self), len(vecs), ids)
        self.index.add(vecs)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = as_queries(queries, self.dim)
        k = _check_k(k, len(self))
        scores, labels = self.index.search(q, k)
        return scores.astype(np.float32, copy=False), labels.astype(np.int64, copy=False)

    def save(self, path: str | Path) -> None:
        import faiss

        path = Path(path)
        with atomic_path(path / "index.faiss") as tmp:
            faiss.write_index(self.index, str(tmp))
        _save_meta(path, self, {"search_params": self.search_params})

    @classmethod
    def _load(cls, path: Path, info: dict) -> "FaissIndex":
        import faiss

        idx = cls.__new__(cls)
        idx.dim, idx.factory, idx.meta = info["dim"], info["factory"], {}
        idx.index = faiss.read_index(str(path / "index.faiss"))
        idx.search_params = {}
        idx.set_search_params(**info.get("search_params", {}))
        return idx


def _save_meta(path: Path, index: ExactIndex | FaissIndex, extra: dict) -> None:
    write_json(path / "ids.json", index.ids)
    write_json(path / "index.json", {"kind": type(index).__name__, "factory": index.factory, "dim": index.dim,
                                     "ntotal": len(index), "meta": index.meta, **extra})


def build_index(dim: int, factory: str = DEFAULT_FACTORY, **params: float) -> ExactIndex | FaissIndex:
    """An empty index for ``dim``-dimensional vectors from a factory string.

    ``params`` go to the index: ``memory_budget_mb`` for Exact, search parameters
    (``nprobe``, ``efSearch``) for FAISS.
    """
    head, _, option = factory.partition(",")
    if head.strip().lower() != "exact":
        return FaissIndex(dim, factory, **params)
    dtype = option.strip() or "float32"
    if dtype not in ExactIndex.DTYPES:
        raise InputError(f"bad index factory {factory!r}: use Exact, Exact,fp16 or Exact,bf16")
    return ExactIndex(dim, dtype=dtype, **params)


def load_index(path: str | Path) -> ExactIndex | FaissIndex:
    path = Path(path)
    if not (path / "index.json").is_file():
        raise InputError(f"{path}: not a qshift index directory (no index.json)")
    info = read_json(path / "index.json")
    kinds = {"ExactIndex": ExactIndex, "FaissIndex": FaissIndex}
    if info.get("kind") not in kinds:
        raise InputError(f"{path / 'index.json'}: unknown index kind {info.get('kind')!r}")
    idx = kinds[info["kind"]]._load(path, info)
    idx.ids = read_json(path / "ids.json")
    idx.meta = info.get("meta", {})
    if len(idx.ids) != len(idx):
        raise InputError(f"{path}: {len(idx.ids)} ids for {len(idx)} vectors")
    return idx



def index_vectors(index: ExactIndex | FaissIndex) -> np.ndarray:
    """The float32 vectors an index holds, in label order: an exact index's gallery, the
    store entry it was built from (``meta['entry']``), or FAISS's reconstruction."""
    if isinstance(index, ExactIndex):
        return index.gallery.float().numpy()
    if not isinstance(index, FaissIndex) and hasattr(index, "vectors"):  # e.g. qshift.scale.ShardedIndex
        return index.vectors()
    entry = index.meta.get("entry")
    if entry and Path(entry).is_dir():
        from qshift.store import EmbeddingStore

        emb = EmbeddingStore.load(entry)
        vecs = emb.vectors[emb.valid]
        if len(vecs) == len(index):
            return np.ascontiguousarray(vecs, dtype=np.float32)
    try:
        return index.index.reconstruct_n(0, len(index))
    except RuntimeError as exc:
        raise InputError(f"index {index.factory!r} cannot give back its vectors ({str(exc).strip().splitlines()[-1]}) "
                         "and its store entry is gone; stages that need the gallery vectors (adapt, transform) "
                         "need an Exact index or the store entry it was built from") from None
