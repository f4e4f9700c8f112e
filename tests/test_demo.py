from __future__ import annotations

import json

from rich.console import Console

from qshift.demo import run_demo
from qshift.store import EmbeddingStore


def test_demo_runs_on_the_shipped_collection(tmp_path, monkeypatch):
    monkeypatch.setenv("QSHIFT_SHARED_DATA", str(tmp_path / "absent"))
    console = Console(record=True, width=120)
    report = run_demo(tmp_path / "out", EmbeddingStore(tmp_path / "store"), limit=60, console=console)
    assert report["source"].endswith("coco-dev-200/captions.txt")
    assert report["metrics"]["R@10"] > 60  # real model on real captions; chance is 16 %
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["metrics"] == report["metrics"]
    assert "R@1" in (tmp_path / "out" / "report.md").read_text()
    assert "zero-shot" in console.export_text()
