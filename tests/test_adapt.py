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

TEXTS = [f"a {c} {s} {w}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "star", "ring")
         for w in ("on the left", "at the top")]


@pytest.fixture()
def clip(tiny_clip):
    yield tiny_clip
    for p in tiny_clip.model.parameters():  # leave the shared fixture as we found it
        p.requires_grad_(True)


def _gallery(enc, texts=TEXTS):
    return enc.encode_text(texts)


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
                                     ({"candidates": "all"}, "candidates"), ({"temperature": 0}, "temperature")])
def test_config_ranges(kw, msg):
    with pytest.raises(InputError, match=msg):
        AdaptConfig(**kw)


def test_bad_inputs(clip):
    g = _gallery(clip)
    a = create_adapter(clip, g, "t2i", "tent")
    with pytest.raises(InputError, match="size 0"):
        a.prepare([])
    with pytest.raises(InputError, match="no queries"):
        a.run([])
    a.close()
    bad = g.copy()
    bad[3, 0] = np.nan
    with pytest.raises(InputError, match=r"non-finite rows \[3\]"):
        create_adapter(clip, bad, "t2i", "tent")
    with pytest.raises(InputError, match="dim"):
        create_adapter(clip, g[:, :10], "t2i", "tent")
    with pytest.raises(StoreMismatchError, match="encoded by"):
        create_adapter(clip, g, "t2i", "tent", gallery_fingerprint="st:other#123")
    with pytest.raises(InputError, match="unknown adaptation method"):
        create_adapter(clip, g, "t2i", "tnet")
    with pytest.raises(InputError, match="unexpected keyword"):
        create_adapter(clip, g, "t2i", "tcr", ratio_typo=0.3)
    with pytest.raises(InputError, match="empty or whitespace"):
        create_adapter(clip, g, "t2i", "tent").run(["a", " "])


@pytest.mark.parametrize("method", list(OBJECTIVES))
@pytest.mark.parametrize("batch_size", [1, 8])
def test_every_method_runs_and_restores(clip, method, batch_size):
    g = _gallery(clip)
    before = clip.encode_text(TEXTS[:4])
    a = create_adapter(clip, g, "t2i", method, batch_size=batch_size, steps=2, lr=1e-3,
                       source_texts=TEXTS)
    scores = a.run(TEXTS[:16], np.random.default_rng(0).permutation(16))
    assert scores.shape == (16, len(TEXTS)) and np.isfinite(scores).all()
    a.close()
    assert np.allclose(clip.encode_text(TEXTS[:4]), before, atol=1e-6)  # the shared encoder is untouched


@pytest.mark.parametrize("method", ["tent", "rest", "deyo"])
def test_image_queries(clip, image_collection, method):
    from qshift.data.collection import load_collection

    coll = load_collection(image_collection)
    g = clip.encode_text(coll.texts())
    a = create_adapter(clip, g, "i2t", method, batch_size=6, steps=1)
    s = a.run(list(coll.image_paths))
    assert s.shape == (len(coll), len(g)) and np.isfinite(s).all()
    a.close()


class Exploding(Objective):
    name = "exploding"

    def loss(self, adapter, batch, pred, step):
        return pred.q.sum() * float("nan")


def test_divergence_resets_and_never_returns_nan(clip):
    from qshift.adapt.engine import Adapter

    g = _gallery(clip)
    a = Adapter(clip, g, "t2i", AdaptConfig(batch_size=8), Exploding())
    with pytest.warns(RuntimeWarning, match="diverged"):
        s = a.run(TEXTS[:16])
    assert np.isfinite(s).all() and a.stats["divergences"] == 2
    assert np.allclose(s, clip.encode_text(TEXTS[:16]) @ g.T, atol=1e-5)  # frozen model's scores
    a.close()


def test_episodic_mode_resets_each_batch(clip):
    g = _gallery(clip)
    a = create_adapter(clip, g, "t2i", "tent", episodic=True, batch_size=8, lr=1e-2)
    first = a.run(TEXTS[:8])
    again = a.run(TEXTS[:8])
    assert np.allclose(first, again, atol=1e-5)  # same start each batch → same result
    a.close()


@pytest.mark.parametrize("method", ["tent", "tcr", "rest", "eata"])
def test_updates_lower_the_objective(clip, method):
    """The engine really adapts: over the inner steps on one batch the method's own
    objective goes down (the selected parameters move the right way)."""
    g = _gallery(clip)
    a = create_adapter(clip, g, "t2i", method, batch_size=32, steps=6, lr=1e-2, reset_on_collapse=False,
                       source_texts=TEXTS)
    seen = []
    update = a.objective.update

    def record(adapter, batch, loss, step):
        seen.append(float(loss.detach()))
        update(adapter, batch, loss, step)

    a.objective.update = record
    before = [p.detach().clone() for p in a.params]
    a.adapt_batch(a.prepare(TEXTS[:32]))
    a.close()
    assert len(seen) == 6 and seen[-1] < seen[1], seen  # step 0 may fill TCR's queue first
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(before, a._initial)) is False  # close() restored


def test_tcr_queue_and_all_ood_detection(clip):
    g = _gallery(clip)
    a = create_adapter(clip, g, "t2i", "tcr", batch_size=8, steps=1, source_texts=TEXTS, fill_batches=2,
                       anchor_quantile=0.5)
    obj = a.objective
    assert obj.anchor_queue is not None and len(obj.anchor_queue) > 0 and obj.anchor_limit is not None
    a.run(TEXTS[:32])
    assert 0 < len(obj.queue) <= obj.queue_size
    n_after_fill = len(obj.queue)
    a.run(TEXTS[:16])
    assert len(obj.queue) == n_after_fill  # no updates after the first fill_batches
    a.close()
    # a stream the anchors call all out-of-distribution: nothing enters the queue
    b = create_adapter(clip, g, "t2i", "tcr", batch_size=8, steps=1, source_texts=TEXTS)
    b.objective.anchor_limit = -1e9
    noise = ["zq xv " * 5 + str(i) for i in range(16)]
    b.run(noise)
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
