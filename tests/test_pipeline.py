"""The query pipeline: configs, built-in stages, transforms, state, and bad input."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from helpers import DIM, FeatureEncoder
from qshift.errors import CheckpointMismatchError, InputError, StoreMismatchError
from qshift.index import ExactIndex
from qshift.pipeline import Pipeline, PipelineContext, create_stage, list_stages, parse_pipeline
from qshift.registry import Registry

N = 30
TEXTS = [f"a {c} {s} {w}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "star", "ring")
         for w in ("on the left", "at the top")]


@pytest.fixture()
def world():
    enc = FeatureEncoder(n=64)
    rng = np.random.default_rng(3)
    g = rng.standard_normal((N, DIM)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    return enc, g, [str(i) for i in range(20)]


def _ctx(enc, g, **kw):
    return PipelineContext(enc, kw.pop("direction", "t2i"), gallery=g, **kw)


# -- configs ------------------------------------------------------------------------------
def test_config_forms_and_implied_stages(tmp_path):
    kinds = lambda specs: [(s.kind, s.name) for s in specs]  # noqa: E731
    assert kinds(parse_pipeline(None)) == [("encode", "frozen"), ("rank", "index")]
    specs = parse_pipeline([{"adapt": "rest"}, {"transform": {"quari": "runs/q"}}])
    assert kinds(specs) == [("encode", "frozen"), ("adapt", "rest"), ("transform", "quari"), ("rank", "index")]
    assert specs[2].options == {"checkpoint": "runs/q"}  # the stage's primary option
    specs = parse_pipeline({"stages": [{"adapt": {"method": "tent", "lr": 1e-3}},
                                       {"transform": {"quari": {"checkpoint": "q", "mode": "rerank"}}},
                                       {"rank": {"overfetch": 20}}]})
    assert specs[1].options == {"lr": 1e-3} and specs[2].options == {"checkpoint": "q", "mode": "rerank"}
    assert specs[-1].options == {"overfetch": 20}
    spec = parse_pipeline([{"transform": {"quari": "q", "mode": "rerank"}}])[1]  # NAME: primary, + more options
    assert (spec.name, spec.options) == ("quari", {"checkpoint": "q", "mode": "rerank"})
    f = tmp_path / "p.yaml"
    f.write_text("- adapt: {method: tcr, steps: 1}\n")
    assert kinds(parse_pipeline(f))[1] == ("adapt", "tcr")
    stages = list_stages()
    assert "rest" in stages["adapt"] and "quari" in stages["transform"] and stages["rank"] == ["index"]


@pytest.mark.parametrize("config, message", [
    ([{"adpt": "rest"}], "unknown stage kind 'adpt' (did you mean 'adapt'?)"),
    ([{"adapt": "rset"}], "unknown adapt stage 'rset' (did you mean 'rest'?)"),
    ([{"transform": {"ta": "x"}}, {"adapt": "rest"}], "stage #2 (adapt: rest) after transform: ta cannot work"),
    ([{"adapt": "rest"}, {"adapt": "tent"}], "at most one adapt stage"),
    (["rest"], "a stage is a mapping"),
    ([{"adapt": "rest", "transform": "ta"}], "a mapping with one key"),
    ({"foo": []}, "needs a 'stages' list"),
    ([{"transform": {"foo": 3, "x": 1}}], "name the stage with 'method:'"),
    ([{"transform": {"quari": {"k": 3}, "k": 4}}], "options ['k'] given twice"),
])
def test_bad_configs_are_named(config, message):
    with pytest.raises(InputError) as exc:
        parse_pipeline(config)
    assert message in str(exc.value)


def test_bad_stage_options_are_named(tmp_path):
    with pytest.raises(InputError, match=r"adapt stage 'rest': unknown option 'lrr' \(did you mean 'lr'\?\)"):
        create_stage("adapt", "rest", {"lrr": 1e-3})
    with pytest.raises(InputError, match=r"rank stage 'index': unknown option 'overfech'"):
        create_stage("rank", "index", {"overfech": 3})
    with pytest.raises(InputError, match="lr must be in"):
        create_stage("adapt", "tent", {"lr": 5})
    with pytest.raises(InputError, match="not found"):
        create_stage("transform", "ta", {"checkpoint": str(tmp_path / "none.safetensors")})
    with pytest.raises(InputError, match="mode must be one of full, rerank"):
        create_stage("transform", "quari", {"checkpoint": "x", "mode": "both"})


def test_registries_refuse_duplicates():
    from qshift.adapt import register_objective
    from qshift.adapt.tent import Tent

    r = Registry("thing")
    r.add("a", 1)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        r.add("a", 2)
    with pytest.raises(ValueError, match="already registered"):
        register_objective("tent")(Tent)
    with pytest.raises(InputError, match="unknown thing 'b'; known: a"):
        r.get("b")


# -- zero-shot: encode + rank -----------------------------------------------------------------
def test_zero_shot_search_and_score_agree_with_the_index(world):
    enc, g, qs = world
    q = enc.encode_text(qs)
    ix = ExactIndex(DIM)
    ix.add(g, [f"item{i}" for i in range(N)])
    with Pipeline.from_config(None, _ctx(enc, g, index=ix)) as pipe:
        res = pipe.search(qs, k=5)
        scores = pipe.score(qs)
    want_s, want_l = ix.search(q, 5)
    assert [h["id"] for h in res[3].hits] == [f"item{j}" for j in want_l[3]]
    assert np.allclose([h["score"] for h in res[3].hits], want_s[3], atol=1e-6)
    assert [h["rank"] for h in res[0].hits] == [1, 2, 3, 4, 5]
    assert set(res[0].timings) == {"encode:frozen", "rank:index"}
    assert np.allclose(scores, q @ g.T, atol=1e-6)
    # precomputed embeddings (the benchmark passes the store's) are used as they are
    with Pipeline.from_config(None, _ctx(enc, g)) as pipe:
        assert np.allclose(pipe.score(qs, embeddings=q * 0 + q[0]), np.tile(q[0] @ g.T, (len(qs), 1)), atol=1e-6)


@pytest.mark.parametrize("k, message", [(0, "k=0 must be an integer in 1..30"), (31, "k=31 must be"),
                                        (2.5, "k=2.5 must be")])
def test_bad_k_and_empty_queries(world, k, message):
    enc, g, qs = world
    with Pipeline.from_config(None, _ctx(enc, g)) as pipe:
        with pytest.raises(InputError, match=message.replace("(", r"\(")):
            pipe.search(qs, k=k)
        with pytest.raises(InputError, match="no queries"):
            pipe.search([], k=3)
        with pytest.raises(InputError, match="permutation"):
            pipe.score(qs, order=[0, 0, 1])


def test_context_needs_a_gallery():
    with pytest.raises(InputError, match="give the gallery embeddings or an index"):
        PipelineContext(FeatureEncoder(), "t2i")
    with pytest.raises(InputError, match="unknown direction 'x2y'"):
        PipelineContext(FeatureEncoder(), "x2y", gallery=np.eye(DIM, dtype=np.float32))
    with pytest.raises(InputError, match="NaN"):
        PipelineContext(FeatureEncoder(), "t2i", gallery=np.full((3, DIM), np.nan, np.float32))


# -- transforms: QuARI and TA ----------------------------------------------------------------
@pytest.fixture()
def quari_dir(tmp_path, world):
    from qshift.quari import QuARI, QuARIConfig
    from qshift.quari.train import save_quari

    torch.manual_seed(0)
    model = QuARI(QuARIConfig(dim=DIM, rank=2, hidden=16, layers=1, heads=2, steps=2)).eval()
    save_quari(model, tmp_path / "quari", world[0].fingerprint(), None, None, [])
    return tmp_path / "quari", model


def test_quari_stage_full_and_rerank(world, quari_dir):
    from qshift.pipeline.stages import RERANK_OFFSET
    from qshift.quari import quari_scores
    from qshift.quari.scoring import lowrank_scores

    enc, g, qs = world
    path, model = quari_dir
    q = enc.encode_text(qs)
    exact = quari_scores(model, q, g)
    with Pipeline.from_method({"name": "quari", "checkpoint": str(path)}, _ctx(enc, g)) as pipe:
        assert np.allclose(pipe.score(qs), exact, atol=1e-5)            # whole-gallery rows: exact QuARI
        res = pipe.search(qs, k=3)
    want = np.argsort(-exact, axis=1, kind="stable")[:, :3]
    assert [[h["index"] for h in r.hits] for r in res] == want.tolist()  # full search (over-fetched, re-scored)
    cfg = [{"transform": {"quari": {"checkpoint": str(path), "mode": "rerank", "k": 5}}}]
    with Pipeline.from_config(cfg, _ctx(enc, g)) as pipe:
        rows = pipe.score(qs)
        top = pipe.search(qs, k=3)
    first = q @ g.T
    cand = np.argsort(-first, axis=1, kind="stable")[:, :5]
    with torch.inference_mode():
        qp, u, v = model(torch.from_numpy(q))
        resc = lowrank_scores(qp, u, v, torch.from_numpy(g)[torch.from_numpy(cand)], model.cfg.anchor).numpy()
    want_rows = first - RERANK_OFFSET
    np.put_along_axis(want_rows, cand, resc + RERANK_OFFSET, axis=1)
    assert np.allclose(rows, want_rows, atol=1e-5)                      # the re-rank score offset
    assert (np.sort(rows, 1)[:, -5:] > 2).all() and (np.sort(rows, 1)[:, :-5] < -2).all()
    order = np.take_along_axis(cand, np.argsort(-resc, axis=1, kind="stable"), 1)[:, :3]
    assert [[h["index"] for h in r.hits] for r in top] == order.tolist()


def test_ta_stage_rows_and_search(world, tmp_path):
    from qshift.quari.search import save_ta
    from qshift.quari.train import project

    enc, g, qs = world
    p = np.eye(DIM, dtype=np.float32) + 0.3 * np.random.default_rng(0).standard_normal((DIM, DIM)).astype(np.float32)
    save_ta(tmp_path / "ta.safetensors", p, backbone=enc.fingerprint())
    q = enc.encode_text(qs)
    want = project(q, p) @ project(g, p).T
    cfg = [{"transform": {"ta": str(tmp_path / "ta.safetensors")}}, {"rank": {"overfetch": 30}}]
    with Pipeline.from_config(cfg, _ctx(enc, g)) as pipe:
        assert np.allclose(pipe.score(qs), want, atol=1e-5)
        res = pipe.search(qs, k=4)
    assert [[h["index"] for h in r.hits] for r in res] == np.argsort(-want, 1, kind="stable")[:, :4].tolist()
    save_ta(tmp_path / "other.safetensors", p, backbone="st:other#123")
    with pytest.raises(CheckpointMismatchError, match="trained on embeddings of st:other#123"):
        Pipeline.from_config([{"transform": {"ta": str(tmp_path / "other.safetensors")}}], _ctx(enc, g))


def test_quari_checkpoint_of_another_encoder_is_refused(world, tmp_path):
    from qshift.quari import QuARI, QuARIConfig
    from qshift.quari.train import save_quari

    enc, g, _ = world
    save_quari(QuARI(QuARIConfig(dim=DIM, rank=2, hidden=16, layers=1, heads=2)), tmp_path / "q",
               "openclip:other#abc", None, None, [])
    with pytest.raises(CheckpointMismatchError, match="trained on embeddings of openclip:other#abc"):
        Pipeline.from_method({"name": "quari", "checkpoint": str(tmp_path / "q")}, _ctx(enc, g))


def test_adapt_then_transform_compose(world, quari_dir):
    enc, g, qs = world
    path, _ = quari_dir
    cfg = [{"adapt": {"method": "tent", "lr": 1e-2, "batch_size": 10}}, {"transform": {"quari": str(path)}}]
    with Pipeline.from_config(cfg, _ctx(enc, g)) as pipe:
        res = pipe.search(qs, k=3)
        assert pipe.stages[1].adapter.stats["batches"] == 2
    assert set(res[0].timings) == {"encode:frozen", "adapt:tent", "transform:quari", "rank:index"}


# -- state: stop, save, resume ---------------------------------------------------------------
@pytest.mark.parametrize("method", ["tent", "eata", "sar", "read", "deyo", "tcr", "rest", "epcl", "rest+epcl"])
def test_stop_after_batch_k_and_resume_equals_one_run(tiny_clip, tmp_path, method):
    g = tiny_clip.encode_text(TEXTS)
    queries = [t.replace("a ", "one ", 1) + f" {i % 3}" for i, t in enumerate(TEXTS)]
    order = np.random.default_rng(1).permutation(len(queries))
    extra = {"epcl_weight": 1.0, "epcl": {"n_proxies": 4}} if method == "rest+epcl" else \
        {"n_proxies": 4} if method == "epcl" else {}
    cfg = [{"adapt": {"method": method.split("+")[0], "lr": 1e-2, "batch_size": 8, "steps": 2, "temperature": 0.02,
                      **extra}}]
    ctx = lambda: PipelineContext(tiny_clip, "t2i", gallery=g, source_texts=TEXTS[::3])  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with Pipeline.from_config(cfg, ctx()) as pipe:
            whole = pipe.score(queries, order)
        first, rest = [queries[i] for i in order[:16]], [queries[i] for i in order[16:]]
        with Pipeline.from_config(cfg, ctx()) as pipe:
            pipe.score(first)
            pipe.save_state(tmp_path / "s.pt")
        with Pipeline.from_config(cfg, ctx()) as pipe:
            pipe.load_state(tmp_path / "s.pt")
            resumed = pipe.score(rest)
        with Pipeline.from_config(cfg, ctx()) as pipe:
            fresh = pipe.score(rest)
    assert np.allclose(resumed, whole[order[16:]], atol=1e-6)
    assert not np.allclose(fresh, whole[order[16:]], atol=1e-6)  # the state carried what was learnt


def test_state_files_of_another_encoder_pipeline_or_gallery_are_refused(world, tmp_path, tiny_clip):
    enc, g, qs = world
    with Pipeline.from_config([{"adapt": "tent"}], _ctx(enc, g)) as pipe:
        pipe.search(qs, k=2)
        pipe.save_state(tmp_path / "s.pt")
        before = (tmp_path / "s.pt").read_bytes()
    with Pipeline.from_config([{"adapt": "rest"}], _ctx(enc, g)) as pipe:
        with pytest.raises(StoreMismatchError, match="written by another pipeline"):
            pipe.load_state(tmp_path / "s.pt")
    with Pipeline.from_config([{"adapt": "tent"}], _ctx(enc, g[:20])) as pipe:
        with pytest.raises(StoreMismatchError, match="against another gallery"):
            pipe.load_state(tmp_path / "s.pt")
    other = FeatureEncoder()
    other.fingerprint = lambda: "test:features#other"
    with Pipeline.from_config([{"adapt": "tent"}], _ctx(other, g)) as pipe:
        with pytest.raises(StoreMismatchError, match="written by encoder test:features#0"):
            pipe.load_state(tmp_path / "s.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a state")
    with Pipeline.from_config([{"adapt": "tent"}], _ctx(enc, g)) as pipe:
        with pytest.raises(InputError, match="not a readable qshift state file"):
            pipe.load_state(tmp_path / "bad.pt")
        with pytest.raises(InputError, match="state file not found"):
            pipe.load_state(tmp_path / "none.pt")
    assert (tmp_path / "s.pt").read_bytes() == before  # a refused load writes nothing


def test_encoders_without_a_torch_tower_cannot_adapt(world):
    enc, g, _ = world

    class Frozen(FeatureEncoder):
        def tower(self, modality):
            return None

    with pytest.raises(InputError, match="cannot be adapted"):
        Pipeline.from_config([{"adapt": "tent"}], _ctx(Frozen(), g))

    class VectorsOnly:
        spec, dim = "vectors", DIM

        def fingerprint(self):
            return "vectors#0"

    with pytest.raises(InputError, match="does not expose a differentiable query tower"):
        Pipeline.from_config([{"adapt": "tent"}], _ctx(VectorsOnly(), g))


def test_setup_failure_restores_the_encoder(world, tmp_path):
    """A stage that fails in setup leaves the stages before it closed (the tower as it was)."""
    enc, g, _ = world
    flags = [p.requires_grad for p in enc.net.parameters()]
    with pytest.raises(InputError):
        Pipeline.from_config([{"adapt": "tent"}, {"transform": {"ta": str(tmp_path / "no.safetensors")}}],
                             _ctx(enc, g))
    assert [p.requires_grad for p in enc.net.parameters()] == flags


# -- the CLI -------------------------------------------------------------------------------------
def test_cli_search_with_pipeline_and_state(image_collection, tmp_path):
    from typer.testing import CliRunner

    from qshift.cli import app

    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    enc = "openclip:qshift-tiny-vit"
    r = run("encode", image_collection, "-e", enc, "--modality", "image", "--store", tmp_path / "st", "--json")
    assert r.exit_code == 0, r.output
    assert run("index", json.loads(r.stdout)[0]["entry"], "-o", tmp_path / "ix").exit_code == 0
    cfg = tmp_path / "p.yaml"
    cfg.write_text("- adapt: {method: tent, lr: 0.01}\n")
    args = ["search", tmp_path / "ix", "-e", enc, "-t", "a red circle", "-t", "a blue square", "-k", "3",
            "--pipeline", cfg, "--state", tmp_path / "session.pt", "--json"]
    first = run(*args)
    assert first.exit_code == 0, first.output
    res = json.loads(first.stdout)
    assert len(res) == 2 and len(res[0]["results"]) == 3
    assert set(res[0]["timings"]) == {"encode:frozen", "adapt:tent", "rank:index"}
    state = torch.load(tmp_path / "session.pt", weights_only=True)
    assert state["stages"]["1:adapt:tent"]["stats"]["batches"] == 1
    second = run(*args)
    assert second.exit_code == 0, second.output
    state = torch.load(tmp_path / "session.pt", weights_only=True)
    assert state["stages"]["1:adapt:tent"]["stats"]["batches"] == 2  # the session carried over
    r = run("search", tmp_path / "ix", "-e", enc, "-t", "x", "--adapt", "rest", "--state", tmp_path / "session.pt")
    assert r.exit_code == 2 and "written by another pipeline" in " ".join(r.output.split())
    r = run("search", tmp_path / "ix", "-e", enc, "-t", "a rde circel", "--refine", "spell", "--json")
    assert r.exit_code == 0, r.output
    assert "refine:spell" in json.loads(r.stdout)[0]["timings"]
    r = run("search", tmp_path / "ix", "-e", enc, "-t", "x", "--method", "rset")
    assert r.exit_code == 2 and "did you mean 'rest'" in r.output
    r = run("search", tmp_path / "ix", "-e", enc, "-t", "x", "-i", image_collection / "images" / "red_circle_0.png",
            "--adapt", "tent", "--state", tmp_path / "s2.pt")
    assert r.exit_code == 2 and "one online session" in " ".join(r.output.split())
    r = run("methods", "--json")
    assert "rest" in json.loads(r.stdout)["methods"] and "quari" in json.loads(r.stdout)["stages"]["transform"]


def test_package_surface():
    import qshift

    assert qshift.__version__ and "Pipeline" in qshift.__all__
    for name in qshift.__all__:
        assert getattr(qshift, name) is not None
    with pytest.raises(AttributeError):
        qshift.nothing_here  # noqa: B018
