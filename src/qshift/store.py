"""Embedding cache: sharded ``.npy`` files + ``manifest.json``, atomic and resumable.

One *entry* holds the embeddings of one modality of one collection under one encoder::

    ROOT/<collection>.<modality>.<key>/
        manifest.json        encoder spec + fingerprint, dim, shard list, skipped ids
        ids.json             unit ids in order (captions: ``item#j``; images: item id)
        shard-<hash>.npy     float32 rows of one shard

``key`` hashes the encoder fingerprint (spec + weights hash), the modality and where the
collection comes from (its resolved file, or for a collection built in memory its
content), so an entry is never reused by another encoder. Each shard file is named by
the hash of its inputs (ids + caption text, or image path + size + mtime), so after an
edit of a collection file only the shards whose inputs changed are encoded again, and an
interrupted encode resumes from the shards already written. Every file is written atomically (temp + rename) and the
manifest is rewritten after each shard.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qshift.data.collection import Collection
from qshift.data.images import load_image
from qshift.encoders.base import IMAGE, TEXT, Encoder
from qshift.errors import InputError, StoreMismatchError
from qshift.io import read_json, save_npy, stable_hash, write_json
from qshift.progress import progress_bar

FORMAT = 1


def check_embeddings(vectors: np.ndarray, dim: int | None = None, what: str = "embeddings") -> np.ndarray:
    """Return ``vectors`` as C-contiguous float32 (n, d); reject NaN/inf and wrong dims."""
    arr = np.asarray(vectors)
    if arr.ndim == 1 and dim is not None and arr.shape[0] == dim:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise InputError(f"{what}: expected a 2-D array (n, dim), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"{what}: expected numbers, got dtype {arr.dtype}")
    if dim is not None and arr.shape[1] != dim:
        raise InputError(f"{what}: dimension {arr.shape[1]} does not match the expected {dim}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise InputError(f"{what}: {len(bad)} rows contain NaN or inf (rows {bad[:10].tolist()}"
                         f"{', ...' if len(bad) > 10 else ''})")
    return arr


@dataclass
class Embeddings:
    """Vectors of one modality of a collection, with their unit ids."""

    ids: list[str]
    vectors: np.ndarray
    fingerprint: str
    modality: str
    valid: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.valid.size == 0:
            self.valid = np.ones(len(self.ids), dtype=bool)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:60] or "collection"


def _image_stamp(path: Path) -> str:
    try:
        st = path.stat()
        return f"{path}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        return f"{path}|missing"


class EmbeddingStore:
    """A directory of embedding entries; see the module docstring for the layout."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entry_dir(self, encoder: Encoder, collection: Collection, modality: str) -> Path:
        """One entry per (collection, encoder, modality); collections that share a name
        differ by their source file (e.g. the train.csv and test.csv of one folder) or, for
        collections built in memory, by their content (two runs that build different query
        sets under one name must not overwrite each other's shards)."""
        source = str(Path(collection.source).resolve()) if collection.source else f"memory:{collection.key()}"
        key = stable_hash([FORMAT, encoder.fingerprint(), modality, source])[:12]
        return self.root / f"{_slug(collection.name)}.{modality}.{key}"

    # -- encode ------------------------------------------------------------------------
    def encode(self, encoder: Encoder, collection: Collection, modality: str = TEXT, *,
               shard_size: int = 2048, on_error: str = "raise", progress: bool = True,
               batch_size: int | None = None, runner: Any = None) -> Embeddings:
        """Embeddings of ``collection``'s captions or images, encoding only missing shards.

        ``on_error='skip'`` leaves unreadable images out (zero rows, ``valid=False``)
        with one warning that counts them; ``'raise'`` stops at the first, naming it.
        ``runner(tasks, entry)`` encodes the missing shards elsewhere (``tasks``: (content,
        units) pairs) and yields ``(content, record)`` as each is written with
        :meth:`write_shard` — :mod:`qshift.scale` runs them on Ray.
        """
        if modality not in (TEXT, IMAGE):
            raise InputError(f"modality must be 'text' or 'image', got {modality!r}")
        if on_error not in ("raise", "skip"):
            raise InputError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if shard_size < 1:
            raise InputError(f"shard_size must be >= 1, got {shard_size}")
        if modality not in encoder.modalities:
            raise InputError(f"encoder {encoder.spec!r} cannot encode {modality} "
                             f"(it encodes: {', '.join(sorted(encoder.modalities))})")
        if modality == IMAGE and not collection.has_images:
            raise InputError(f"collection {collection.name!r} has no images (captions only)")
        if modality == TEXT:
            ids, units = collection.text_ids(), collection.texts()
            stamps: Sequence[str] = units
        else:
            ids, units = list(collection.ids), list(collection.image_paths or [])
            stamps = [_image_stamp(Path(p)) for p in units]

        entry = self.entry_dir(encoder, collection, modality)
        old = self._read_manifest(entry) if (entry / "manifest.json").is_file() else None
        if old is not None and old["fingerprint"] != encoder.fingerprint():
            raise StoreMismatchError(f"{entry}: written by {old['fingerprint']}, not {encoder.fingerprint()}")
        done = {s["content"]: s for s in (old or {}).get("shards", []) if (entry / s["file"]).is_file()}
        contents = [self._content(encoder, ids, stamps, s, shard_size) for s in range(0, len(ids), shard_size)]
        if old is not None and old.get("complete") and [s["content"] for s in old["shards"]] == contents \
                and len(done) == len(contents):
            return self.load(entry)  # full cache hit: the model is never needed
        manifest = {"format": FORMAT, "encoder": encoder.spec, "fingerprint": encoder.fingerprint(),
                    "dim": encoder.dim, "modality": modality, "collection": collection.name,
                    "source": collection.source, "n": len(ids), "shard_size": shard_size,
                    "shards": [], "complete": False}
        write_json(entry / "ids.json", ids)
        plan = [(s, min(s + shard_size, len(ids)), c) for s, c in zip(range(0, len(ids), shard_size), contents)]
        records = {c: done[c] for _, _, c in plan if c in done}

        def flush(complete: bool = False) -> None:
            """The manifest lists every finished shard (in order), so a resume skips them."""
            manifest["shards"] = [{**records[c], "start": s, "n": e - s} for s, e, c in plan if c in records]
            manifest["complete"] = complete
            write_json(entry / "manifest.json", manifest)

        todo = [(s, e, c) for s, e, c in plan if c not in records]
        with progress_bar(f"encode {modality} ({collection.name})", len(ids), progress and bool(todo)) as bar:
            bar.advance(len(ids) - sum(e - s for s, e, _ in todo))
            if runner is None:
                for s, e, c in todo:
                    vecs, skipped = self._encode_shard(encoder, units[s:e], modality, on_error, batch_size)
                    records[c] = self.write_shard(entry, c, vecs, skipped)
                    flush()
                    bar.advance(e - s)
            else:  # e.g. qshift.scale: shards encoded elsewhere, written by the same write_shard
                sizes = {c: e - s for s, e, c in todo}
                for c, record in runner([(c, units[s:e]) for s, e, c in todo], entry):
                    records[c] = record
                    flush()
                    bar.advance(sizes[c])
        missing = [c for _, _, c in plan if c not in records]
        if missing:
            raise RuntimeError(f"{entry}: {len(missing)} shards were not encoded")
        flush(complete=True)
        keep = {s["file"] for s in manifest["shards"]}
        for f in entry.glob("shard-*.npy"):
            if f.name not in keep:
                f.unlink()
        for f in entry.glob(".shard-*.tmp*"):  # left by a writer killed mid-write (its shard was redone)
            f.unlink(missing_ok=True)
        n_skipped = sum(len(s.get("skipped", [])) for s in manifest["shards"])
        if n_skipped:
            warnings.warn(f"{collection.name}: skipped {n_skipped} unreadable images "
                          f"(listed in {entry / 'manifest.json'})", stacklevel=2)
        return self.load(entry)

    @staticmethod
    def write_shard(entry: Path, content: str, vecs: np.ndarray, skipped: list[int]) -> dict:
        """Write one shard atomically (its name is its content hash: a rewrite is the same
        file) and return its manifest record."""
        fname = f"shard-{content[:20]}.npy"
        save_npy(Path(entry) / fname, vecs)
        return {"file": fname, "content": content, "skipped": list(skipped)}

    @staticmethod
    def _content(encoder: Encoder, ids: list[str], stamps: Sequence[str], start: int, size: int) -> str:
        return stable_hash([encoder.fingerprint(), ids[start:start + size], list(stamps[start:start + size])])

    @staticmethod
    def _encode_shard(encoder: Encoder, units: list, modality: str, on_error: str,
                      batch_size: int | None) -> tuple[np.ndarray, list[int]]:
        if modality == TEXT:
            return encoder.encode_text(units, batch_size=batch_size), []
        images, ok, skipped = [], [], []
        for i, p in enumerate(units):
            try:
                images.append(load_image(p))
                ok.append(i)
            except InputError:
                if on_error == "raise":
                    raise
                skipped.append(i)
        vecs = np.zeros((len(units), encoder.dim), dtype=np.float32)
        if images:
            vecs[ok] = encoder.encode_images(images, batch_size=batch_size)
        return vecs, skipped

    # -- load --------------------------------------------------------------------------
    @staticmethod
    def _read_manifest(entry: Path) -> dict:
        manifest = read_json(entry / "manifest.json")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise InputError(f"{entry / 'manifest.json'}: not a qshift store manifest (format {FORMAT})")
        return manifest

    @classmethod
    def load(cls, entry: str | Path, expect_fingerprint: str | None = None) -> Embeddings:
        """Read a complete entry; ``expect_fingerprint`` guards against another encoder."""
        entry = Path(entry)
        if not (entry / "manifest.json").is_file():
            raise InputError(f"{entry}: not an embedding store entry (no manifest.json)")
        m = cls._read_manifest(entry)
        if expect_fingerprint is not None and m["fingerprint"] != expect_fingerprint:
            raise StoreMismatchError(f"{entry}: embeddings were written by {m['fingerprint']}, "
                                     f"but the encoder in use is {expect_fingerprint}")
        if not m.get("complete"):
            raise InputError(f"{entry}: encode did not finish; run `qshift encode` again to resume")
        ids = read_json(entry / "ids.json")
        vecs = np.empty((m["n"], m["dim"]), dtype=np.float32)
        valid = np.ones(m["n"], dtype=bool)
        for s in m["shards"]:
            f = entry / s["file"]
            try:
                arr = np.load(f, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise InputError(f"{f}: unreadable shard ({exc}); delete it and encode again") from exc
            if arr.shape != (s["n"], m["dim"]):
                raise InputError(f"{f}: shape {arr.shape}, manifest says ({s['n']}, {m['dim']})")
            vecs[s["start"]:s["start"] + s["n"]] = arr
            valid[[s["start"] + i for i in s.get("skipped", [])]] = False
        if len(ids) != m["n"]:
            raise InputError(f"{entry / 'ids.json'}: {len(ids)} ids, manifest says {m['n']}")
        check_embeddings(vecs[valid], m["dim"], what=str(entry))
        return Embeddings(ids, vecs, m["fingerprint"], m["modality"], valid, entry)

    def import_array(self, name: str, ids: Sequence[str], vectors: np.ndarray, modality: str = IMAGE,
                     fingerprint: str = "precomputed") -> Embeddings:
        """Store precomputed embeddings (checked for NaN/inf and shape) as an entry."""
        vecs = check_embeddings(vectors, what=f"precomputed {name}")
        ids = [str(i) for i in ids]
        if len(ids) != len(vecs):
            raise InputError(f"precomputed {name}: {len(ids)} ids for {len(vecs)} vectors")
        if len(set(ids)) != len(ids):
            raise InputError(f"precomputed {name}: duplicate ids")
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        vecs = vecs / np.maximum(norms, 1e-12)
        entry = self.root / f"{_slug(name)}.{modality}.{stable_hash([fingerprint, modality])[:12]}"
        write_json(entry / "ids.json", ids)
        save_npy(entry / "shard-all.npy", vecs)
        write_json(entry / "manifest.json", {
            "format": FORMAT, "encoder": fingerprint, "fingerprint": fingerprint, "dim": vecs.shape[1],
            "modality": modality, "collection": name, "source": "import", "n": len(ids), "shard_size": len(ids),
            "shards": [{"file": "shard-all.npy", "content": "import", "start": 0, "n": len(ids), "skipped": []}],
            "complete": True})
        return self.load(entry)
