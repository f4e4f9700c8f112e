from __future__ import annotations

import json

from rich.console import Console

from qshift.demo import run_demo
from qshift.store import EmbeddingStore
from qshift.world.generate import WorldConfig, generate_world


def test_demo_runs_on_the_world_with_the_shipped_model(tmp_path, monkeypatch):
    # a small world test split where the demo looks for the default world
    monkeypatch.setenv("QSHIFT_CACHE", str(tmp_path / "cache"))
    generate_world(tmp_path / "cache" / "world", WorldConfig(n_test=40), splits=["test"])
    console = Console(record=True, width=140)
    report = run_demo(tmp_path / "out", EmbeddingStore(tmp_path / "store"), limit=40, console=console)
    rows = {(r["direction"], r["queries"]): r for r in report["rows"]}
    clean = rows[("t2i", "clean")]
    assert clean["gallery"] == 40 and clean["R@10"] > 60  # the shipped model really retrieves; chance is 25 %
    assert rows[("i2t", "clean")]["R@10"] > 60
    assert ("t2i", "keyboard (severity 3)") in rows and ("i2t", "fog (severity 3)") in rows
    held = rows[("t2i", "held-out domain (pixel art gallery)")]
    assert "QuARI" in held["qshift_ran"] and held["qshift"]["R@10"] > 40
    # every row shows zero-shot beside qshift's pipeline for that kind of shift, with the gain
    for r in report["rows"]:
        assert r["gain_R@1"] == r["qshift"]["R@1"] - r["R@1"] and r["qshift_ran"]
    assert "TTA" in rows[("i2t", "fog (severity 3)")]["qshift_ran"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["rows"] == report["rows"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| zero-shot R@1 | qshift R@1 | Δ R@1 |" in md and '"transform"' in md
    text = console.export_text()
    assert "zero-shot" in text and "qshift ran" in text
