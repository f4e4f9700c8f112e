"""Scale-out on a local Ray instance: distributed encoding into the same store (also when
a worker is killed mid-run), sharded search equal to the single index, and clear errors."""

from __future__ import annotations

import json
import os
import signal
import time
import warnings

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from qshift.errors import InputError, StoreMismatchError  # noqa: E402
from qshift.index import ExactIndex  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    from qshift.scale.cluster import connect

    warnings.filterwarnings("ignore", message=".*has no checkpoint.*")
    r = connect(num_cpus=2)
    yield r
    r.shutdown()


def _collection(tmp_path, n=24):
    from conftest import make_image_collection
    from qshift.data.collection import load_collection

    return load_collection(make_image_collection(tmp_path / "c", n_per=n // 6))


def test_ray_encode_writes_the_local_store_and_survives_a_killed_worker(local_ray, tmp_path, tiny_clip):
    from qshift.scale.encode import ray_runner
    from qshift.store import EmbeddingStore

    coll = _collection(tmp_path, 48)
    store = EmbeddingStore(tmp_path / "store")
    killed: list[int] = []

    def kill_once(record):
        if not killed:  # the actor that wrote the first shard dies; Ray restarts it and redoes its work
            killed.append(record["pid"])
            os.kill(record["pid"], signal.SIGKILL)

    emb = store.encode(tiny_clip, coll, "image", shard_size=4, progress=False,
                       runner=ray_runner(tiny_clip, "image", workers=2, on_shard=kill_once))
    assert killed
    local = EmbeddingStore(tmp_path / "local").encode(tiny_clip, coll, "image", shard_size=4, progress=False)
    assert np.allclose(emb.vectors, local.vectors, atol=1e-6) and emb.ids == local.ids
    manifest = json.loads((emb.path / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 12
    assert sorted(s["start"] for s in manifest["shards"]) == list(range(0, 48, 4))  # each shard once, in order
    assert len(list(emb.path.glob("shard-*.npy"))) == 12 and not list(emb.path.glob(".*tmp*"))
    for s in manifest["shards"]:  # no half-written file
        assert np.load(emb.path / s["file"]).shape == (4, tiny_clip.dim)
    # a later local run is a cache hit: it returns before the model is needed
    t0 = time.perf_counter()

    class NoModel:
        spec, dim, modalities = tiny_clip.spec, tiny_clip.dim, tiny_clip.modalities

        def fingerprint(self):
            return tiny_clip.fingerprint()

    again = store.encode(NoModel(), coll, "image", shard_size=4, progress=False)
    assert np.array_equal(again.vectors, emb.vectors) and time.perf_counter() - t0 < 5


def test_sharded_exact_search_equals_the_single_index(local_ray):
    from qshift.scale.search import ShardedIndex

    rng = np.random.default_rng(0)
    # small integers / 8: every inner product is exact in float32, so equal rows tie exactly
    g = (rng.integers(-4, 5, (1003, 32)) / 8).astype(np.float32)
    g[700] = g[3]  # ties across shards: ordered by label, as the single index orders them
    g[501] = g[3]
    q = (rng.integers(-4, 5, (20, 32)) / 8).astype(np.float32)
    q[0] = g[3]
    single = ExactIndex(32)
    single.add(g)
    want_s, want_l = single.search(q, 10)
    for shards in (1, 2, 4):
        ix = ShardedIndex(32, shards)
        ix.add(g)
        s, lab = ix.search(q, 10)
        assert np.array_equal(lab, want_l) and np.allclose(s, want_s, atol=1e-6), shards
        assert lab[0, :3].tolist() == [3, 501, 700]
        ix.close()


def test_a_dead_shard_is_restarted_and_the_query_retried(local_ray):
    from qshift.scale.search import ShardedIndex

    rng = np.random.default_rng(1)
    g = rng.standard_normal((400, 16)).astype(np.float32)
    ix = ShardedIndex(16, 2)
    ix.add(g)
    q = rng.standard_normal((5, 16)).astype(np.float32)
    before = ix.search(q, 7)
    os.kill(ray.get(ix.actors[1].pid.remote()), signal.SIGKILL)
    after = ix.search(q, 7)  # the actor comes back with its rows and answers
    assert np.array_equal(after[1], before[1])
    ix.close()
    with pytest.raises(InputError, match="closed"):
        ix.search(q, 7)


def test_the_rank_stage_takes_a_sharded_index(local_ray, tiny_clip):
    from qshift.pipeline import Pipeline, PipelineContext
    from qshift.scale.search import ShardedIndex

    texts = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("square", "circle", "star")]
    g = tiny_clip.encode_text(texts)
    ix = ShardedIndex(g.shape[1], 3)
    ix.add(g, texts)
    with Pipeline.from_config(None, PipelineContext(tiny_clip, "t2t", index=ix)) as pipe:
        got = [[h["id"] for h in r.hits] for r in pipe.search(texts[:4], k=3)]
    with Pipeline.from_config(None, PipelineContext(tiny_clip, "t2t", gallery=g, gallery_ids=texts)) as pipe:
        want = [[h["id"] for h in r.hits] for r in pipe.search(texts[:4], k=3)]
    assert got == want
    with Pipeline.from_config([{"adapt": "tent"}], PipelineContext(tiny_clip, "t2t", index=ix)) as pipe:
        assert len(pipe.search(texts[:2], k=2)[0].hits) == 2  # gallery vectors gathered from the shards
    ix.close()


def test_bad_input(local_ray, tmp_path):
    from qshift.scale.cluster import _probe, require_ray
    from qshift.scale.search import ShardedIndex

    t0 = time.perf_counter()
    with pytest.raises(InputError, match="cannot reach the Ray cluster at 127.0.0.1:1"):
        _probe("127.0.0.1:1", 2.0)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(InputError, match="expected HOST:PORT"):
        _probe("nowhere", 1.0)
    with pytest.raises(InputError, match="5 shards for a gallery of 3 vectors"):
        ShardedIndex(4, 5).add(np.eye(3, 4, dtype=np.float32))
    a, b = ExactIndex(4), ExactIndex(4)
    a.add(np.eye(4, dtype=np.float32))
    b.add(np.eye(4, dtype=np.float32))
    a.meta, b.meta = {"fingerprint": "enc-a"}, {"fingerprint": "enc-b"}
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    with pytest.raises(StoreMismatchError, match="shards built by different encoders"):
        ShardedIndex.from_indexes([tmp_path / "a", tmp_path / "b"])
    ok = ShardedIndex.from_indexes([tmp_path / "a", tmp_path / "a"])
    assert len(ok) == 8 and ok.search(np.eye(4, dtype=np.float32), 2)[1][0].tolist() == [0, 4]
    ok.close()
    old = ray.__version__
    try:
        ray.__version__ = "2.3.0"
        with pytest.raises(InputError, match="Ray 2.3.0 is too old"):
            require_ray()
    finally:
        ray.__version__ = old
