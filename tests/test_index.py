from __future__ import annotations

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qshift.errors import InputError, StoreMismatchError
from qshift.index import ExactIndex, build_index, load_index


def _data(rng, n=3000, d=32, nq=17):
    g = rng.standard_normal((n, d)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    return g, rng.standard_normal((nq, d)).astype(np.float32)


def _flat(g, q, k):
    f = faiss.IndexFlatIP(g.shape[1])
    f.add(g)
    return f.search(q, k)


@pytest.mark.parametrize("budget_mb", [0.05, 256])  # many small blocks / one block
def test_exact_matches_faiss_flat(rng, budget_mb):
    g, q = _data(rng)
    idx = build_index(32, "Exact", memory_budget_mb=budget_mb)
    idx.add(g[:1000])
    idx.add(g[1000:])
    s, i = idx.search(q, 25)
    fs, fi = _flat(g, q, 25)
    np.testing.assert_array_equal(i, fi)
    np.testing.assert_allclose(s, fs, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), nq=st.integers(1, 40), k=st.integers(1, 20), seed=st.integers(0, 2**16),
       budget=st.sampled_from([0.002, 0.05, 64.0]))
def test_exact_equals_brute_force_with_ties(n, nq, k, seed, budget):
    rng = np.random.default_rng(seed)
    # few distinct values -> many exact ties; expected order: score desc, label asc
    g = rng.integers(-2, 3, size=(n, 4)).astype(np.float32)
    q = rng.integers(-2, 3, size=(nq, 4)).astype(np.float32)
    k = min(k, n)
    idx = ExactIndex(4, memory_budget_mb=budget)
    idx.add(g)
    s, i = idx.search(q, k)
    full = q @ g.T
    for r in range(nq):
        order = sorted(range(n), key=lambda j: (-full[r, j], j))[:k]
        # the returned set may differ only among items tied with the k-th score
        assert np.allclose(s[r], full[r, order])
        kth = full[r, order[-1]]
        strict = [j for j in order if full[r, j] > kth]
        assert i[r][: len(strict)].tolist() == strict
        assert all(full[r, j] == kth for j in i[r][len(strict):])
        # within equal scores, labels ascend
        for a in range(k - 1):
            if s[r, a] == s[r, a + 1]:
                assert i[r, a] < i[r, a + 1]


@pytest.mark.parametrize("dtype, atol, min_overlap", [("fp16", 2e-3, 0.9), ("bf16", 2e-2, 0.7)])
def test_half_precision_galleries(rng, dtype, atol, min_overlap):
    g, q = _data(rng, d=64)
    idx = build_index(64, f"Exact,{dtype}")
    idx.add(g)
    fs, fi = _flat(g, q, 10)
    for queries in (q, q[:1]):  # batched path and single-query path
        s, i = idx.search(queries, 10)
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i, fi[: len(queries)])])
        assert overlap >= min_overlap
        assert np.abs(s[:, 0] - fs[: len(queries), 0]).max() < atol * 10


def test_exact_bad_input(rng):
    idx = ExactIndex(8)
    with pytest.raises(InputError, match="index is empty"):
        idx.search(np.zeros((1, 8), np.float32), 1)
    idx.add(rng.standard_normal((5, 8)))
    with pytest.raises(InputError, match="k=6 exceeds the 5 vectors"):
        idx.search(np.zeros((1, 8)), 6)
    with pytest.raises(InputError, match="positive integer"):
        idx.search(np.zeros((1, 8)), 0)
    with pytest.raises(InputError, match="dimension 7 does not match the index dimension 8"):
        idx.search(np.zeros((2, 7)), 1)
    with pytest.raises(InputError, match="NaN"):
        idx.search(np.full((1, 8), np.nan), 1)
    with pytest.raises(InputError, match="dimension 3 does not match"):
        idx.add(np.zeros((2, 3)))
    tiny = ExactIndex(8, memory_budget_mb=1e-6)
    tiny.add(np.ones((3, 8)))
    with pytest.raises(InputError, match="memory budget .* too small"):
        tiny.search(np.zeros((4, 8)), 1)
    with pytest.raises(InputError, match="bad index factory"):
        build_index(8, "Exact,int8")
    with pytest.raises(InputError, match="bad index factory string 'IVFX'"):
        build_index(8, "IVFX")


def test_float64_and_strided_inputs_are_converted(rng):
    g, q = _data(rng, n=200)
    idx = build_index(32)
    idx.add(g.astype(np.float64))
    s1, i1 = idx.search(q.astype(np.float64)[:, :], 5)
    s2, i2 = idx.search(np.asfortranarray(q), 5)
    wide = np.zeros((len(q), 64))
    wide[:, ::2] = q
    strided = wide[:, ::2]  # float64, not contiguous
    assert not strided.flags.c_contiguous
    s3, i3 = idx.search(strided, 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(i1, i3)


@pytest.mark.parametrize("factory, params", [("Exact", {}), ("Exact,fp16", {}), ("Exact,bf16", {}), ("Flat", {}),
                                             ("HNSW16", {"efSearch": 64}), ("IVF16,Flat", {"nprobe": 16}),
                                             ("IVF8,PQ8", {"nprobe": 8})])
def test_save_load_roundtrip_and_ids(rng, tmp_path, factory, params):
    g, q = _data(rng, n=2000)
    idx = build_index(32, factory, **params)
    ids = [f"img{j}" for j in range(len(g))]
    idx.add(g, ids)
    idx.meta = {"fingerprint": "enc#1"}
    s, i = idx.search(q, 10)
    idx.save(tmp_path / "ix")
    back = load_index(tmp_path / "ix")
    s2, i2 = back.search(q, 10)
    np.testing.assert_array_equal(i, i2)
    assert back.ids[i2[0, 0]] == f"img{i2[0, 0]}" and back.factory == idx.factory
    back.check_fingerprint("enc#1")
    with pytest.raises(StoreMismatchError, match="built from enc#1"):
        back.check_fingerprint("enc#2")
    if factory != "IVF8,PQ8":  # PQ is lossy; the others must find the exact top-1 on this data
        fs, fi = _flat(g, q, 10)
        assert (i[:, 0] == fi[:, 0]).mean() >= 0.9


def test_ivf_needs_enough_training_vectors(rng):
    idx = build_index(32, "IVF64,Flat")
    with pytest.raises(InputError, match="needs at least 64 vectors to train"):
        idx.add(rng.standard_normal((10, 32)))
    with pytest.raises(InputError, match="no search parameter 'nprob'"):
        build_index(32, "IVF4,Flat", nprob=2)


def test_load_index_errors(tmp_path):
    with pytest.raises(InputError, match="no index.json"):
        load_index(tmp_path)


def test_large_batches_take_the_faiss_kernel_with_the_same_contract(rng):
    g, _ = _data(rng, n=2000)
    q = rng.standard_normal((ExactIndex.FAISS_KNN_MIN_QUERIES + 5, 32)).astype(np.float32)
    idx = build_index(32)
    idx.add(g)
    s, i = idx.search(q, 7)
    ref_s, ref_i = idx._search_block(q[:5], idx.gallery, 7)  # small batch: our own GEMM path
    np.testing.assert_array_equal(i[:5], ref_i)
    np.testing.assert_allclose(s[:5], ref_s, atol=1e-5)
    assert i.dtype == np.int64 and s.dtype == np.float32
    # ties: equal scores come back in ascending label order on this path too
    tied = ExactIndex(2)
    tied.add(np.ones((10, 2), np.float32))
    _, ti = tied.search(np.ones((ExactIndex.FAISS_KNN_MIN_QUERIES, 2), np.float32), 4)
    assert (ti == np.arange(4)).all()


@pytest.mark.parametrize("nq", [3, 200])  # the blocked path and the FAISS brute-force path
def test_equal_scores_at_the_cut_go_to_the_lowest_labels(nq):
    """One total order — score descending, then label ascending — decides the list, also
    where the k-th place falls inside a run of equal scores (sharded search relies on it)."""
    rng = np.random.default_rng(0)
    g = (rng.integers(-2, 3, (3000, 16)) / 4).astype(np.float32)  # exact arithmetic: many exact ties
    q = (rng.integers(-2, 3, (nq, 16)) / 4).astype(np.float32)
    ix = ExactIndex(16, memory_budget_mb=0.05)  # several gallery blocks
    ix.add(g)
    s, lab = ix.search(q, 7)
    full = q @ g.T
    order = np.lexsort((np.broadcast_to(np.arange(3000), full.shape), -full), axis=1)[:, :7]
    assert np.array_equal(lab, order)
    assert np.array_equal(s, np.take_along_axis(full, order, 1))
