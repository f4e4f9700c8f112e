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
    assert ("t2i", "held-out domain (pixel art gallery)") in rows
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["rows"] == report["rows"]
    assert "R@1" in (tmp_path / "out" / "report.md").read_text()
    assert "zero-shot" in console.export_text()
