"""Continual domains: adapters stay put when a domain is added, routing properties,
merging (one-hot exact, TIES against PEFT), the protocol end to end on a tiny world, and
bad input."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from qshift.errors import InputError, StoreMismatchError

warnings.filterwarnings("ignore", message=".*has no checkpoint.*")


@pytest.mark.parametrize("kind", ["bottleneck", "norm"])
def test_adding_a_domain_leaves_earlier_adapters_bit_identical(tiny_clip, kind):
    from qshift.continual.methods import DAR, Domain, TrainSettings

    torch.manual_seed(0)
    tower = tiny_clip.tower("image")
    start = {k: v.clone() for k, v in tower.state_dict().items()}
    flags, modes = [p.requires_grad for p in tower.parameters()], [m.training for m in tower.modules()]
    pix = tiny_clip.prepare([np.full((32, 32, 3), c, np.uint8) for c in range(0, 250, 10)], "image")
    caps = torch.nn.functional.normalize(torch.randn(len(pix), tiny_clip.dim), dim=-1)
    dar = DAR(tiny_clip, TrainSettings(epochs=2, batch_size=8, adapter_lr=1e-2, adapter=kind))
    try:
        base = dar.embed(pix[:6])
        dar.bank.add_domain("fresh")                    # a new adapter starts as the identity
        dar.bank.active = "fresh"
        assert np.allclose(dar.image_features(pix[:6]).detach().numpy(), base, atol=1e-5)
        dar.bank.active = None
        del dar.bank.domains["fresh"]
        dar.learn(Domain("a", pix, caps, np.arange(len(pix))))
        before = {k: v.clone() for k, v in dar.bank.domains["a"].state_dict().items()}
        frozen = {k: v.clone() for k, v in dar.tower.state_dict().items()}
        dar.learn(Domain("b", pix.flip(0), caps, np.arange(len(pix))))
        after = dar.bank.domains["a"].state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert any(not torch.equal(v, dar.init_state[k]) for k, v in dar.bank.domains["b"].state_dict().items())
        assert all(torch.equal(v, frozen[k]) for k, v in dar.tower.state_dict().items())  # the base stays frozen
        emb = dar.embed(pix[:4])
        assert emb.shape == (4, tiny_clip.dim) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
        # per-sample mixing: one-hot weights are that adapter, all-zero weights the base model,
        # and a 50/50 mix differs from both
        with torch.no_grad():
            feats = {}
            for name in ("a", "b"):
                dar.bank.active = name
                feats[name] = dar.image_features(pix[:4]).numpy()
            dar.bank.active = None
            for w, ref in (([1.0, 0.0], feats["a"]), ([0.0, 1.0], feats["b"]), ([0.0, 0.0], base[:4])):
                dar.bank.weights = torch.tensor([w] * 4)
                assert np.allclose(dar.image_features(pix[:4]).numpy(), ref, atol=1e-5), w
            dar.bank.weights = torch.tensor([[0.5, 0.5]] * 4)
            mix = dar.image_features(pix[:4]).numpy()
            dar.bank.weights = None
        assert not np.allclose(mix, feats["a"], atol=1e-4) and not np.allclose(mix, feats["b"], atol=1e-4)
        with pytest.raises(InputError, match="exists already"):
            dar.bank.add_domain("a")
    finally:
        dar.close()
    # close() gives the shared encoder back exactly: no hooks, weights, requires_grad, modes
    assert all(torch.equal(v, start[k]) for k, v in tower.state_dict().items()) and tower.state_dict().keys() == \
        start.keys()
    assert [p.requires_grad for p in tower.parameters()] == flags and [m.training for m in tower.modules()] == modes
    assert all(not m._forward_hooks for m in tower.modules())


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 5), st.floats(0.001, 1.0), st.integers(0, 1000))
def test_router_weights(n_domains, temperature, seed):
    from qshift.continual.router import PrototypeRouter

    rng = np.random.default_rng(seed)
    r = PrototypeRouter("enc#0", "soft", top_k=2, temperature=temperature)
    for d in range(n_domains):
        r.add(f"d{d}", rng.standard_normal((20, 6)) + 3 * np.eye(6)[d])
    x = rng.standard_normal((7, 6))
    w = r.weights(x)
    assert np.allclose(w.sum(1), 1) and ((w > 0).sum(1) <= 2).all() and (w >= 0).all()
    cold = PrototypeRouter("enc#0", "soft", top_k=2, temperature=1e-6)
    cold.domains, cold.prototypes, cold.thresholds = r.domains, r.prototypes, r.thresholds
    hard = PrototypeRouter("enc#0", "hard")
    hard.domains, hard.prototypes, hard.thresholds = r.domains, r.prototypes, r.thresholds
    assert np.allclose(cold.weights(x), hard.weights(x), atol=1e-6)  # T → 0 gives the argmax
    assert (hard.weights(x).argmax(1) == r.scores(x).argmax(1)).all()


def test_router_ood_quantile_sends_far_inputs_to_the_base_model():
    from qshift.continual.router import PrototypeRouter

    rng = np.random.default_rng(0)
    train = {d: rng.standard_normal((400, 8)) * 0.3 + 4 * np.eye(8)[d] for d in range(2)}
    r = PrototypeRouter("enc#0", "soft", top_k=2, temperature=0.05, ood_quantile=0.1)
    for d, x in train.items():
        r.add(f"d{d}", x)
    kept = (r.weights(train[0]).sum(1) > 0).mean()
    assert 0.85 <= kept <= 0.95                                   # ≈ 1 − q of a domain's own inputs routed
    far = rng.standard_normal((50, 8)) * 0.3 + 4 * np.eye(8)[5]   # a domain never learnt
    assert (r.weights(far) == 0).all()
    w = r.weights(train[1])
    assert np.allclose(w[w.sum(1) > 0].sum(1), 1) and (w[:, 0] <= 1e-6).all()  # never to the far domain
    again = PrototypeRouter.from_state(r.state_dict(), "enc#0")
    assert np.array_equal(again.weights(far), r.weights(far)) and again.thresholds == r.thresholds
    off = PrototypeRouter("enc#0", "soft", top_k=2, temperature=0.05)
    for d, x in train.items():
        off.add(f"d{d}", x)
    assert (off.weights(far).sum(1) > 0.99).all()                 # without it, everything is routed
    with pytest.raises(InputError, match="ood_quantile"):
        PrototypeRouter("enc#0", ood_quantile=1.0)


def test_router_base_candidate_keeps_what_looks_like_the_source_on_the_base_model():
    """add_base: inputs nearer the base model's own source distribution than to any domain
    get no adapter weight (hard and soft), a domain's inputs keep theirs, the soft weights
    of an input between the two split the mass (rest to the base), and the base prototype
    survives a state round trip; without it the same inputs are adapted."""
    from qshift.continual.router import PrototypeRouter

    rng = np.random.default_rng(0)
    blob = lambda n, c, sd=0.3: rng.standard_normal((n, 6)) * sd + c  # noqa: E731
    centres = {"fog": 4 * np.eye(6)[0], "noise": 4 * np.eye(6)[1], "source": 2.2 * np.eye(6)[0]}
    for mode in ("hard", "soft"):
        r = PrototypeRouter("enc#0", mode, top_k=2, temperature=0.2, kind="gaussian", ood_quantile=0.02)
        off = PrototypeRouter("enc#0", mode, top_k=2, temperature=0.2, kind="gaussian", ood_quantile=0.02)
        for router in (r, off):
            for d in ("fog", "noise"):
                router.add(d, blob(300, centres[d], 0.8))
        r.add_base(blob(300, centres["source"], 0.3))
        near_source = blob(100, centres["source"], 0.3)
        assert (off.weights(near_source).sum(1) > 0.99).mean() > 0.9          # inside fog's broad tail: adapted
        assert r.weights(near_source).sum(1).mean() < 0.1                     # with the base candidate: not
        fog = r.weights(blob(100, centres["fog"], 0.8))
        assert fog[:, 0].mean() > 0.85 and (fog[:, 1] < 1e-3).all()          # a domain's own inputs keep theirs
        assert r.weights(near_source).shape == (100, 2) and (r.weights(near_source) >= 0).all()
        again = PrototypeRouter.from_state(r.state_dict(), "enc#0")
        assert np.array_equal(again.base, r.base) and np.array_equal(again.weights(near_source),
                                                                      r.weights(near_source))
    soft = PrototypeRouter("enc#0", "soft", top_k=2, temperature=10.0, kind="gaussian")
    soft.add("fog", blob(300, centres["fog"], 0.8))
    soft.add_base(blob(300, centres["source"], 0.8))
    mid = soft.weights(blob(50, 3.1 * np.eye(6)[0], 0.1)).sum(1)
    assert ((mid > 0.05) & (mid < 0.95)).all()                                # the mass is shared
    with pytest.raises(InputError, match="base model has prototypes already"):
        r.add_base(blob(10, centres["source"]))
    with pytest.raises(InputError, match="no domain has prototypes yet"):
        fresh = PrototypeRouter("enc#0", kind="gaussian")
        fresh.add_base(blob(10, centres["source"]))
        fresh.weights(blob(2, centres["source"]))


def test_router_fallback_and_bad_input():
    from qshift.continual.router import PrototypeRouter

    r = PrototypeRouter("enc#0", threshold=0.9)
    with pytest.raises(InputError, match="no domain has prototypes yet"):
        r.weights(np.ones((1, 4)))
    r.add("a", np.eye(4)[:1].repeat(5, 0))
    assert r.weights(np.eye(4)[1:2]).sum() == 0  # far from every prototype: the base model
    assert r.weights(np.eye(4)[:1]).sum() == 1
    with pytest.raises(InputError, match="has no data"):
        r.add("b", np.zeros((0, 4)))
    with pytest.raises(InputError, match="has prototypes already"):
        r.add("a", np.eye(4))
    with pytest.raises(StoreMismatchError, match="prototypes of encoder enc#0"):
        PrototypeRouter.from_state(r.state_dict(), "enc#other")
    again = PrototypeRouter.from_state(r.state_dict(), "enc#0")
    assert np.array_equal(again.weights(np.eye(4)), r.weights(np.eye(4)))


def test_full_covariance_router_rejects_what_breaks_a_domains_correlations():
    """Features that move together in a domain (as gradient, Laplacian and blur residual
    do): an input whose every feature is marginally typical but whose combination is not
    passes the diagonal Gaussian's in-domain quantile and fails the full one's; inputs of
    the domain pass both; the scores are the exact Gaussian log-density per feature; the
    state round-trips; too few inputs for a full covariance is a clear error."""
    from qshift.continual.router import PrototypeRouter

    rng = np.random.default_rng(0)
    mix = np.array([[1.0, 0.9, 0.8], [0.0, 0.4, 0.3], [0.0, 0.0, 0.5]])
    dom = lambda n: rng.standard_normal((n, 3)) @ mix  # noqa: E731  correlated features
    broken = rng.standard_normal((200, 3)) * dom(2000).std(0)  # same marginals, no correlation
    diag = PrototypeRouter("enc#0", "hard", kind="gaussian", ood_quantile=0.05)
    full = PrototypeRouter("enc#0", "hard", kind="gaussian", covariance="full", ood_quantile=0.05)
    train = dom(2000)
    for r in (diag, full):
        r.add("d", train)
    assert full.prototypes[0].shape == (4, 3)
    kept = lambda r, x: float((r.weights(x).sum(1) > 0).mean())  # noqa: E731
    assert kept(diag, dom(500)) > 0.9 and kept(full, dom(500)) > 0.9
    assert kept(diag, broken) > 0.85 and kept(full, broken) < 0.6
    x = dom(5)
    cov = np.cov(train, rowvar=False)
    cov += 1e-6 * (1 + np.trace(cov) / 3) * np.eye(3)
    dev = x - train.mean(0)
    want = -0.5 * (np.einsum("ij,jk,ik->i", dev, np.linalg.inv(cov), dev) + np.linalg.slogdet(cov)[1]) / 3
    assert np.allclose(full.scores(x)[:, 0], want, rtol=1e-4, atol=1e-4)
    again = PrototypeRouter.from_state(full.state_dict(), "enc#0")
    assert again.covariance == "full" and np.array_equal(again.weights(broken), full.weights(broken))
    with pytest.raises(InputError, match="has 3 inputs; a full covariance of 3 features"):
        PrototypeRouter("enc#0", kind="gaussian", covariance="full").add("few", dom(3))


def test_gaussian_router_on_pixel_statistics_tells_corruption_kinds_apart():
    """Domains that differ in low-level statistics (brightness, contrast, noise) but not in
    content: the Gaussian router over pixel statistics routes each to its own domain, a
    domain never learnt (here: blur) to the base model with ood_quantile, and its state
    round-trips."""
    import torch

    from qshift.continual.router import PrototypeRouter, pixel_statistics

    gen = torch.Generator().manual_seed(0)
    content = lambda n: torch.rand(n, 3, 32, 32, generator=gen).round() * 2 - 1  # noqa: E731  shared kind of content
    domains = {"fog": lambda x: 0.3 * x + 0.6, "contrast": lambda x: 0.2 * x,
               "noise": lambda x: x + 0.5 * torch.randn(x.shape, generator=gen)}
    r = PrototypeRouter("enc#0", "soft", top_k=2, temperature=1.0, kind="gaussian", ood_quantile=0.02)
    for name, f in domains.items():
        r.add(name, pixel_statistics(f(content(200))))
    for i, f in enumerate(domains.values()):
        w = r.weights(pixel_statistics(f(content(100))))
        assert (w.argmax(1) == i).mean() > 0.95 and np.allclose(w.sum(1)[w.sum(1) > 0], 1)
    blur = torch.nn.functional.avg_pool2d(content(100), 5, stride=1, padding=2) * 0.05 - 0.8
    assert (r.weights(pixel_statistics(blur)).sum(1) == 0).mean() > 0.95      # unlike every domain: the base model
    again = PrototypeRouter.from_state(r.state_dict(), "enc#0")
    x = pixel_statistics(content(10))
    assert again.kind == "gaussian" and np.array_equal(again.weights(x), r.weights(x))
    rng = np.random.default_rng(0)  # same mean, different spread: only the Gaussian tells them apart
    tight, wide = (lambda n: 1 + 0.1 * rng.standard_normal((n, 6))), (lambda n: 1 + 2.0 * rng.standard_normal((n, 6)))
    g, c = PrototypeRouter("enc#0", "hard", kind="gaussian"), PrototypeRouter("enc#0", "hard")
    for router in (g, c):
        router.add("tight", tight(300))
        router.add("wide", wide(300))
    assert (g.weights(tight(100)).argmax(1) == 0).mean() > 0.95 and (g.weights(wide(100)).argmax(1) == 1).mean() > 0.95
    assert (c.weights(wide(100)).argmax(1) == 1).mean() < 0.8
    with pytest.raises(InputError, match="kind must be cosine or gaussian"):
        PrototypeRouter("enc#0", kind="mahalanobis")
    with pytest.raises(InputError, match="covariance must be diag or full"):
        PrototypeRouter("enc#0", kind="gaussian", covariance="tied")
    with pytest.raises(InputError, match="needs kind='gaussian'"):
        PrototypeRouter("enc#0", covariance="full")
    with pytest.raises(InputError, match="one mean per domain"):
        PrototypeRouter("enc#0", kind="gaussian", per_domain=4)
    with pytest.raises(InputError, match="non-finite features"):
        r.add("nan", np.full((3, 13), np.nan))


def test_merging():
    from peft.utils.merge_utils import ties as peft_ties

    from qshift.continual.merge import merge, ties

    g = torch.Generator().manual_seed(0)
    init = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g)}
    trained = [{k: v + torch.randn(v.shape, generator=g) for k, v in init.items()} for _ in range(3)]
    for method, density in (("average", 0.2), ("task_arithmetic", 0.2), ("ties", 1.0)):
        one = merge(init, trained, method, weights=[0, 1, 0], density=density)
        assert all(torch.allclose(one[k], trained[1][k], atol=1e-6) for k in init), method  # one-hot: that adapter
    taus = [torch.randn(50, generator=g) for _ in range(3)]
    w = [0.5, 1.0, 0.3]
    for density in (0.2, 0.5, 1.0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = peft_ties([t.clone() for t in taus], torch.tensor(w), density)
        assert torch.allclose(ties(taus, w, density), want, atol=1e-6), density
    with pytest.raises(InputError, match="method must be one of"):
        merge(init, trained, "fisher")


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from qshift.world.generate import WorldConfig, generate_world

    root = tmp_path_factory.mktemp("cw")
    generate_world(root / "cache" / "world", WorldConfig(n_train=60, n_val=0, n_test=20),
                   splits=["train", "test"])
    return root


def test_the_protocol_end_to_end_and_resumes(tiny_world, tmp_path, monkeypatch):
    from qshift.continual.protocol import ContinualConfig, run_continual
    from qshift.continual.report import write_markdown
    from qshift.store import EmbeddingStore

    monkeypatch.setenv("QSHIFT_CACHE", str(tiny_world / "cache"))
    cfg = ContinualConfig(name="t", encoder="world:mini-clip", domains=["flat", "photo"], ood=["pixel"],
                          orders=[0, 1], methods=["zero-shot", "seq-ft", "ewc", "lwf", "replay", "zscl", "joint",
                                                   "dar", "dar-merge",
                                                   {"method": "dar", "label": "dar-norm",
                                                    "settings": {"adapter": "norm", "ood_quantile": 0.1}},
                                                   {"method": "dar", "label": "dar-base",
                                                    "settings": {"adapter": "norm", "route_features": "pixels",
                                                                 "route_base": True}}],
                          settings={"epochs": 1, "batch_size": 8, "buffer": 4}, source="world:train")
    out = run_continual(cfg, tmp_path / "res", EmbeddingStore(tmp_path / "st"), progress=False)
    s = json.loads((out / "results.json").read_text())
    r = s["results"]["dar"]["0"]
    assert np.array(r["matrix"]).shape == (2, 2) and {"average_r1", "bwt", "forgetting", "fwt", "ood_r1"} <= set(r)
    assert s["results"]["dar"]["1"]["order"] == ["photo", "flat"]  # order 1: a seeded permutation
    zs = np.array(s["results"]["zero-shot"]["0"]["matrix"])
    assert np.allclose(zs[0], zs[1]) and s["mean_over_orders"]["zero-shot"]["bwt"] == 0  # nothing learnt or lost
    assert (out / "matrix.png").stat().st_size > 5000
    assert "| dar |" in write_markdown(out).read_text()
    norm = json.loads((out / "order0" / "dar-norm" / "step0.json").read_text())
    assert norm["method"] == "dar-norm" and norm["key"] != json.loads((out / "order0" / "dar" / "step0.json")
                                                                       .read_text())["key"]
    assert norm["train"]["adapter_parameters"] < r["adapter_parameters"]  # γ, β only
    saved = torch.load(out / "order0" / "dar-base" / "state.pt", weights_only=False)["learner"]["extra"]["router"]
    assert saved["base"] is not None and saved["base"].shape == (2, 13)    # the source's prototype, saved
    stamp = (out / "order0" / "dar" / "step1.json").stat().st_mtime_ns
    run_continual(cfg, tmp_path / "res", EmbeddingStore(tmp_path / "st"), progress=False)  # resumes: no rerun
    assert (out / "order0" / "dar" / "step1.json").stat().st_mtime_ns == stamp
    import dataclasses                                  # another list of orders reuses the finished ones

    run_continual(dataclasses.replace(cfg, orders=[0]), tmp_path / "res", EmbeddingStore(tmp_path / "st"),
                  progress=False)
    assert (out / "order0" / "dar" / "step1.json").stat().st_mtime_ns == stamp
    # another source reruns only the methods that read it
    base_stamp = (out / "order0" / "dar-base" / "step1.json").stat().st_mtime_ns
    run_continual(dataclasses.replace(cfg, orders=[0], source="world:test"), tmp_path / "res",
                  EmbeddingStore(tmp_path / "st"), progress=False)
    assert (out / "order0" / "dar" / "step1.json").stat().st_mtime_ns == stamp
    assert (out / "order0" / "dar-base" / "step1.json").stat().st_mtime_ns != base_stamp


def test_bad_configs(tmp_path):
    from qshift.continual.protocol import ContinualConfig

    with pytest.raises(InputError, match="duplicate domain names"):
        ContinualConfig(name="x", domains=["flat", "flat"])
    with pytest.raises(InputError, match="a domain is a world style"):
        ContinualConfig(name="x", domains=[{"name": "a"}])
    with pytest.raises(InputError, match="gallery must be reencode or first"):
        ContinualConfig(name="x", gallery="later")
    # labelled method entries: each with its own settings, labels unique, settings checked
    ok = ContinualConfig(name="x", methods=["dar", {"method": "dar", "label": "dar-norm",
                                                    "settings": {"adapter": "norm"}}])
    assert [ok.method_entry(m) for m in ok.methods] == [("dar", "dar", {}), ("dar-norm", "dar", {"adapter": "norm"})]
    with pytest.raises(InputError, match="duplicate method labels"):
        ContinualConfig(name="x", methods=["dar", {"method": "dar"}])
    with pytest.raises(InputError, match="a method is a name or"):
        ContinualConfig(name="x", methods=[{"label": "dar-x"}])
    with pytest.raises(InputError, match="unknown keys \\['adaptr'\\]"):
        ContinualConfig(name="x", methods=[{"method": "dar", "settings": {"adaptr": "norm"}}])
    with pytest.raises(InputError, match="adapter must be bottleneck or norm"):
        ContinualConfig(name="x", settings={"adapter": "lora"})
    with pytest.raises(InputError, match="held_out must be in \\[0, 1\\)"):
        ContinualConfig(name="x", methods=[{"method": "dar", "settings": {"held_out": 1.0}}])
    with pytest.raises(InputError, match="ood_quantile must be in"):
        ContinualConfig(name="x", settings={"ood_quantile": -0.1})
    with pytest.raises(InputError, match="'dar-b' has route_base, which needs `source`"):
        ContinualConfig(name="x", methods=[{"method": "dar", "label": "dar-b", "settings": {"route_base": True}}])
    with pytest.raises(InputError, match="'dar' has source_distill, which needs `source`"):
        ContinualConfig(name="x", methods=["dar"], settings={"source_distill": 1.0})
    with pytest.raises(InputError, match="source_distill must be >= 0"):
        ContinualConfig(name="x", methods=["dar"], settings={"source_distill": -1.0}, source="world:train")
    assert ContinualConfig(name="x", methods=["dar"], settings={"route_base": True}, source="world:train").source

    f = tmp_path / "c.yaml"
    f.write_text("name: x\ndomians: [flat]\n")
    with pytest.raises(InputError, match="unknown keys"):
        ContinualConfig.load(f)
    from qshift.continual.methods import create_learner

    with pytest.raises(InputError, match="unknown continual method 'darr'"):
        create_learner("darr", None, None, 1)


def test_a_source_without_images_is_refused(tmp_path):
    from qshift.continual.protocol import ContinualConfig, DomainSet

    (tmp_path / "captions.txt").write_text("a red circle\n" * 5)
    cfg = ContinualConfig(name="x", methods=["dar"], settings={"route_base": True},
                          source=str(tmp_path / "captions.txt"))
    with pytest.raises(InputError, match="captions.txt' has no images"):
        DomainSet(cfg, None, None).source()


def _same(a, b) -> bool:  # noqa: ANN001
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_an_interrupted_run_resumes_after_its_last_step(tiny_world, tmp_path, monkeypatch):
    from qshift.continual import methods as cm
    from qshift.encoders import create_encoder
    from qshift.continual.protocol import ContinualConfig, run_continual
    from qshift.store import EmbeddingStore

    monkeypatch.setenv("QSHIFT_CACHE", str(tiny_world / "cache"))
    cfg = ContinualConfig(name="r", encoder="world:mini-clip", domains=["flat", "photo", "sketch"], ood=[],
                          methods=["ewc", "lwf", "zscl", "replay", "dar", "dar-merge"],
                          settings={"epochs": 1, "batch_size": 8, "buffer": 4})
    store = EmbeddingStore(tmp_path / "st")
    whole = run_continual(cfg, tmp_path / "whole", store, progress=False)
    fit = cm.Learner.fit
    died: list[str] = []

    def dies_once_at_step_2(self, d, params, lr):  # noqa: ANN001, ANN202
        if len(self.seen) == 2 and self.spec_name not in died:
            died.append(self.spec_name)
            raise RuntimeError("killed")
        return fit(self, d, params, lr)

    monkeypatch.setattr(cm.Learner, "fit", dies_once_at_step_2)
    stamps = {}
    for _ in cfg.methods:  # each run resumes the methods cut so far and cuts the next one
        with pytest.raises(RuntimeError, match="killed"):
            run_continual(cfg, tmp_path / "cut", store, progress=False)
        m = died[-1]
        cut = tmp_path / "cut" / "order0" / m
        assert sorted(p.name for p in cut.glob("step*.json")) == ["step0.json", "step1.json"]
        stamps[m] = (cut / "step1.json").stat().st_mtime_ns
    assert died == cfg.methods
    run_continual(cfg, tmp_path / "cut", store, progress=False)
    for m, stamp in stamps.items():  # resumed after step 1, not re-run
        assert (tmp_path / "cut" / "order0" / m / "step1.json").stat().st_mtime_ns == stamp, m
    for m in cfg.methods:
        a = json.loads((whole / "order0" / m / "step2.json").read_text())["eval"]
        b = json.loads((tmp_path / "cut" / "order0" / m / "step2.json").read_text())["eval"]
        assert a == b, m
        sa, sb = (torch.load(d / "order0" / m / "state.pt", weights_only=False)["learner"]
                  for d in (whole, tmp_path / "cut"))
        assert _same(sa["tower"], sb["tower"]) and _same(sa["extra"], sb["extra"]), m  # weights, adapters, buffers
        assert sa["seen"] == sb["seen"] == ["flat", "photo", "sketch"]
    state = torch.load(whole / "order0" / "dar" / "state.pt", weights_only=False)
    learner = cm.create_learner("dar", create_encoder("world:mini-clip"), cm.TrainSettings(), 3)
    with pytest.raises(StoreMismatchError, match="state of encoder other#0"):
        learner.load_state_dict({**state["learner"], "fingerprint": "other#0"}, {})
    # the saved state serves the query pipeline as an encoder: the same recall as the protocol measured
    from qshift.continual.protocol import DomainSet, _collection, recall

    dar = create_encoder(f"dar:{whole / 'order0' / 'dar' / 'state.pt'}")
    assert dar.fingerprint() != create_encoder("world:mini-clip").fingerprint()
    test = DomainSet(cfg, dar.base, store).testing("sketch")
    images = dar.encode_images(list(_collection("sketch", "test").subset(cfg.max_test_images).image_paths))
    want = json.loads((whole / "order0" / "dar" / "step2.json").read_text())["eval"]["sketch"]
    assert recall(images, test)["R@1"] == pytest.approx(want["R@1"], abs=1e-9)
    from qshift.errors import EncoderSpecError

    with pytest.raises(EncoderSpecError, match="no such state file"):
        create_encoder(f"dar:{tmp_path / 'missing.pt'}")


def test_dar_keeps_the_best_held_out_epoch(tiny_clip, monkeypatch):
    """held_out: the adapter kept is the best epoch on held-out training pairs; epoch 0 (the
    identity) wins when training only hurts them."""
    from qshift.continual.methods import DAR, Domain, TrainSettings

    torch.manual_seed(0)
    pix = tiny_clip.prepare([np.full((32, 32, 3), c, np.uint8) for c in range(0, 250, 10)], "image")
    caps = torch.nn.functional.normalize(torch.randn(len(pix), tiny_clip.dim), dim=-1)
    d = Domain("a", pix, caps, np.arange(len(pix)))
    fit, held = d.split(0.2, 0)
    assert len(held.pixels) == 5 and len(fit.pixels) == 20 and sorted(held.caption_item) == list(range(5))
    dar = DAR(tiny_clip, TrainSettings(epochs=3, batch_size=8, adapter_lr=1e-2, adapter="norm", held_out=0.2))
    try:
        with torch.no_grad():
            own = dar.image_features(held.pixels)
        assert dar._held_r1(Domain("c", held.pixels, own, np.arange(5))) == 100.0   # captions = the images
        assert dar._held_r1(Domain("c", held.pixels, own.flip(0), np.arange(5))) < 100.0
        scores = iter([50.0, 10.0, 20.0, 30.0])                # epoch 0 best: nothing is kept
        monkeypatch.setattr(dar, "_held_r1", lambda held: next(scores))
        info = dar.learn(d)
        assert info["best_epoch"] == 0 and info["held_out_r1"] == [50.0, 10.0, 20.0, 30.0]
        assert all(torch.equal(v, dar.init_state[k]) for k, v in dar.bank.domains["a"].state_dict().items())
        scores = iter([5.0, 10.0, 40.0, 30.0])                 # epoch 2 best: its weights are kept
        trained = {}
        real_fit = dar.fit

        def spy(dom, params, lr, after_epoch=None):
            def after(epoch):
                trained[epoch] = {k: v.detach().clone() for k, v in dar.bank.domains["b"].state_dict().items()}
                after_epoch(epoch)
            return real_fit(dom, params, lr, after)

        monkeypatch.setattr(dar, "fit", spy)
        info = dar.learn(Domain("b", pix.flip(0), caps, np.arange(len(pix))))
        assert info["best_epoch"] == 2
        assert all(torch.equal(v, trained[2][k]) for k, v in dar.bank.domains["b"].state_dict().items())
        assert not all(torch.equal(v, trained[3][k]) for k, v in dar.bank.domains["b"].state_dict().items())
    finally:
        dar.close()


def test_dar_routes_by_pixel_statistics_when_asked(tiny_clip):
    """route_features=pixels: the router is the Gaussian one over pixel statistics, learnt
    from each domain's training images; a bright and a dark domain go each to its own
    adapter, and the routing survives a state round trip."""
    from qshift.continual.methods import DAR, Domain, TrainSettings

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    imgs = lambda lo, hi: [rng.integers(lo, hi, (32, 32, 3)).astype(np.uint8) for _ in range(12)]  # noqa: E731
    caps = torch.nn.functional.normalize(torch.randn(12, tiny_clip.dim), dim=-1)
    bright, dark = (tiny_clip.prepare(imgs(lo, hi), "image") for lo, hi in ((180, 255), (0, 60)))
    dar = DAR(tiny_clip, TrainSettings(epochs=1, batch_size=4, adapter="norm", route_features="pixels",
                                       route_temperature=1.0))
    try:
        dar.learn(Domain("bright", bright, caps, np.arange(12)))
        dar.learn(Domain("dark", dark, caps, np.arange(12)))
        assert dar.router.kind == "gaussian" and dar.router.prototypes[0].shape == (2, 13)
        assert dar.router.covariance == "diag"
        w = dar.router.weights(dar.route_features(torch.cat([bright, dark])))
        assert (w[:12].argmax(1) == 0).all() and (w[12:].argmax(1) == 1).all()
        state = dar.extra_state()
        dar.router = type(dar.router).from_state(dict(state["router"]), tiny_clip.fingerprint())
        assert np.array_equal(dar.router.weights(dar.route_features(dark)), w[12:])
    finally:
        dar.close()
    base = DAR(tiny_clip, TrainSettings(epochs=1, batch_size=4, adapter="norm", route_features="pixels",
                                        routing="hard", route_base=True))
    try:  # route_base: images like the source go to the base model, exactly; the domains' own keep their adapter
        grey = tiny_clip.prepare(imgs(100, 150), "image")
        assert base.needs_source and not dar.needs_source
        base.use_source(grey)
        base.learn(Domain("bright", bright, caps, np.arange(12)))
        base.learn(Domain("dark", dark, caps, np.arange(12)))
        assert (base.router.weights(base.route_features(grey)) == 0).all()
        assert np.array_equal(base.embed(grey), base.base_features(grey))
        assert (base.router.weights(base.route_features(bright))[:, 0] == 1).all()
        assert not np.allclose(base.embed(bright), base.base_features(bright), atol=1e-4)
        again = type(base.router).from_state(dict(base.extra_state()["router"]), tiny_clip.fingerprint())
        assert again.base is not None and np.array_equal(again.base, base.router.base)
    finally:
        base.close()
    with pytest.raises(InputError, match="route_features must be embedding or pixels"):
        TrainSettings(route_features="histogram")
    with pytest.raises(InputError, match="route_covariance must be diag or full"):
        TrainSettings(route_features="pixels", route_covariance="tied")
    with pytest.raises(InputError, match="route_covariance='full' needs route_features='pixels'"):
        TrainSettings(route_covariance="full")
    full = DAR(tiny_clip, TrainSettings(epochs=1, batch_size=4, adapter="norm", route_features="pixels",
                                        route_covariance="full"))
    try:
        assert full.router.kind == "gaussian" and full.router.covariance == "full"
    finally:
        full.close()


def test_dar_source_distill_keeps_the_source_images_where_the_base_model_has_them(tiny_clip):
    """source_distill: a domain's adapter, trained with the same seed and data, moves the
    source images' embeddings less than without it (negate the term and they move more);
    without the source images it says what is missing."""
    from qshift.continual.methods import DAR, Domain, TrainSettings

    rng = np.random.default_rng(0)
    imgs = lambda lo, hi, n: [rng.integers(lo, hi, (32, 32, 3)).astype(np.uint8) for _ in range(n)]  # noqa: E731
    caps = torch.nn.functional.normalize(torch.randn(16, tiny_clip.dim, generator=torch.Generator().manual_seed(0)),
                                         dim=-1)
    bright, grey = tiny_clip.prepare(imgs(180, 255, 16), "image"), tiny_clip.prepare(imgs(90, 160, 16), "image")
    moved = {}
    for w in (0.0, 10.0):
        dar = DAR(tiny_clip, TrainSettings(epochs=4, batch_size=8, adapter="norm", adapter_lr=3e-2, source_distill=w))
        try:
            assert dar.needs_source == (w > 0)
            dar.use_source(grey)
            dar.learn(Domain("bright", bright, caps, np.arange(16)))
            dar.bank.active = "bright"
            adapted = dar.image_features(grey).numpy()
            frozen = dar.base_features(grey)
            moved[w] = float((1 - (adapted * frozen).sum(1)).mean())
        finally:
            dar.close()
    assert moved[10.0] < 0.5 * moved[0.0] and moved[0.0] > 1e-3
    dar = DAR(tiny_clip, TrainSettings(epochs=1, batch_size=8, adapter="norm", source_distill=1.0))
    try:
        with pytest.raises(InputError, match="source_distill needs the source images"):
            dar.learn(Domain("bright", bright, caps, np.arange(16)))
    finally:
        dar.close()


def test_joint_adapter_trains_one_adapter_on_the_union_after_the_last_domain(tiny_clip):
    """joint-adapter: nothing changes before the last domain; then one adapter, trained on
    every domain's pairs, serves every input, the tower stays frozen, the contrastive loss
    on the union falls, and the state round trip gives the same embeddings."""
    from qshift.continual.methods import Domain, TrainSettings, create_learner

    torch.manual_seed(0)
    pix = tiny_clip.prepare([np.full((32, 32, 3), c, np.uint8) for c in range(0, 240, 10)], "image")
    caps = torch.nn.functional.normalize(torch.randn(len(pix), tiny_clip.dim), dim=-1)
    a, b = Domain("a", pix[:12], caps[:12], np.arange(12)), Domain("b", pix[12:], caps[12:], np.arange(12))
    s = TrainSettings(epochs=5, batch_size=8, adapter_lr=3e-2, adapter="norm")
    j = create_learner("joint-adapter", tiny_clip, s, n_domains=2)
    try:
        frozen = {k: v.clone() for k, v in j.tower.state_dict().items()}
        base = j.embed(pix)
        assert j.learn(a) == {"trained": False} and np.array_equal(j.embed(pix), base)
        with torch.no_grad():
            before = float(j.contrastive(torch.from_numpy(base), caps))
        info = j.learn(b)
        after_emb = j.embed(pix)
        with torch.no_grad():
            after = float(j.contrastive(torch.from_numpy(after_emb), caps))
        assert info["trained"] and list(j.bank.domains) == ["joint"] and after < before
        assert all(torch.equal(v, frozen[k]) for k, v in j.tower.state_dict().items())
        state = j.state_dict()
    finally:
        j.close()
    k = create_learner("joint-adapter", tiny_clip, s, n_domains=2)
    try:
        assert np.allclose(k.embed(pix), base, atol=1e-6)
        k.load_state_dict(state, {"a": a, "b": b})
        assert np.allclose(k.embed(pix), after_emb, atol=1e-6)
    finally:
        k.close()
