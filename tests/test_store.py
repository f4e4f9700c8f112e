from __future__ import annotations

import numpy as np
import pytest

from qshift.data.collection import Collection, load_collection, load_lines
from qshift.errors import InputError, StoreMismatchError
from qshift.store import EmbeddingStore, check_embeddings


class CountingEncoder:
    """Wraps an encoder, counting texts/images it encodes; can fail after N calls."""

    def __init__(self, inner, fail_after: int | None = None):
        self.inner, self.fail_after, self.calls, self.encoded = inner, fail_after, 0, 0
        self.spec, self.dim, self.modalities = inner.spec, inner.dim, inner.modalities

    def fingerprint(self):
        return self.inner.fingerprint()

    def _tick(self, n):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.encoded += n

    def encode_text(self, texts, **kw):
        self._tick(len(texts))
        return self.inner.encode_text(texts, **kw)

    def encode_images(self, images, **kw):
        self._tick(len(images))
        return self.inner.encode_images(images, **kw)


def _coll(n=50, k=2, edit=None):
    caps = [[f"caption {i} variant {j}" for j in range(k)] for i in range(n)]
    if edit is not None:
        caps[edit][0] = "an edited caption"
    return Collection("toy", [f"i{i}" for i in range(n)], caps)


def test_second_encode_is_served_from_cache(tiny_clip, tmp_path):
    store = EmbeddingStore(tmp_path)
    enc = CountingEncoder(tiny_clip)
    a = store.encode(enc, _coll(), "text", shard_size=16, progress=False)
    assert enc.encoded == 100 and a.vectors.shape == (100, tiny_clip.dim)
    b = store.encode(enc, _coll(), "text", shard_size=16, progress=False)
    assert enc.encoded == 100  # nothing re-encoded
    np.testing.assert_array_equal(a.vectors, b.vectors)
    np.testing.assert_allclose(a.vectors, tiny_clip.encode_text(_coll().texts()), atol=1e-6)
    assert not list(tmp_path.rglob("*.tmp*"))  # atomic writes leave no temp files


def test_interrupted_encode_resumes_from_finished_shards(tiny_clip, tmp_path):
    store = EmbeddingStore(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        store.encode(CountingEncoder(tiny_clip, fail_after=3), _coll(), "text", shard_size=16, progress=False)
    entry = store.entry_dir(tiny_clip, _coll(), "text")
    with pytest.raises(InputError, match="did not finish"):
        EmbeddingStore.load(entry)
    enc = CountingEncoder(tiny_clip)
    emb = store.encode(enc, _coll(), "text", shard_size=16, progress=False)
    assert enc.encoded == 100 - 3 * 16  # only the shards that were not written
    np.testing.assert_allclose(emb.vectors, tiny_clip.encode_text(_coll().texts()), atol=1e-6)


def _file_coll(tmp_path, edit=None):
    path = tmp_path / "toy.txt"
    path.write_text("\n".join(t for caps in _coll(edit=edit).captions for t in caps) + "\n")
    return load_lines(path, captions_per_item=2)


def test_changed_caption_invalidates_only_its_shard(tiny_clip, tmp_path):
    """A collection file whose caption changed re-encodes that shard only."""
    store = EmbeddingStore(tmp_path / "store")
    store.encode(tiny_clip, _file_coll(tmp_path), "text", shard_size=16, progress=False)
    enc = CountingEncoder(tiny_clip)
    emb = store.encode(enc, _file_coll(tmp_path, edit=20), "text", shard_size=16, progress=False)
    assert enc.encoded == 16
    np.testing.assert_allclose(emb.vectors[40], tiny_clip.encode_text(["an edited caption"])[0], atol=1e-6)
    entry = store.entry_dir(tiny_clip, _file_coll(tmp_path), "text")
    assert len(list(entry.glob("shard-*.npy"))) == 7  # the stale shard was removed


def test_in_memory_collections_with_one_name_keep_separate_entries(tiny_clip, tmp_path):
    """Two query sets built in memory under one name (e.g. two benchmark runs) never
    overwrite each other's shards, and each stays cached."""
    store = EmbeddingStore(tmp_path)
    a, b = _coll(), _coll(edit=20)
    assert a.name == b.name
    ea = store.encode(tiny_clip, a, "text", shard_size=16, progress=False)
    eb = store.encode(tiny_clip, b, "text", shard_size=16, progress=False)
    assert ea.path != eb.path
    enc = CountingEncoder(tiny_clip)
    again = store.encode(enc, a, "text", shard_size=16, progress=False)
    assert enc.encoded == 0 and np.array_equal(again.vectors, ea.vectors)


def test_store_refuses_another_encoders_embeddings(tiny_clip, tmp_path):
    from qshift.encoders import create_encoder

    store = EmbeddingStore(tmp_path)
    emb = store.encode(tiny_clip, _coll(10), "text", progress=False)
    other = create_encoder("openclip:qshift-tiny-vit", seed=7)
    assert store.entry_dir(other, _coll(10), "text") != emb.path
    with pytest.raises(StoreMismatchError, match="written by"):
        EmbeddingStore.load(emb.path, expect_fingerprint=other.fingerprint())


def test_corrupt_images_raise_or_are_skipped(tiny_clip, image_collection, tmp_path):
    coll = load_collection(image_collection)
    coll.image_paths[3].write_bytes(b"garbage")
    coll.image_paths[5].unlink()
    store = EmbeddingStore(tmp_path / "store")
    with pytest.raises(InputError, match=coll.image_paths[3].name):
        store.encode(tiny_clip, coll, "image", progress=False)
    with pytest.warns(UserWarning, match="skipped 2 unreadable images"):
        emb = store.encode(tiny_clip, coll, "image", on_error="skip", progress=False)
    assert emb.valid.tolist() == [i not in (3, 5) for i in range(12)]
    assert not emb.vectors[3].any()
    np.testing.assert_allclose(emb.vectors[0], tiny_clip.encode_images([coll.image_paths[0]])[0], atol=1e-6)


def test_image_edit_is_detected(tiny_clip, image_collection, tmp_path):
    import os

    coll = load_collection(image_collection)
    store = EmbeddingStore(tmp_path / "store")
    store.encode(tiny_clip, coll, "image", shard_size=4, progress=False)
    p = coll.image_paths[0]
    st = p.stat()
    p.write_bytes(coll.image_paths[11].read_bytes())
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    enc = CountingEncoder(tiny_clip)
    emb = store.encode(enc, coll, "image", shard_size=4, progress=False)
    assert enc.encoded == 4
    np.testing.assert_allclose(emb.vectors[0], emb.vectors[11], atol=1e-6)


def test_bad_arguments(tiny_clip, minilm, tmp_path):
    store = EmbeddingStore(tmp_path)
    with pytest.raises(InputError, match="modality must be"):
        store.encode(tiny_clip, _coll(), "audio")
    with pytest.raises(InputError, match="has no images"):
        store.encode(tiny_clip, _coll(), "image")
    with pytest.raises(InputError, match="cannot encode image"):
        store.encode(minilm, _coll(), "image")
    with pytest.raises(InputError, match="no manifest.json"):
        EmbeddingStore.load(tmp_path / "nothing")


def test_precomputed_embeddings_are_checked(tmp_path, rng):
    store = EmbeddingStore(tmp_path)
    vecs = rng.standard_normal((5, 8))
    emb = store.import_array("pre", list("abcde"), vecs)
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1, atol=1e-6)
    vecs[2, 3] = np.nan
    with pytest.raises(InputError, match=r"rows contain NaN or inf \(rows \[2\]"):
        store.import_array("pre", list("abcde"), vecs)
    with pytest.raises(InputError, match="duplicate ids"):
        store.import_array("pre", list("aacde"), rng.standard_normal((5, 8)))
    with pytest.raises(InputError, match="dimension 8 does not match the expected 4"):
        check_embeddings(rng.standard_normal((5, 8)), dim=4)
    with pytest.raises(InputError, match="2-D array"):
        check_embeddings(np.zeros((2, 2, 2)))


def test_same_named_collections_from_different_files_keep_separate_entries(tiny_clip, tmp_path):
    """A folder's train.csv and test.csv both load as collection 'data': each keeps its cache."""
    from qshift.data.collection import load_collection

    (tmp_path / "data").mkdir()
    for split, n in (("train", 6), ("test", 4)):
        (tmp_path / "data" / f"{split}.csv").write_text(
            "image,caption\n" + "".join(f"{split}{i}.png,a {split} caption number {i}\n" for i in range(n)))
    train, test = (load_collection(tmp_path / "data" / f"{s}.csv") for s in ("train", "test"))
    assert train.name == test.name
    store = EmbeddingStore(tmp_path / "store")
    a = store.encode(tiny_clip, train, "text", progress=False)
    b = store.encode(tiny_clip, test, "text", progress=False)
    assert a.path != b.path
    again = store.encode(tiny_clip, train, "text", progress=False)  # still there, nothing re-encoded
    assert np.array_equal(again.vectors, a.vectors) and len(again.vectors) == 6
