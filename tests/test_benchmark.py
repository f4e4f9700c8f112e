import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from qshift.benchmark import BenchConfig, load_config, run_benchmark
from qshift.errors import InputError
from qshift.methods import METHODS, register_method
from qshift.pipeline.stage import STAGES, Stage, register_stage
from qshift.paths import ASSETS
from qshift.report import write_report
from qshift.store import EmbeddingStore

COCO200 = str(ASSETS / "coco-dev-200" / "captions.txt")


def test_config_errors(tmp_path):
    base = {"name": "x", "encoder": "st:all-MiniLM-L6-v2", "collection": COCO200, "direction": "t2t"}
    with pytest.raises(InputError, match="'severites' \\(did you mean 'severities'\\?\\)"):
        BenchConfig.from_dict({**base, "severites": [1]})
    with pytest.raises(InputError, match="corrupts images, but t2t queries are texts"):
        BenchConfig.from_dict({**base, "shifts": ["fog"]})
    with pytest.raises(InputError, match="unknown method 'tnet'"):
        BenchConfig.from_dict({**base, "methods": ["tnet"]})
    with pytest.raises(InputError, match="severities must be 1–5"):
        BenchConfig.from_dict({**base, "severities": [0]})
    with pytest.raises(InputError, match="corrupt_side must be >= 0"):
        BenchConfig.from_dict({**base, "corrupt_side": -1})
    with pytest.raises(InputError, match="missing required"):
        BenchConfig.from_dict({"name": "x"})
    with pytest.raises(InputError, match="passes must be an integer >= 1, got 0"):
        BenchConfig.from_dict({**base, "passes": 0})
    bad = tmp_path / "c.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(InputError, match="cannot parse"):
        load_config(bad)
    toml = tmp_path / "c.toml"
    toml.write_text('name = "x"\nencoder = "st:all-MiniLM-L6-v2"\ncollection = "c.txt"\nshifts = ["ocr"]\n')
    assert load_config(toml).shifts == ["ocr"]
    with pytest.raises(InputError, match="not found"):
        load_config(tmp_path / "nope.yaml")


class Counting(Stage):
    """A pass-through stage that counts the cells it runs in (one setup per cell)."""

    kind = "transform"
    calls = 0

    def __init__(self, tag: int = 0) -> None:
        self.tag = tag

    def setup(self, ctx):
        Counting.calls += 1

    def __call__(self, batch):
        return batch


def test_t2t_grid_resume_and_report(tmp_path, minilm):
    register_stage("transform", "counting")(Counting)
    register_method("counting")(lambda tag=0: [{"transform": {"counting": {"tag": tag}}}])
    try:
        cfg = BenchConfig(name="coco200", encoder="st:all-MiniLM-L6-v2", collection=COCO200, direction="t2t",
                          shifts=["clean", "char_delete", "word_swap"], severities=[1, 5], streams=["mixed"],
                          methods=["zero-shot", "counting"], seeds=[0])
        store = EmbeddingStore(tmp_path / "store")
        out = run_benchmark(cfg, tmp_path / "res", store, progress=False)
        df = pd.read_csv(out / "results.csv")
        assert len(df) == 2 * (1 + 2 * 2 + 1)
        assert (pd.read_parquet(out / "results.parquet")["R@1"].to_numpy() == df["R@1"].to_numpy()).all()
        clean = df[(df["shift"] == "clean") & (df["method"] == "zero-shot")]["R@1"].item()
        from qshift.data.collection import load_lines
        from qshift.retrieval import build_task, evaluate

        ref = evaluate(build_task(load_lines(COCO200, 5), minilm, "t2t", store, progress=False))
        assert abs(clean - ref["R@1"]) < 1e-9  # same number as `qshift eval`
        s5 = df[(df["shift"] == "char_delete") & (df["severity"] == 5)]["R@1"].iloc[0]
        s1 = df[(df["shift"] == "char_delete") & (df["severity"] == 1)]["R@1"].iloc[0]
        assert s5 < s1 < clean + 1e-9  # corruption hurts, more at severity 5
        calls = Counting.calls
        run_benchmark(cfg, tmp_path / "res", store, progress=False)  # resume: nothing to redo
        assert Counting.calls == calls
        cell = next((out / "cells" / "counting").glob("char_delete-s5-*.json"))
        cell.unlink()
        run_benchmark(cfg, tmp_path / "res", store, progress=False)
        assert Counting.calls == calls + 1
        # a method added to the grid runs its 6 cells only; new parameters under its label rerun them
        more = replace(cfg, methods=[*cfg.methods, {"name": "counting", "label": "counting2"}])
        run_benchmark(more, tmp_path / "res", store, progress=False)
        assert Counting.calls == calls + 1 + 6
        run_benchmark(replace(cfg, methods=[*cfg.methods, {"name": "counting", "label": "counting2", "tag": 1}]),
                      tmp_path / "res", store, progress=False)
        assert Counting.calls == calls + 1 + 12
        out = run_benchmark(cfg, tmp_path / "res", store, progress=False)

        info = write_report([out], tmp_path / "rep")
        md = (tmp_path / "rep" / "report.md").read_text()
        assert "| zero-shot |" in md and "char_delete" in md and "stream:mixed" in md
        assert "eda+wordnet" in md and "nlpaug" in md  # generators are reported
        html = (tmp_path / "rep" / "report.html").read_text()
        assert html.count("data:image/png;base64,") == len(info["plots"]) == 3
        for p in info["plots"]:
            assert Path(p).stat().st_size > 5000
    finally:
        METHODS.remove("counting")
        STAGES["transform"].remove("counting")


def test_i2t_grid_with_image_shift(tmp_path, image_collection, tiny_clip):
    cfg = BenchConfig(name="img", encoder="openclip:qshift-tiny-vit", collection=str(image_collection),
                      direction="i2t", shifts=["clean", "gaussian_noise"], severities=[3])
    out = run_benchmark(cfg, tmp_path / "res", EmbeddingStore(tmp_path / "store"), progress=False)
    cells = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    assert [c["shift"] for c in cells] == ["clean", "gaussian_noise"]
    assert cells[1]["shift_info"]["generator"] == "imagecorruptions"
    (folder,) = (out / "shifts").glob("gaussian_noise-s3-seed0-*")
    assert len(list(folder.glob("*.png"))) == 12
    # another corruption setting never reuses these images: it writes its own folder
    native = replace(cfg, corrupt_side=0)
    out2 = run_benchmark(native, tmp_path / "res", EmbeddingStore(tmp_path / "store"), progress=False)
    folders = sorted((out2 / "shifts").glob("gaussian_noise-s3-seed0-*"))
    assert len(folders) == 2 and all(len(list(f.glob("*.png"))) == 12 for f in folders)
    a, b = (np.asarray(Image.open(f / "000000.png"), float) for f in folders)
    assert np.abs(a - b).mean() > 1
    cells2 = [json.loads(line) for line in (out2 / "cells.jsonl").read_text().splitlines()]
    assert cells2[1]["key"] != cells[1]["key"]  # the cell ran again on the new images


def test_cli_bench_and_report(tmp_path):
    from qshift.cli import app

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: cli\nencoder: st:all-MiniLM-L6-v2\ncollection: {COCO200}\ndirection: t2t\n"
                   f"shifts: [clean, ocr]\nseverities: [2]\nmax_queries: 50\nout: {tmp_path / 'res'}\n"
                   f"methods: [zero-shot]\n")
    res = CliRunner().invoke(app, ["bench", str(cfg), "--store", str(tmp_path / "st"), "--json"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "res" / "report.html").is_file()
    assert len(pd.read_csv(tmp_path / "res" / "results.csv")) == 2
    res = CliRunner().invoke(app, ["report", str(tmp_path / "res"), "-o", str(tmp_path / "r2")])
    assert res.exit_code == 0 and (tmp_path / "r2" / "report.md").is_file()
    cfg.write_text("name: cli\nencoder: st:all-MiniLM-L6-v2\ncolection: x\n")
    res = CliRunner().invoke(app, ["bench", str(cfg)])
    assert res.exit_code == 2 and "did you mean 'collection'" in res.output.replace("\n", " ")


def test_source_anchors_come_from_disjoint_data_and_are_recorded(tmp_path):
    """The adaptation source anchors may not contain a test query's clean text; the
    benchmark records where they came from."""
    base = dict(name="src", encoder="openclip:qshift-tiny-vit", collection=COCO200, direction="t2t",
                shifts=["ocr"], severities=[5], max_queries=40, query_items="0:100",
                methods=[{"name": "tcr", "steps": 1}])
    store = EmbeddingStore(tmp_path / "st")
    with pytest.raises(InputError, match="shares .* texts with the test queries"):
        run_benchmark(BenchConfig(**base, source=COCO200), tmp_path / "a", store, progress=False)
    # items 100: never query: their captions are a fair source
    out = run_benchmark(BenchConfig(**base, source={"source": COCO200, "items": "100:"}, source_size=50),
                        tmp_path / "b", store, progress=False)
    cell = json.loads((out / "cells.jsonl").read_text().splitlines()[0])
    assert cell["source"]["texts"] == 50 and cell["source"]["spec"]["items"] == "100:"
    assert cell["queries"] == 40
    from qshift.benchmark import Grid

    grid = Grid(BenchConfig(**base, source={"source": COCO200, "items": "100:"}), tmp_path / "c", store,
                progress=False)
    assert not set(grid.source_texts) & set(grid.raw_queries)
    # a few coincidental duplicates (short procedural captions) are dropped, not refused
    few = grid.raw_queries[:2] + [c[0] for c in load_collection_captions()[100:]]
    grid2 = Grid(BenchConfig(**base, source=few), tmp_path / "e", store, progress=False)
    assert grid2.source_info["dropped_shared"] == 2 and not set(grid2.source_texts) & set(grid2.raw_queries)
    none = Grid(BenchConfig(**{**base, "query_items": None}, source="none"), tmp_path / "d", store, progress=False)
    assert none.source_texts is None and none.source_info == {"spec": None}


def load_collection_captions():
    from qshift.data.collection import load_lines

    return load_lines(COCO200, 5).captions


def test_the_oracle_row_is_given_the_labels_and_no_one_else(tmp_path):
    cfg = BenchConfig(name="oracle", encoder="openclip:qshift-tiny-vit", collection=COCO200, direction="t2t",
                      shifts=["clean"], max_queries=64, source="none", batch_size=8,
                      methods=["zero-shot", {"name": "oracle", "label": "oracle", "labels": True, "lr": 0.05,
                                             "steps": 10, "temperature": 0.05}])
    out = run_benchmark(cfg, tmp_path / "res", EmbeddingStore(tmp_path / "st"), progress=False)
    df = pd.read_csv(out / "results.csv").set_index("method")
    assert df.loc["oracle", "R@1"] > df.loc["zero-shot", "R@1"] + 5  # trained on the answers: a ceiling
    with pytest.raises(InputError, match="labels: true"):
        run_benchmark(replace(cfg, methods=[{"name": "oracle", "lr": 0.01}]), tmp_path / "r2",
                      EmbeddingStore(tmp_path / "st"), progress=False)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "bench" / "configs").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_bench_config_loads(path):
    """A config a script writes (bench/tune_grid.py) or a person edits fails here, not an
    hour into its run: each loads through the loader that runs it, and every method given
    as a pipeline parses as one."""
    from qshift.continual.protocol import ContinualConfig
    from qshift.pipeline import parse_pipeline

    if path.stem.startswith("serve-"):
        assert parse_pipeline(path)
        return
    if path.stem.startswith("continual-"):
        assert ContinualConfig.load(path).methods
        return
    cfg = load_config(path)
    assert cfg.methods
    for m in cfg.methods:
        if isinstance(m, dict) and "pipeline" in m:
            parse_pipeline(m["pipeline"], f"{path.name}: {m.get('label')}")


def test_a_stream_cell_reports_clean_r1_after_the_stream(tmp_path, minilm):
    """Forgetting per stream cell: the clean queries scored by the tower as the stream left
    it. Zero-shot's equals the clean cell's R@1; an adapting method's has moved (an update
    that changed nothing would leave it equal)."""
    cfg = BenchConfig(name="coco200-forget", encoder="st:all-MiniLM-L6-v2", collection=COCO200, direction="t2t",
                      shifts=["clean", "char_swap"], severities=[], streams=["mixed"], seeds=[0],
                      methods=["zero-shot", {"label": "tent hot", "pipeline": [{"adapt": {"method": "tent",
                                                                                        "lr": 0.05}}]}])
    out = run_benchmark(cfg, tmp_path / "res", EmbeddingStore(tmp_path / "store"), progress=False)
    cells = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    by = {(c["method"], c["shift"]): c for c in cells}
    clean = by[("zero-shot", "clean")]["metrics"]["R@1"]
    assert by[("zero-shot", "stream:mixed")]["clean_r1_after"] == pytest.approx(clean)
    assert "clean_r1_after" not in by[("zero-shot", "clean")]  # only a stream leaves a tower behind
    assert by[("tent hot", "stream:mixed")]["clean_r1_after"] != pytest.approx(clean)


def test_passes_make_one_longer_stream_of_fresh_corruptions(tmp_path):
    """``passes: 2`` runs the query set under corruption seeds 0 and 1000 as one stream of
    twice the queries: zero-shot's R@1 is the mean of the two one-pass cells, and the grid
    key changes so no one-pass cell is reused."""
    from qshift.benchmark import Grid

    base = dict(name="passes", encoder="openclip:qshift-tiny-vit", collection=COCO200, direction="t2t",
                shifts=["char_swap"], severities=[5], max_queries=40, source="none", methods=["zero-shot"])
    store = EmbeddingStore(tmp_path / "st")
    one = {}
    for seed in (0, 1000):
        out = run_benchmark(BenchConfig(**base, seeds=[seed]), tmp_path / f"one{seed}", store, progress=False)
        one[seed] = json.loads((out / "cells.jsonl").read_text().splitlines()[0])
    texts = {s: json.loads((tmp_path / f"one{s}" / "shifts" / f"char_swap-s5-seed{s}.json").read_text())["queries"]
             for s in (0, 1000)}
    assert texts[0] != texts[1000]  # each pass is a fresh corruption of the same queries
    out = run_benchmark(BenchConfig(**base, passes=2), tmp_path / "two", store, progress=False)
    two = json.loads((out / "cells.jsonl").read_text().splitlines()[0])
    assert two["queries"] == 80 and two["shift_info"]["passes"] == 2
    assert two["metrics"]["R@1"] == pytest.approx((one[0]["metrics"]["R@1"] + one[1000]["metrics"]["R@1"]) / 2)
    assert Grid(BenchConfig(**base, passes=2), tmp_path / "k2", store, progress=False).key != \
        Grid(BenchConfig(**base), tmp_path / "k1", store, progress=False).key
