import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from qshift.adapt import OBJECTIVES, AdaptConfig, create_adapter
from qshift.adapt.engine import Objective
from qshift.adapt.params import select_params
from qshift.adapt.rest import decouple
from qshift.errors import InputError, StoreMismatchError
from qshift.pipeline import Pipeline, PipelineContext

TEXTS = [f"a {c} {s} {w}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "star", "ring")
         for w in ("on the left", "at the top")]


@pytest.fixture()
def clip(tiny_clip):
    yield tiny_clip
    for p in tiny_clip.model.parameters():  # leave the shared fixture as we found it
        p.requires_grad_(True)
    tiny_clip.model.eval()


def _gallery(enc, texts=TEXTS):
    return enc.encode_text(texts)


def _pipeline(enc, gallery, method, direction="t2i", source_texts=None, **options):
    ctx = PipelineContext(enc, direction, gallery=gallery, source_texts=source_texts)
    return Pipeline.from_config([{"adapt": {"method": method, **options}}], ctx)


def _stream(adapter, queries, batch_size):
    """Adapt along ``queries`` in batches; the adapted embeddings."""
    return np.concatenate([adapter.adapt(queries[s:s + batch_size], index=b)
                           for b, s in enumerate(range(0, len(queries), batch_size))])


def test_select_params_modes(clip):
    norms = select_params(clip.text_tower, "norm")
    names = {n for n, p in clip.text_tower.named_parameters() if p.requires_grad}
    assert names and all("ln" in n for n in names) and len(norms) == len(names)
    last = select_params(clip.text_tower, "last-k", last_k=1)
    assert all(".1." in n for n, p in clip.text_tower.named_parameters() if p.requires_grad and "resblocks" in n)
    assert len(last) > len(norms) // 2
    before = clip.encode_text(TEXTS[:3])
    lora = select_params(clip.text_tower, "lora", lora_rank=2)
    assert len(lora) > 0 and all(p.requires_grad for p in lora)
    assert np.allclose(clip.encode_text(TEXTS[:3]), before, atol=1e-6)  # B = 0: no change yet
    from qshift.adapt.params import remove_lora

    remove_lora(clip.text_tower)
    with pytest.raises(InputError, match="unknown parameter selection"):
        select_params(clip.text_tower, "all")
    with pytest.raises(InputError, match="cannot be adapted"):
        select_params(None)
    with pytest.raises(InputError, match="no parameters"):
        select_params(torch.nn.Sequential(torch.nn.Linear(2, 2)), "norm")
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    bn = select_params(cnn, "norm")  # CNN towers (ModifiedResNet): BatchNorm affine parameters
    assert [tuple(p.shape) for p in bn] == [(4,), (4,)] and not cnn[0].weight.requires_grad


@pytest.mark.parametrize("kw, msg", [({"lr": 0}, "lr"), ({"lr": 2.0}, "lr"), ({"steps": 0}, "steps"),
                                     ({"steps": 1000}, "steps"), ({"batch_size": 0}, "batch_size"),
                                     ({"candidates": "all"}, "candidates"), ({"temperature": 0}, "temperature"),
                                     ({"rank_with": "before"}, "rank_with"), ({"frozen_gate": 1.5}, "frozen_gate"),
                                     ({"gate_confidence": "median"}, "gate_confidence"),
                                     ({"gate_samples": 0}, "gate_samples")])
def test_config_ranges(kw, msg):
    with pytest.raises(InputError, match=msg):
        AdaptConfig(**kw)


@pytest.mark.parametrize("kw, msg", [({"exclude_ratio": 0}, "exclude_ratio"), ({"exclude_ratio": 1.5}, "exclude_ratio"),
                                     ({"proxies": "batches"}, "proxies must be one of prototypes, items, batch"),
                                     ({"k_pos": 0}, "k_pos")])
def test_epcl_option_ranges(kw, msg):
    from qshift.adapt.epcl import EPCLConfig

    with pytest.raises(InputError, match=msg):
        EPCLConfig(**kw)


def test_bad_inputs(clip):
    g = _gallery(clip)
    a = create_adapter(clip, g, "t2i", "tent")
    with pytest.raises(InputError, match="size 0"):
        a.prepare([])
    a.close()
    with _pipeline(clip, g, "tent") as pipe, pytest.raises(InputError, match="no queries"):
        pipe.score([])
    bad = g.copy()
    bad[3, 0] = np.nan
    with pytest.raises(InputError, match=r"non-finite rows \[3\]"):
        create_adapter(clip, bad, "t2i", "tent")
    with pytest.raises(InputError, match="dim"):
        create_adapter(clip, g[:, :10], "t2i", "tent")
    with pytest.raises(StoreMismatchError, match="encoded by"):
        create_adapter(clip, g, "t2i", "tent", gallery_fingerprint="st:other#123")
    with pytest.raises(InputError, match="unknown adaptation method 'tnet' \\(did you mean 'tent'\\?\\)"):
        create_adapter(clip, g, "t2i", "tnet")
    with pytest.raises(InputError, match="unknown option 'ratio_typo' \\(did you mean 'ratio'\\?\\)"):
        create_adapter(clip, g, "t2i", "tcr", ratio_typo=0.3)
    with pytest.raises(InputError, match="unknown option 'lrr'"):
        _pipeline(clip, g, "rest", lrr=0.1)
    with _pipeline(clip, g, "tent") as pipe, pytest.raises(InputError, match="empty or whitespace"):
        pipe.score(["a", " "])


# the oracle needs labels, distill a fused guide: both run in their own tests
@pytest.mark.parametrize("method", [m for m in OBJECTIVES if m not in ("oracle", "distill")])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_every_method_runs_and_restores(clip, method, batch_size):
    g = _gallery(clip)
    before = clip.encode_text(TEXTS[:4])
    with _pipeline(clip, g, method, source_texts=TEXTS, batch_size=batch_size, steps=2, lr=1e-3) as pipe:
        assert pipe.batch_size == batch_size
        scores = pipe.score(TEXTS[:16], np.random.default_rng(0).permutation(16))
        assert pipe.stages[1].adapter.stats["batches"] == 16 // batch_size
    assert scores.shape == (16, len(TEXTS)) and np.isfinite(scores).all()
    assert np.allclose(clip.encode_text(TEXTS[:4]), before, atol=1e-6)  # the shared encoder is untouched


@pytest.mark.parametrize("params", ["norm", "lora", "last-k"])
def test_close_restores_values_flags_and_modes_exactly(clip, params):
    """close() gives the tower back as it was: values, requires_grad flags (here a mix
    the caller chose) and train/eval mode of every module."""
    tower = clip.text_tower
    for i, (n, p) in enumerate(tower.named_parameters()):
        p.requires_grad_(i % 3 == 0)
    tower.train()
    tower.transformer.eval()
    flags = {n: p.requires_grad for n, p in tower.named_parameters()}
    values = {n: p.detach().clone() for n, p in tower.named_parameters()}
    modes = {n: m.training for n, m in tower.named_modules()}
    with _pipeline(clip, _gallery(clip), "tent", params=params, lr=1e-2, steps=2, batch_size=8) as pipe:
        pipe.score(TEXTS[:16])
        moved = pipe.stages[1].adapter.params
        assert any(not torch.equal(p, p0) for p, p0 in zip(moved, pipe.stages[1].adapter._initial))
    assert {n: p.requires_grad for n, p in tower.named_parameters()} == flags
    assert all(torch.equal(p, values[n]) for n, p in tower.named_parameters())
    assert {n: m.training for n, m in tower.named_modules()} == modes


@pytest.mark.parametrize("method", ["tent", "rest", "deyo"])
def test_image_queries(clip, image_collection, method):
    from qshift.data.collection import load_collection

    coll = load_collection(image_collection)
    g = clip.encode_text(coll.texts())
    with _pipeline(clip, g, method, direction="i2t", batch_size=6, steps=1) as pipe:
        s = pipe.score(list(coll.image_paths))
    assert s.shape == (len(coll), len(g)) and np.isfinite(s).all()


class Exploding(Objective):
    name = "exploding"

    def loss(self, adapter, batch, pred, step):
        return pred.q.sum() * float("nan")


def test_divergence_resets_and_never_returns_nan(clip):
    from qshift.adapt.engine import Adapter

    g = _gallery(clip)
    a = Adapter(clip, g, "t2i", AdaptConfig(batch_size=8), Exploding())
    with pytest.warns(RuntimeWarning, match="diverged"):
        q = _stream(a, TEXTS[:16], 8)
    assert np.isfinite(q).all() and a.stats["divergences"] == 2
    assert np.allclose(q, clip.encode_text(TEXTS[:16]), atol=1e-5)  # the frozen model's embeddings
    a.close()


def test_episodic_mode_resets_each_batch(clip):
    g = _gallery(clip)
    with _pipeline(clip, g, "tent", episodic=True, batch_size=8, lr=1e-2) as pipe:
        first = pipe.score(TEXTS[:8])
        again = pipe.score(TEXTS[:8])
    assert np.allclose(first, again, atol=1e-5)  # same start each batch → same result
    with _pipeline(clip, g, "tent", batch_size=8, lr=1e-2) as pipe:  # continual: the second pass differs
        assert not np.allclose(pipe.score(TEXTS[:8]), pipe.score(TEXTS[:8]), atol=1e-5)


@pytest.mark.parametrize("steps", [1, 3])
def test_rank_with_picks_the_embeddings_that_rank(clip, steps):
    """``updated`` ranks with the tower after the batch's last update, ``last-step`` with
    the last step's own forward (before that update): Tent's and TCR's reference order."""
    g = _gallery(clip)
    out = {}
    for mode in ("updated", "last-step"):
        a = create_adapter(clip, g, "t2i", "tent", batch_size=16, steps=steps, lr=1e-2, rank_with=mode,
                           reset_on_collapse=False)
        seen = []
        update = a.objective.update

        def record(adapter, batch, loss, step, update=update, seen=seen):
            seen.append(adapter.embed(TEXTS[:16]))  # the tower right before this step's update
            update(adapter, batch, loss, step)

        a.objective.update = record
        q = a.adapt(TEXTS[:16])
        after = a.embed(TEXTS[:16])
        a.close()
        assert len(seen) == steps
        out[mode] = (q, seen[-1], after)
    q, _, after = out["updated"]
    assert np.allclose(q, after, atol=1e-5)
    q, before_last, after = out["last-step"]
    assert np.allclose(q, before_last, atol=1e-5) and not np.allclose(q, after, atol=1e-4)
    if steps == 1:  # one step: the batch is ranked by the frozen tower
        assert np.allclose(q, clip.encode_text(TEXTS[:16]), atol=1e-5)


@pytest.mark.parametrize("method", ["tent", "tcr", "rest", "eata"])
def test_updates_lower_the_objective(clip, method):
    """The engine really adapts: over the inner steps on one batch the method's own
    objective goes down (the selected parameters move the right way). TCR/REST fill
    their queue at step 0, so they are compared from step 1; EATA from step 0, because
    from step 1 on its redundancy filter (against the moving average set at step 0)
    drops most queries and what is left is mostly its Fisher penalty."""
    g = _gallery(clip)
    a = create_adapter(clip, g, "t2i", method, batch_size=32, steps=6, lr=1e-2, reset_on_collapse=False, temperature=0.02,
                       source_texts=TEXTS)
    seen = []
    update = a.objective.update

    def record(adapter, batch, loss, step):
        seen.append(float(loss.detach()))
        update(adapter, batch, loss, step)

    a.objective.update = record
    before = [p.detach().clone() for p in a.params]
    a.step(a.prepare(TEXTS[:32]))
    a.close()
    assert len(seen) == 6 and seen[-1] < seen[0 if method == "eata" else 1], seen
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(before, a._initial)) is False  # close() restored


def test_tcr_queue_and_all_ood_detection(clip):
    g = _gallery(clip)
    a = create_adapter(clip, g, "t2i", "tcr", batch_size=8, steps=1, source_texts=TEXTS, fill_batches=2,
                       anchor_quantile=0.5)
    obj = a.objective
    assert obj.anchor_queue is not None and len(obj.anchor_queue) > 0 and obj.anchor_limit is not None
    _stream(a, TEXTS[:32], 8)
    assert 0 < len(obj.queue) <= obj.queue_size
    n_after_fill = len(obj.queue)
    _stream(a, TEXTS[:16], 8)
    assert len(obj.queue) == n_after_fill  # no updates after the first fill_batches
    a.close()
    # a stream the anchors call all out-of-distribution: nothing enters the queue
    b = create_adapter(clip, g, "t2i", "tcr", batch_size=8, steps=1, source_texts=TEXTS)
    b.objective.anchor_limit = -1e9
    noise = ["zq xv " * 5 + str(i) for i in range(16)]
    _stream(b, noise, 8)
    assert len(b.objective.queue) == 0 and b.stats["ood_batches"] == 2
    assert b.objective.reference() is b.objective.anchor_queue
    b.close()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=6, max_size=6), st.lists(st.floats(-5, 5), min_size=6, max_size=6),
       st.floats(0, 2))
def test_gradient_decoupling_removes_the_conflict(a, b, w):
    g_shift = [torch.tensor(a[:3]), torch.tensor(a[3:])]
    g_src = [torch.tensor(b[:3]), torch.tensor(b[3:])]
    out, conflict = decouple(g_shift, g_src, source_weight=0.0)
    dot_in = sum(float((x * y).sum()) for x, y in zip(g_shift, g_src))
    dot_out = sum(float((x * y).sum()) for x, y in zip(out, g_src))
    norm = sum(float((y * y).sum()) for y in g_src)
    assert conflict == (dot_in < 0 and norm > 0)
    assert dot_out >= -1e-4 * max(1.0, norm)  # nothing left that fights the source gradient
    if not conflict:
        assert all(torch.allclose(x, y) for x, y in zip(out, g_shift))
    out_w, _ = decouple(g_shift, g_src, source_weight=w)
    assert all(torch.allclose(x, y + w * z, atol=1e-5) for x, y, z in zip(out_w, out, g_src))


def test_adapt_methods_in_the_benchmark_runner(tmp_path):
    from qshift.benchmark import BenchConfig, run_benchmark
    from qshift.paths import ASSETS
    from qshift.store import EmbeddingStore

    cfg = BenchConfig(name="tta", encoder="openclip:qshift-tiny-vit",
                      collection=str(ASSETS / "coco-dev-200" / "captions.txt"), direction="t2t",
                      shifts=["clean", "ocr"], severities=[5], max_queries=64,
                      methods=["zero-shot", {"name": "tcr", "steps": 1}, {"name": "rest", "steps": 1,
                                                                           "label": "rest-1step"}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run_benchmark(cfg, tmp_path / "res", EmbeddingStore(tmp_path / "st"), progress=False)
    import pandas as pd

    df = pd.read_csv(out / "results.csv")
    assert set(df["method"]) == {"zero-shot", "tcr", "rest-1step"} and len(df) == 6


def test_temperature_defaults_to_twice_the_encoders(clip):
    g = _gallery(clip)
    a = create_adapter(clip, g, "t2i", "tent")
    assert a.cfg.temperature == pytest.approx(2 * clip.temperature()) and a.stats["temperature"] == a.cfg.temperature
    a.close()
    b = create_adapter(clip, g, "t2i", "tent", temperature=0.03)
    assert b.cfg.temperature == 0.03
    b.close()


@pytest.mark.parametrize("mode", ["batch", "blend"])
def test_batchnorm_statistics_modes_and_restore(mode):
    """BN towers: test-batch statistics (Tent) or a blend with the running ones; the
    running buffers come back untouched on close()."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from helpers import FeatureEncoder

    class BNEncoder(FeatureEncoder):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.BatchNorm1d(8))
            self.net.eval()
            with torch.no_grad():
                self.net[1].running_mean.fill_(5.0)  # far from the test batches' statistics

    enc = BNEncoder()
    g = np.eye(8, dtype=np.float32)
    before = enc.encode_text([str(i) for i in range(8)])
    mean0 = enc.net[1].running_mean.clone()
    a = create_adapter(enc, g, "t2i", "tent", norm_stats=mode, norm_prior=16.0, batch_size=16, lr=1e-9)
    adapted = a.adapt([str(i) for i in range(16)])[:8]
    with torch.no_grad():
        x = enc.feats[:16] @ enc.net[0].weight.T + enc.net[0].bias
    w = {"batch": 0.0, "blend": 16 / 32}[mode]
    mu = w * mean0 + (1 - w) * x.mean(0)
    var = w * torch.ones(8) + (1 - w) * x.var(0, unbiased=False)
    bn = enc.net[1]
    want = torch.nn.functional.normalize(((x - mu) / torch.sqrt(var + bn.eps)) * bn.weight + bn.bias, dim=-1)[:8]
    assert np.allclose(adapted, want.detach().numpy(), atol=1e-4)
    assert not np.allclose(adapted, before, atol=1e-3)
    a.close()
    assert torch.equal(enc.net[1].running_mean, mean0) and enc.net[1].track_running_stats
    assert np.allclose(enc.encode_text([str(i) for i in range(8)]), before, atol=1e-6)
    with pytest.raises(InputError, match="norm_stats must be one of"):
        AdaptConfig(norm_stats="mean")


def test_method_defaults_sit_under_the_configs_options(clip, monkeypatch):
    from qshift.adapt.tent import Tent

    monkeypatch.setattr(Tent, "defaults", {"lr": 1e-3, "temperature": 0.07})
    a = create_adapter(clip, _gallery(clip), "t2i", "tent", lr=5e-4)
    assert (a.cfg.lr, a.cfg.temperature) == (5e-4, 0.07)
    a.close()


def test_the_oracle_runs_only_with_labels(clip):
    with pytest.raises(InputError, match="only a benchmark row marked `labels: true` gives them"):
        _pipeline(clip, _gallery(clip), "oracle")


@pytest.mark.parametrize("kind", ["margin", "top1", "entropy"])
def test_frozen_gate_keeps_confident_queries_frozen(clip, kind):
    """Rows whose frozen confidence reaches the source quantile rank with the frozen
    embedding exactly; the others with the adapted one, as without the gate (the gate
    changes what is ranked, not what is learnt)."""
    g = _gallery(clip)
    queries, source = TEXTS[:32], [t.upper() for t in TEXTS[:16]] + [t[::-1] for t in TEXTS[16:]]
    opts = dict(batch_size=32, steps=3, lr=3e-2, reset_on_collapse=False, source_texts=source, gate_confidence=kind)
    plain = create_adapter(clip, g, "t2i", "tent", **opts)
    q_plain = plain.adapt(queries)
    plain.close()
    gated = create_adapter(clip, g, "t2i", "tent", frozen_gate=0.5, **opts)
    frozen = gated.embed(queries)
    conf = gated.gate_confidence(torch.from_numpy(frozen)).numpy()
    keep = conf >= gated.gate_limit
    q_gated = gated.adapt(queries)
    assert gated.stats["kept_frozen"] == keep.sum()
    gated.close()
    assert 0 < keep.sum() < len(queries), (conf, gated.gate_limit)
    assert not np.allclose(q_plain[keep], frozen[keep], atol=1e-4)  # adaptation moved them …
    assert np.allclose(q_gated[keep], frozen[keep], atol=1e-6)       # … the gate gives the frozen ones back
    assert np.allclose(q_gated[~keep], q_plain[~keep], atol=1e-5)


@pytest.mark.parametrize("kind", ["margin", "top1", "entropy"])
def test_frozen_gate_and_fusion_measure_confidence_alike(clip, kind):
    """One measure of retrieval confidence: the gate's is the fusion stage's at the
    encoder's trained temperature (qshift.confidence)."""
    from qshift.refine import confidence

    g = _gallery(clip)
    ad = create_adapter(clip, g, "t2i", "tent", gate_confidence=kind)
    e = ad.embed(TEXTS)
    trained = ad.cfg.temperature / ad.cfg.temperature_scale
    assert np.allclose(ad.gate_confidence(torch.from_numpy(e)).numpy(), confidence(e, g, kind, trained), atol=1e-6)
    ad.close()


def test_frozen_gate_quantile_and_source(clip):
    g = _gallery(clip)
    lo = create_adapter(clip, g, "t2i", "tent", frozen_gate=0.0, source_texts=TEXTS)
    hi = create_adapter(clip, g, "t2i", "tent", frozen_gate=1.0, source_texts=TEXTS)
    conf = lo.gate_confidence(torch.from_numpy(lo.embed(TEXTS))).numpy()
    assert lo.gate_limit == pytest.approx(conf.min(), abs=1e-6) and hi.gate_limit == pytest.approx(conf.max(), abs=1e-6)
    lo.close()
    hi.close()
    with pytest.raises(InputError, match="frozen_gate needs source texts"):
        create_adapter(clip, g, "t2i", "tent", frozen_gate=0.5)
    with pytest.raises(InputError, match="needs text queries; direction 'i2t'"):
        create_adapter(clip, g, "i2t", "tent", frozen_gate=0.5, source_texts=TEXTS)
    off = create_adapter(clip, g, "t2i", "tent")
    assert off.gate_limit is None
    off.close()
