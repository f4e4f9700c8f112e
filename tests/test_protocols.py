"""World-ILIAS (image→image instance retrieval) and World-INQUIRE (many-positive text
queries): ground truth from the scene graphs, template splits, the i2i direction through
the task, the benchmark runner and the CLI, and bad input."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from qshift.errors import InputError
from qshift.io import read_json
from qshift.world.protocols import TEMPLATES, build_ilias, build_inquire, parse_spec

warnings.filterwarnings("ignore", message=".*has no checkpoint.*")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocols")
    return root, build_ilias(root, "test", 150, instances=20), build_inquire(root, "test", 400, min_relevant=3)


def _protocol(csv):
    return read_json(str(csv)[:-4] + ".protocol.json")


def test_ilias_layout(sets):
    _, ilias, _ = sets
    p = _protocol(ilias)
    role, inst = np.array(p["role"]), np.array(p["instance"])
    assert (role == "query").sum() == 20 and len(role) == 20 + 150
    for k in range(20):  # one query, three positives, two near-duplicates per instance
        assert ((inst == k) & (role == "gallery")).sum() == 3 and ((inst == k) & (role == "query")).sum() == 1
    assert (inst == -1).sum() == 150 - 60


def test_inquire_ground_truth_and_template_splits(sets):
    from qshift.world.protocols import OFFSETS
    from qshift.world.render import TRAIN_STYLES
    from qshift.world.scene import sample_scene

    _, _, inquire = sets
    p = _protocol(inquire)
    assert set(p["templates"]) <= {n for n, t in TEMPLATES.items() if t[0] == "test"}
    splits = {t[0] for t in TEMPLATES.values()}
    assert splits == {"train", "val", "test"}  # queries of kinds never seen in training
    scenes = [sample_scene(0, "test", OFFSETS["inquire"] + d, TRAIN_STYLES) for d in range(400)]
    for q in p["queries"][:40]:
        tsplit, slots, text, rel = TEMPLATES[q["template"]]
        args = next(a for a in slots() if text(*a) == q["text"])
        assert q["positives"] == [j for j, sc in enumerate(scenes) if rel(sc, *args)]  # exact, from the graph


def test_i2i_and_many_positive_tasks(sets, tiny_clip, tmp_path):
    from qshift.data.collection import load_collection
    from qshift.retrieval import build_task, evaluate
    from qshift.store import EmbeddingStore

    _, ilias, inquire = sets
    store = EmbeddingStore(tmp_path / "st")
    coll = load_collection(ilias)
    coll.meta["protocol"] = _protocol(ilias)
    task = build_task(coll, tiny_clip, "i2i", store, progress=False)
    assert task.direction == "i2i" and task.queries.shape[0] == 20 and task.gallery.shape[0] == 150
    assert (task.qrels.counts == 3).all()
    m = evaluate(task, ks=(1, 10), k_map=100)
    assert {"R@1", "R@10", "mAP@100"} <= set(m)
    with pytest.raises(InputError, match="searched i2i, not t2i"):
        build_task(coll, tiny_clip, "t2i", store, progress=False)
    qcoll = load_collection(inquire)
    qcoll.meta["protocol"] = _protocol(inquire)
    t2 = build_task(qcoll, tiny_clip, "t2i", store, progress=False)
    assert len(t2.raw) == len(qcoll.meta["protocol"]["queries"]) and (t2.qrels.counts >= 3).all()
    # a protocol file that belongs to other renderings is refused
    other = load_collection(ilias)
    other.meta["protocol"] = {**_protocol(ilias), "seed": 1}
    with pytest.raises(InputError, match="written for other renderings"):
        build_task(other, tiny_clip, "i2i", store, progress=False)
    empty = load_collection(inquire)
    empty.meta["protocol"] = {**_protocol(inquire)}
    empty.meta["protocol"]["queries"] = [{**empty.meta["protocol"]["queries"][0], "positives": []}]
    with pytest.raises(InputError, match="no relevant image"):
        build_task(empty, tiny_clip, "t2i", store, progress=False)


def test_bad_specs_and_builds(tmp_path):
    assert parse_spec("world-ilias:test-10k") == ("ilias", "test", 10000)
    assert parse_spec("world-inquire:train") == ("inquire", "train", None)
    with pytest.raises(InputError, match="split must be train, val or test"):
        parse_spec("world-ilias:dev")
    with pytest.raises(InputError, match="expected world-ilias"):
        parse_spec("world-nope:test")
    with pytest.raises(InputError, match="needs >= 2 renderings"):
        build_ilias(tmp_path, "test", 100, instances=5, renderings=1)
    with pytest.raises(InputError, match="cannot hold"):
        build_ilias(tmp_path, "test", 10, instances=5)


def test_the_benchmark_runner_takes_i2i(sets, tmp_path, monkeypatch):
    import shutil

    from qshift.benchmark import BenchConfig, run_benchmark
    from qshift.store import EmbeddingStore

    root, ilias, _ = sets
    # the runner resolves world-ilias:test-150 in $QSHIFT_CACHE/world-protocols (here: the small build)
    cache = tmp_path / "cache" / "world-protocols"
    shutil.copytree(root, cache)
    for f in cache.glob("ilias-test-150-i20*"):
        f.rename(f.with_name(f.name.replace("-i20", "")))
    (cache / "images" / "ilias-test-150-i20").rename(cache / "images" / "ilias-test-150")
    csv = (cache / "ilias-test-150.csv").read_text().replace("ilias-test-150-i20/", "ilias-test-150/")
    (cache / "ilias-test-150.csv").write_text(csv)
    monkeypatch.setenv("QSHIFT_CACHE", str(tmp_path / "cache"))
    cfg = BenchConfig(name="ilias", encoder="openclip:qshift-tiny-vit", collection="world-ilias:test-150",
                      direction="i2i", shifts=["clean", "gaussian_noise"], severities=[3], k_map=100,
                      methods=["zero-shot", {"name": "tent", "steps": 1}])
    out = run_benchmark(cfg, tmp_path / "res", EmbeddingStore(tmp_path / "st"), progress=False)
    cells = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    assert {c["method"] for c in cells} == {"zero-shot", "tent"} and all("mAP@100" in c["metrics"] for c in cells)
    assert all(c["queries"] == 20 and c["gallery"] == 150 for c in cells)
