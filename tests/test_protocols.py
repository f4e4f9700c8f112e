"""World-ILIAS (image→image instance retrieval) and World-INQUIRE (many-positive text
queries): ground truth from the scene graphs, template splits, the i2i direction through
the task, the benchmark runner and the CLI, and bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

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
    assert parse_spec("world-ilias:test-10k") == ("ilias", "test", 10000, None)
    assert parse_spec("world-inquire:train") == ("inquire", "train", None, None)
    assert parse_spec("world-ilias:train-i20000") == ("ilias", "train", None, 20000)
    assert parse_spec("world-ilias:train-50k-i8000") == ("ilias", "train", 50000, 8000)
    for bad in ("world-ilias:train-i0", "world-ilias:train-ix", "world-inquire:train-i50",
                "world-ilias:test-10k-20k", "world-ilias:train-i5-10k"):
        with pytest.raises(InputError, match="SPLIT\\[-SIZE\\]\\[-iN\\]"):
            parse_spec(bad)
    with pytest.raises(InputError, match="split must be train, val or test"):
        parse_spec("world-ilias:dev")
    with pytest.raises(InputError, match="expected world-ilias"):
        parse_spec("world-nope:test")
    with pytest.raises(InputError, match="needs >= 2 renderings"):
        build_ilias(tmp_path, "test", 100, instances=5, renderings=1)
    with pytest.raises(InputError, match="cannot hold"):
        build_ilias(tmp_path, "test", 10, instances=5)


def test_image_writes_of_two_builders_do_not_share_a_temporary_file(tmp_path, monkeypatch):
    """Two processes building the same set write the same PNGs: each write goes through a
    temporary file of its own (a shared name let one writer rename the other's file away)."""
    import os

    from qshift.world.render import save_png

    moves: list[str] = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moves.append(str(a)), real(a, b))[1])
    arr = np.zeros((4, 4, 3), np.uint8)
    save_png(tmp_path / "g0.png", arr)
    save_png(tmp_path / "g0.png", arr + 1)
    assert len(moves) == 2 and moves[0] != moves[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g0.png"]


def test_more_instances_extend_the_same_set(tmp_path):
    """world-ilias:SPLIT-iN: a larger training set holds the smaller one's instances unchanged."""
    from qshift.data.collection import load_collection
    from qshift.world.protocols import protocol_collection

    small, big = (protocol_collection(f"world-ilias:val-i{n}", root=tmp_path) for n in (3, 5))
    assert Path(big.source).name == "ilias-val-25-i5.csv" and len(small.image_paths) == 3 * 6
    p_small, p_big = small.meta["protocol"], big.meta["protocol"]
    assert max(p_big["instance"]) == 4 and p_big["instance"][:18] == p_small["instance"]
    for a, b in zip(small.image_paths, big.image_paths[:18]):
        assert a.read_bytes() == b.read_bytes()
    assert load_collection(Path(big.source)).captions[:18] == small.captions


def test_inquire_set_built_before_a_template_was_added_is_rebuilt(tmp_path):
    """A cached World-INQUIRE set records its split's template names; when the templates
    change (val grew from one template to three), the set is rebuilt, not read with the old
    queries."""
    from qshift.io import write_json
    from qshift.world.protocols import protocol_collection, split_templates

    assert split_templates("val") == ["color_position", "size_color", "size_shape"]
    fresh = protocol_collection("world-inquire:val-300", root=tmp_path).meta["protocol"]
    assert fresh["template_set"] == split_templates("val") and len(fresh["templates"]) >= 2
    meta = tmp_path / "inquire-val-300.protocol.json"
    old = {k: v for k, v in fresh.items() if k != "template_set"}
    write_json(meta, {**old, "queries": [q for q in old["queries"] if q["template"] == "size_shape"]})
    again = protocol_collection("world-inquire:val-300", root=tmp_path).meta["protocol"]
    assert again["queries"] == fresh["queries"]
    write_json(meta, {**fresh, "queries": fresh["queries"][:1]})  # current: read as it is
    assert len(protocol_collection("world-inquire:val-300", root=tmp_path).meta["protocol"]["queries"]) == 1


def _stage_cache(root, tmp_path, monkeypatch) -> None:
    """Make world-ilias:test-150 resolve in $QSHIFT_CACHE/world-protocols to the small build."""
    import shutil

    cache = tmp_path / "cache" / "world-protocols"
    shutil.copytree(root, cache)
    for f in cache.glob("ilias-test-150-i20*"):
        f.rename(f.with_name(f.name.replace("-i20", "")))
    (cache / "images" / "ilias-test-150-i20").rename(cache / "images" / "ilias-test-150")
    csv = (cache / "ilias-test-150.csv").read_text().replace("ilias-test-150-i20/", "ilias-test-150/")
    (cache / "ilias-test-150.csv").write_text(csv)
    monkeypatch.setenv("QSHIFT_CACHE", str(tmp_path / "cache"))


def test_quari_cli_trains_on_a_protocol_set(sets, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from qshift.cli import app

    root, _, _ = sets
    _stage_cache(root, tmp_path, monkeypatch)
    small = ["-e", "openclip:qshift-tiny-vit", "--epochs", "1", "--rank", "4", "--hidden", "16", "--layers", "1",
             "--heads", "2", "--steps", "1", "--batch-size", "8", "--val-fraction", "0", "--store", str(tmp_path / "st")]
    res = CliRunner().invoke(app, ["quari", "train", "world-ilias:test-150", "--direction", "i2i",
                                   "-o", str(tmp_path / "q"), *small, "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["log"]) == 1 and (tmp_path / "q" / "model.safetensors").is_file()
    res = CliRunner().invoke(app, ["quari", "train", "world-ilias:test-150", "--direction", "i2i", "--hard-negatives",
                                   "3", "-o", str(tmp_path / "qh"), *small, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "qh" / "quari.json").read_text())["train"]["hard_negatives"] == 3
    res = CliRunner().invoke(app, ["quari", "train", "world-ilias:test-150", "--direction", "t2i",
                                   "-o", str(tmp_path / "q2"), *small])
    assert res.exit_code != 0 and "trains i2i, not t2i" in res.output


def test_the_benchmark_runner_takes_i2i(sets, tmp_path, monkeypatch):
    from qshift.benchmark import BenchConfig, run_benchmark
    from qshift.store import EmbeddingStore

    root, ilias, _ = sets
    _stage_cache(root, tmp_path, monkeypatch)
    cfg = BenchConfig(name="ilias", encoder="openclip:qshift-tiny-vit", collection="world-ilias:test-150",
                      direction="i2i", shifts=["clean", "gaussian_noise"], severities=[3], k_map=100,
                      methods=["zero-shot", {"name": "tent", "steps": 1}])
    out = run_benchmark(cfg, tmp_path / "res", EmbeddingStore(tmp_path / "st"), progress=False)
    cells = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    assert {c["method"] for c in cells} == {"zero-shot", "tent"} and all("mAP@100" in c["metrics"] for c in cells)
    assert all(c["queries"] == 20 and c["gallery"] == 150 for c in cells)


def test_quari_training_pairs_of_both_protocols(sets, tiny_clip, tmp_path):
    """ILIAS: each rendering is a target whose queries are its instance's other renderings
    (grouped by instance, near-duplicates left out); INQUIRE: one target per (query,
    relevant image), capped and grouped by query; both train QuARI."""
    from qshift.data.collection import load_collection
    from qshift.quari import QuARIConfig, QuARITrainConfig, train_quari
    from qshift.quari.data import pairs_and_groups, protocol_negatives, protocol_pairs
    from qshift.store import EmbeddingStore

    _, ilias, inquire = sets
    store = EmbeddingStore(tmp_path / "st")
    coll = load_collection(ilias)
    coll.meta["protocol"] = p = _protocol(ilias)
    q, t, tof, groups = protocol_pairs(coll, tiny_clip, store, progress=False)
    image = store.encode(tiny_clip, coll, "image", progress=False).vectors
    inst = np.array(p["instance"])
    assert len(t) == 20 * 4 and len(q) == 20 * 4 * 3 and np.bincount(groups).tolist() == [4] * 20
    rows = {tuple(np.round(v, 5)): i for i, v in enumerate(image)}
    for qi in range(0, len(q), 7):
        a, b = rows[tuple(np.round(q[qi], 5))], rows[tuple(np.round(t[tof[qi]], 5))]
        assert a != b and inst[a] == inst[b] == groups[tof[qi]] >= 0   # another rendering of the same instance
    with pytest.raises(InputError, match="trains i2i, not t2i"):
        pairs_and_groups(coll, tiny_clip, "t2i", store, progress=False)
    pool = protocol_negatives(coll, tiny_clip, store, progress=False)             # near-duplicates + distractors
    assert len(pool) == (inst < 0).sum() == len(inst) - 80 and np.allclose(pool, image[inst < 0])
    qcoll = load_collection(inquire)
    qcoll.meta["protocol"] = pq = _protocol(inquire)
    q2, t2, tof2, g2 = protocol_pairs(qcoll, tiny_clip, store, max_positives=4, progress=False)
    counts = [min(4, len(x["positives"])) for x in pq["queries"]]
    assert np.bincount(g2).tolist() == counts and (tof2 == np.arange(len(q2))).all()
    gimg = store.encode(tiny_clip, qcoll, "image", progress=False).vectors
    grow = {tuple(np.round(v, 5)): i for i, v in enumerate(gimg)}
    for j in range(0, len(t2), 5):                                          # every target is a relevant image
        assert grow[tuple(np.round(t2[j], 5))] in pq["queries"][g2[j]]["positives"]
    res = train_quari(q, t, tof, QuARIConfig(dim=q.shape[1], rank=4, hidden=16, layers=1, heads=2, steps=1),
                      QuARITrainConfig(epochs=2, batch_size=8, val_fraction=0.0), tmp_path / "run",
                      progress=False, groups=groups)
    assert len(res["log"]) == 2 and np.isfinite(res["log"][-1]["loss"])
    assert protocol_negatives(qcoll, tiny_clip, store, progress=False) is None
    bad = load_collection(ilias)
    bad.meta["protocol"] = {**p, "seed": 3}
    with pytest.raises(InputError, match="other renderings"):
        protocol_pairs(bad, tiny_clip, store, progress=False)
