from __future__ import annotations

import numpy as np
import pytest

from qshift.data.collection import Collection, load_collection
from qshift.retrieval import build_task, evaluate, text_to_text_task
from qshift.store import EmbeddingStore, Embeddings


def test_cross_modal_tasks_and_skipped_images(tiny_clip, image_collection, tmp_path):
    coll = load_collection(image_collection)
    coll.image_paths[2].write_bytes(b"broken")
    store = EmbeddingStore(tmp_path)
    with pytest.warns(UserWarning, match="skipped 1"):
        t2i = build_task(coll, tiny_clip, "t2i", store, progress=False, on_error="skip")
    assert t2i.gallery.shape[0] == 11 and t2i.queries.shape[0] == 22 and t2i.meta["dropped_queries"] == 2
    # ground truth follows the re-indexed gallery
    assert t2i.gallery_ids[t2i.qrels.indices[4]] == coll.ids[3]
    i2t = build_task(coll, tiny_clip, "i2t", store, progress=False, on_error="skip")
    assert i2t.queries.shape[0] == 11 and i2t.qrels.counts.tolist() == [2] * 11
    m = evaluate(t2i)
    assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 100


def test_t2t_gallery_is_mean_of_other_captions():
    vecs = np.eye(6, dtype=np.float32)
    coll = Collection("c", ["a", "b"], [["q0", "x", "y"], ["q1", "z", "w"]])
    emb = Embeddings(coll.text_ids(), vecs, "fp", "text")
    task = text_to_text_task(coll, emb)
    np.testing.assert_allclose(task.gallery[0], np.array([0, 1, 1, 0, 0, 0]) / np.sqrt(2), atol=1e-6)
    assert task.query_texts == ["q0", "q1"]


@pytest.mark.slow
def test_minilm_t2t_on_real_coco_captions(minilm, shared_data, tmp_path):
    from qshift.data.collection import load_lines

    coll = load_lines(shared_data / "coco-5k-dev" / "captions.txt", 5).subset(200)
    task = build_task(coll, minilm, "t2t", EmbeddingStore(tmp_path), progress=False)
    m = evaluate(task)
    assert m["R@1"] > 50 and m["R@10"] > 90  # a real pretrained model, not noise (chance: 0.5 %)


def test_one_pass_exact_ranking_agrees_with_the_index_path(rng):
    from qshift.index import build_index
    from qshift.metrics import Qrels, first_positive_rank
    from qshift.retrieval import RetrievalTask, exact_ranking

    g = rng.standard_normal((300, 16)).astype(np.float32)
    q = rng.standard_normal((40, 16)).astype(np.float32)
    qrels = Qrels.from_labels(rng.integers(0, 300, 40))
    labels, ranks = exact_ranking(q, g, qrels, 10, block=7)
    idx = build_index(16, "Exact")
    idx.add(g)
    np.testing.assert_array_equal(labels, idx.search(q, 10)[1])
    np.testing.assert_array_equal(ranks, first_positive_rank(q @ g.T, qrels))
    task = RetrievalTask("t2i", q, g, qrels, [], [])
    exact, flat = evaluate(task, factory="Exact"), evaluate(task, factory="Flat")
    assert exact == flat and "MedR" in exact
    assert "MedR" not in evaluate(task, factory="Exact,fp16")
