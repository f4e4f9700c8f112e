from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qshift.cli import app

runner = CliRunner()
ENC = "openclip:qshift-tiny-vit"


def _run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_encode_index_search_eval_end_to_end(image_collection, tmp_path):
    store = tmp_path / "store"
    r = _run("encode", image_collection, "-e", ENC, "--modality", "both", "--store", store, "--json")
    assert r.exit_code == 0, r.output
    entries = {e["modality"]: e for e in json.loads(r.stdout)}
    assert entries["image"]["n"] == 12 and entries["text"]["n"] == 24

    r = _run("index", entries["image"]["entry"], "-o", tmp_path / "ix", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n"] == 12

    img = image_collection / "images" / "red_circle_1.png"
    r = _run("search", tmp_path / "ix", "-e", ENC, "-t", "a red circle", "-i", img, "-k", "3", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [q["query"] for q in res] == ["a red circle", str(img)]
    assert res[1]["results"][0]["id"] == "red_circle_1.png"  # an image finds itself first
    assert res[1]["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)

    r = _run("eval", image_collection, "-e", ENC, "--store", store, "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["metrics"]
    assert set(m) == {"t2i", "i2t"} and m["t2i"]["queries"] == 24 and m["i2t"]["gallery"] == 24
    r = _run("eval", image_collection, "-e", ENC, "--store", store)
    assert r.exit_code == 0 and "R@1" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["encode", "/no/such/file.csv", "-e", ENC], "/no/such/file.csv: collection not found"),
    (["eval", "{coll}", "-e", "clip:x"], "unknown backend 'clip'"),
    (["eval", "{coll}", "-e", ENC, "--direction", "x2y"], "unknown direction 'x2y'"),
    (["search", "{tmp}", "-e", ENC, "-t", "hi"], "no index.json"),
    (["search", "{tmp}", "-e", ENC], "give at least one query"),
    (["index", "{tmp}", "-o", "{tmp}/ix"], "no manifest.json"),
])
def test_errors_are_clear_and_exit_2(image_collection, tmp_path, args, message):
    args = [a.format(coll=image_collection, tmp=tmp_path) for a in args]
    r = _run(*args)
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split())


def test_search_refuses_index_from_another_encoder(image_collection, tmp_path):
    r = _run("encode", image_collection, "-e", ENC, "--store", tmp_path / "s", "--json")
    entry = json.loads(r.stdout)[0]["entry"]
    assert _run("index", entry, "-o", tmp_path / "ix").exit_code == 0
    r = _run("search", tmp_path / "ix", "-e", "st:all-MiniLM-L6-v2", "-t", "hello")
    assert r.exit_code == 2 and "re-encode" in " ".join(r.output.split())


def test_help_has_examples():
    r = _run("encode", "--help")
    assert r.exit_code == 0 and "Example" in r.output


def test_adapt_command_compares_with_zero_shot(image_collection, tmp_path):
    r = _run("adapt", image_collection, "-e", ENC, "-m", "tent", "-s", "keyboard", "--severity", "2",
             "--batch-size", "8", "--steps", "1", "--store", tmp_path / "store", "-o", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["r1"]
    assert set(rows) == {"clean", "keyboard s2"} and set(rows["clean"]) == {"zero-shot", "tent"}
    r = _run("adapt", image_collection, "-e", ENC, "-m", "tenet", "--store", tmp_path / "store")
    assert r.exit_code != 0 and "tenet" in r.output
