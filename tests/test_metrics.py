from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qshift.errors import InputError
from qshift.metrics import Qrels, first_positive_rank, ranks_from_topk, retrieval_metrics


def test_hand_computed_case():
    # 2 queries, gallery of 5. q0 positives {1, 3}; q1 positive {4}
    labels = np.array([[3, 0, 1, 2, 4], [0, 1, 2, 3, 4]])
    qrels = Qrels.from_lists([[1, 3], [4]])
    m = retrieval_metrics(labels, qrels, ks=(1, 5), k_map=5)
    assert m["R@1"] == 50.0 and m["R@5"] == 100.0
    assert m["MRR"] == pytest.approx((1 + 1 / 5) / 2)
    ap0 = (1 / 1 + 2 / 3) / 2
    ap1 = (1 / 5) / 1
    assert m["mAP@5"] == pytest.approx(100 * (ap0 + ap1) / 2)
    ndcg0 = (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
    ndcg1 = (1 / np.log2(6)) / 1
    assert m["nDCG@5"] == pytest.approx(100 * (ndcg0 + ndcg1) / 2)


def test_first_positive_rank_and_ties():
    scores = np.array([[0.1, 0.9, 0.5, 0.9], [0.3, 0.3, 0.3, 0.3]])
    # q0: positive 3 ties with item 1 (lower index first) -> rank 1; q1: all tied, positive 2 -> rank 2
    assert first_positive_rank(scores, Qrels.from_labels([3, 2])).tolist() == [1, 2]
    # multi-positive: best positive counts
    assert first_positive_rank(scores, Qrels.from_lists([[0, 2], [3, 1]])).tolist() == [2, 1]


def test_recall_with_full_ranks_and_medr():
    labels = np.array([[0], [1], [2]])
    m = retrieval_metrics(labels, Qrels.from_labels([0, 0, 0]), ks=(1, 10), k_map=1,
                          full_ranks=np.array([0, 4, 19]))
    assert m["R@1"] == pytest.approx(100 / 3) and m["R@10"] == pytest.approx(200 / 3)
    assert m["MedR"] == 5.0
    assert m["MRR"] == pytest.approx((1 + 1 / 5 + 1 / 20) / 3)


def test_bad_inputs():
    with pytest.raises(InputError, match="have no positive"):
        Qrels.from_lists([[1], []])
    with pytest.raises(InputError, match="do not match 2 queries"):
        first_positive_rank(np.zeros((3, 4)), Qrels.from_labels([0, 1]))
    with pytest.raises(InputError, match="out of range"):
        first_positive_rank(np.zeros((1, 4)), Qrels.from_labels([4]))
    with pytest.raises(InputError, match="needs top-10 lists"):
        retrieval_metrics(np.zeros((1, 5), int), Qrels.from_labels([0]), ks=(1, 10))


# -- an independent brute-force implementation -------------------------------------------
def _brute(scores, positives, ks, k):
    n_q, n = scores.shape
    out = {f"R@{x}": 0.0 for x in ks} | {"MRR": 0.0, "AP": 0.0, "NDCG": 0.0}
    for r in range(n_q):
        ranking = sorted(range(n), key=lambda j: (-scores[r, j], j))
        pos = set(positives[r])
        first = next(i for i, j in enumerate(ranking) if j in pos)
        for x in ks:
            out[f"R@{x}"] += 100.0 * (first < x) / n_q
        out["MRR"] += 1.0 / (first + 1) / n_q
        hits, ap, dcg = 0, 0.0, 0.0
        for i, j in enumerate(ranking[:k], start=1):
            if j in pos:
                hits += 1
                ap += hits / i
                dcg += 1 / np.log2(i + 1)
        ideal = sum(1 / np.log2(i + 1) for i in range(1, min(len(pos), k) + 1))
        out["AP"] += 100.0 * ap / min(len(pos), k) / n_q
        out["NDCG"] += 100.0 * dcg / ideal / n_q
    return out


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n_q=st.integers(1, 8), n=st.integers(1, 30), k=st.integers(1, 30))
def test_matches_brute_force(data, n_q, n, k):
    k = min(k, n)
    scores = np.array(data.draw(st.lists(st.lists(st.integers(0, 5), min_size=n, max_size=n),
                                         min_size=n_q, max_size=n_q)), dtype=np.float32)
    positives = [data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
                 for _ in range(n_q)]
    ks = tuple(sorted({1, k}))
    qrels = Qrels.from_lists(positives)
    ranks = first_positive_rank(scores, qrels)
    labels = np.array([sorted(range(n), key=lambda j: (-row[j], j))[:k] for row in scores])
    m = retrieval_metrics(labels, qrels, ks=ks, k_map=k, full_ranks=ranks)
    ref = _brute(scores, positives, ks, k)
    for x in ks:
        assert m[f"R@{x}"] == pytest.approx(ref[f"R@{x}"])
    assert m["MRR"] == pytest.approx(ref["MRR"])
    assert m[f"mAP@{k}"] == pytest.approx(ref["AP"])
    assert m[f"nDCG@{k}"] == pytest.approx(ref["NDCG"])
    # top-k ranks agree with full ranks wherever the first positive is inside the top k
    tk = ranks_from_topk(labels, qrels)
    assert np.array_equal(np.minimum(ranks, k), tk)


def test_qrels_take_picks_rows_in_order_with_repeats():
    q = Qrels.from_lists([[1, 3], [4], [0, 2, 5]])
    t = q.take([2, 0, 2, 1])
    assert [t.indices[t.indptr[i]:t.indptr[i + 1]].tolist() for i in range(len(t))] == \
        [[0, 2, 5], [1, 3], [0, 2, 5], [4]]
    assert len(q.take([])) == 0
