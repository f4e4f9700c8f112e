"""Each TTA objective's loss against an independent computation on hand-made inputs.

A small AdaptableEncoder over a fixed feature table (query "i" is row i; the tower is
Linear + LayerNorm) makes every prediction reproducible, so each loss can be recomputed
here with numpy from the predictions' logits. A sign flip or a dropped term in any
objective turns one of these red.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qshift.adapt import create_adapter
from qshift.errors import InputError
from helpers import DIM, FeatureEncoder

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

N_GALLERY = 24


def _entropy(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return -(p * np.log(p)).sum(1)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


@pytest.fixture()
def setup():
    enc = FeatureEncoder()
    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((N_GALLERY, DIM)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = [str(i) for i in range(16)]
    return enc, gallery, queries


def _pred(adapter, queries):
    batch = adapter.prepare(queries)
    with torch.enable_grad():
        pred = adapter.predict(adapter.forward(batch.inputs))
    return batch, pred


def test_tent_is_mean_entropy(setup):
    enc, g, qs = setup
    a = create_adapter(enc, g, "t2i", "tent", temperature=0.1)
    batch, pred = _pred(a, qs)
    assert pred.logits.shape == (16, 16)  # batch-nn candidates: one per query of the batch
    loss = a.objective.loss(a, batch, pred, 0).detach()
    assert float(loss) == pytest.approx(_entropy(pred.logits.detach().numpy()).mean(), rel=1e-5)
    a.close()


def test_read_reliability_and_balance(setup):
    enc, g, qs = setup
    a = create_adapter(enc, g, "t2i", "read", temperature=0.1)
    batch, pred = _pred(a, qs)
    p = _softmax(pred.logits.detach().numpy().astype(np.float64))
    pmax = p.max(1)
    reliable = (pmax * (1 - np.log(pmax) - 1)).mean()  # log γ = −1
    s = p.sum(0)
    balance = _entropy(s[None])[0]                     # entropy of softmax(Σ_i p_i)
    assert float(a.objective.loss(a, batch, pred, 0).detach()) == pytest.approx(reliable - balance, rel=1e-5)
    a.close()


def _grad_at(a, values, loss_fn):
    """∇ loss_fn() with the adapted parameters set to ``values`` (then restored)."""
    saved = [p.detach().clone() for p in a.params]
    with torch.no_grad():
        for p, v in zip(a.params, values):
            p.copy_(v)
    with torch.enable_grad():
        g = torch.autograd.grad(loss_fn(), a.params)
    with torch.no_grad():
        for p, v in zip(a.params, saved):
            p.copy_(v)
    return g


def test_sar_reliable_entropy_and_sharpness_aware_step(setup):
    enc, g, qs = setup
    a = create_adapter(enc, g, "t2i", "sar", temperature=0.1, e0=0.4, rho=0.05, lr=1e-3)
    batch, pred = _pred(a, qs)
    ent = _entropy(pred.logits.detach().numpy())
    margin = 0.4 * math.log(16)
    keep = ent < margin
    assert keep.any() and not keep.all()
    assert float(a.objective.loss(a, batch, pred, 0)) == pytest.approx(ent[keep].mean(), rel=1e-5)

    def reliable_entropy():  # SAR Eq. 2 with the filter evaluated at the current parameters
        logits = a.predict(a.forward(batch.inputs)).logits
        e = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
        return e[e < margin].mean()

    theta = [p.detach().clone() for p in a.params]
    g0 = _grad_at(a, theta, reliable_entropy)
    norm = torch.sqrt(sum((x ** 2).sum() for x in g0))
    g1 = _grad_at(a, [t + 0.05 * x / norm for t, x in zip(theta, g0)], reliable_entropy)
    seen = {}

    def capture(*args, **kwargs):
        seen["grads"] = [p.grad.detach().clone() for p in a.params]
        seen["at"] = [p.detach().clone() for p in a.params]

    a.optimizer.step = capture
    _, pred = _pred(a, qs)
    a.objective.update(a, batch, a.objective.loss(a, batch, pred, 0), 0)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(seen["at"], theta))  # ε undone before the step
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-7) for x, y in zip(seen["grads"], g1))  # gradient at θ + ε
    assert not all(torch.allclose(x, y, rtol=1e-3, atol=1e-6) for x, y in zip(g0, g1))  # ≠ the plain gradient
    a.close()


def test_eata_loss_filters_weights_and_fisher_term(setup):
    enc, g, qs = setup
    source = [str(i) for i in range(32, 64)]
    a = create_adapter(enc, g, "t2i", "eata", temperature=0.1, batch_size=16, source_texts=source,
                       e_margin=0.4, d_margin=0.05, fisher_alpha=2000.0)
    obj = a.objective
    # the Fisher, as EATA's code computes it: mean over source batches of (∇ CE(logits, argmax))²
    expected = [torch.zeros_like(p) for p in a.params]
    for chunk in (source[:16], source[16:]):
        inputs = a.prepare(chunk).inputs

        def ce():
            logits = a.predict(a.forward(inputs)).logits
            return F.cross_entropy(logits, logits.detach().argmax(1))

        expected = [e + x ** 2 / 2 for e, x in zip(expected, _grad_at(a, a._initial, ce))]
    assert all(torch.allclose(f, e, rtol=1e-5, atol=1e-12) for f, e in zip(obj.fisher, expected))
    assert any(float(f.abs().sum()) > 0 for f in obj.fisher)

    delta = [0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(a.params)]
    with torch.no_grad():
        for p, d in zip(a.params, delta):
            p.add_(d)
    batch, pred = _pred(a, qs)
    logits = pred.logits.detach().numpy()
    ent = _entropy(logits)
    margin = 0.4 * math.log(16)
    keep = ent < margin
    assert keep.any() and not keep.all()
    reg = sum(float((f * d ** 2).sum()) for f, d in zip(obj.fisher, delta))
    want = (ent * np.exp(-(ent - margin)))[keep].sum() / keep.sum() + 2000.0 * reg
    assert float(obj.loss(a, batch, pred, 0)) == pytest.approx(want, rel=1e-4)
    assert reg > 0
    # redundancy: queries whose whole-gallery prediction is too close to the running mean are dropped
    p_full = _softmax((pred.q.detach().numpy() @ g.T) / 0.1)
    obj.mean_prob = torch.from_numpy(p_full[0].astype(np.float32))
    cos = p_full @ p_full[0] / (np.linalg.norm(p_full, axis=1) * np.linalg.norm(p_full[0]))
    obj.d_margin = float(np.median(cos))
    keep2 = keep & (cos < obj.d_margin)
    assert 0 < keep2.sum() < keep.sum()
    want2 = (ent * np.exp(-(ent - margin)))[keep2].sum() / keep2.sum() + 2000.0 * reg
    assert float(obj.loss(a, batch, pred, 1)) == pytest.approx(want2, rel=1e-4)
    a.close()


def test_deyo_selects_by_entropy_and_plpd_and_weights(setup):
    enc, g, qs = setup
    a = create_adapter(enc, g, "t2i", "deyo", temperature=0.1, margin=0.5)
    obj = a.objective
    destroyed = a.prepare([str(i) for i in range(40, 56)]).inputs   # stands for the object-destroyed views
    obj.destroy = lambda adapter, batch: destroyed
    batch, pred = _pred(a, qs)
    logits = pred.logits.detach().numpy()
    p = _softmax(logits)
    yhat = p.argmax(1)
    with torch.no_grad():
        q_aug = a.forward(destroyed)
    p_aug = _softmax((q_aug @ pred.nn_feat.T).numpy() / 0.1)
    plpd = p[np.arange(16), yhat] - p_aug[np.arange(16), yhat]
    ent = _entropy(logits)
    margin = 0.5 * math.log(16)
    obj.plpd_threshold = float(np.median(plpd))
    keep = (ent < margin) & (plpd > obj.plpd_threshold)
    assert 0 < keep.sum() < 16
    want = (ent * (np.exp(-(ent - margin)) + np.exp(plpd)))[keep].mean()
    assert float(obj.loss(a, batch, pred, 0)) == pytest.approx(want, rel=1e-4)
    a.close()


def _queue(obj, q, c, ent):
    from qshift.adapt.tcr import Queue

    obj.queue = Queue(obj.queue_size)
    obj.queue.add(torch.zeros(len(q)), q, c, torch.as_tensor(ent), [str(i) for i in range(len(q))])


def test_tcr_three_terms(setup):
    enc, g, qs = setup
    a = create_adapter(enc, g, "t2i", "tcr", temperature=0.1, t=0.1)
    obj = a.objective
    rng = np.random.default_rng(5)
    qq = torch.from_numpy(rng.standard_normal((6, DIM)).astype(np.float32))
    cc = torch.from_numpy(g[:6])
    batch, pred = _pred(a, qs)
    ent = _entropy(pred.logits.detach().numpy())
    top = float(np.median(ent))
    _queue(obj, F.normalize(qq, dim=-1), cc, [top / 4, top / 2, top, top / 3, top / 5, top / 6])
    terms = obj.terms(a, batch, pred, 1)  # step 1: the queue is not updated
    q, c = pred.q.detach().numpy(), pred.nn_feat.numpy()
    thr = top + 1e-3                                                   # the queue's largest entropy
    w = np.clip(1 - ent / thr, 0, None)
    keep = ent <= thr
    assert keep.any() and not keep.all()
    assert float(terms["entropy"]) == pytest.approx((ent * w)[keep].mean(), rel=1e-5)          # Eq. 4
    assert float(terms["uniformity"]) == pytest.approx(
        np.exp(-0.1 * np.linalg.norm(q - q.mean(0), axis=1)).mean(), rel=1e-5)                  # Eq. 9

    def gap(x, y):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        y = y / np.linalg.norm(y, axis=1, keepdims=True)
        return np.linalg.norm(x.mean(0) - y.mean(0))

    ref = gap(F.normalize(qq, dim=-1).numpy(), g[:6])
    assert float(terms["gap"]) == pytest.approx((gap(q, c) - ref) ** 2, rel=1e-4)                # Eq. 6
    assert float(obj.loss(a, batch, pred, 1)) == pytest.approx(sum(float(v) for v in terms.values()), rel=1e-5)
    a.close()


def test_rest_consistency_and_source_loss(setup):
    enc, g, qs = setup
    a = create_adapter(enc, g, "t2i", "rest", temperature=0.1, source_batch=4, use_consistency=True, decouple=True)
    obj = a.objective
    rng = np.random.default_rng(6)
    batch, pred = _pred(a, qs)
    top = float(np.median(_entropy(pred.logits.detach().numpy())))
    _queue(obj, F.normalize(torch.from_numpy(rng.standard_normal((6, DIM)).astype(np.float32)), dim=-1),
           torch.from_numpy(g[:6]), [top / 4, top / 2, top, top / 3, top / 5, top / 6])
    tcr_terms = sum(float(v) for v in obj.terms(a, batch, pred, 1).values())
    q, c = pred.q.detach().numpy().astype(np.float64), pred.nn_feat.numpy().astype(np.float64)
    logits = q @ c.T / 0.1                                   # query i × candidate c_j
    col = logits - logits.max(0, keepdims=True)
    log_sm = col - np.log(np.exp(col).sum(0, keepdims=True))  # softmax over the queries, per candidate
    back = -np.diag(log_sm)                                   # c_i should pick query i back
    ent = _entropy(pred.logits.detach().numpy())
    w = np.clip(1 - ent / (top + 1e-3), 0, None)
    assert 0 < (w > 0).sum() < len(w)
    consistency = (w * back).sum() / w.sum()
    assert float(obj.loss(a, batch, pred, 1)) == pytest.approx(tcr_terms + consistency, rel=1e-4)
    # source knowledge (gradient decoupling's g_src): InfoNCE of the queued queries to their own candidates
    raw = obj.queue.raw[:4]
    with torch.no_grad():
        sq = a.forward(a.prepare(raw).inputs).numpy()
    sl = sq @ torch.stack(obj.queue.c[:4]).numpy().T / 0.1
    ce = np.mean(np.log(np.exp(sl).sum(1)) - np.diag(sl))
    assert float(obj._source_loss(a)) == pytest.approx(ce, rel=1e-4)
    a.close()


@pytest.mark.parametrize("proxies", ["prototypes", "items"])
def test_epcl_pulls_to_the_candidates_proxy_and_pushes_from_exclusions(setup, proxies):
    enc, g, qs = setup
    a = create_adapter(enc, g, "t2i", "epcl", temperature=0.5, k_pos=3, exclude_rank=0.5, proxies=proxies,
                       n_proxies=6, n_items=5)
    obj = a.objective
    batch, pred = _pred(a, qs)
    gen_state = a.generator.get_state()
    loss = float(obj.loss(a, batch, pred, 0).detach())
    q = pred.q.detach().numpy().astype(np.float64)
    s = q @ g.T
    top = np.argsort(-s, axis=1)[:, :3]
    w = _softmax(np.take_along_axis(s, top, 1) / 0.5)
    pos = np.einsum("bk,bkd->bd", w, g[top])
    pos /= np.linalg.norm(pos, axis=1, keepdims=True)
    cut = max(4, math.ceil(0.5 * N_GALLERY))
    thr = -np.sort(-s, axis=1)[:, cut - 1:cut]
    if proxies == "prototypes":
        assign, cent = obj.proxies.assign.numpy(), obj.proxies.centroids.numpy()
        best = np.stack([s[:, assign == m].max(1) for m in range(len(cent))], 1)
        excl, neg = best < thr, np.broadcast_to(cent, (16, *cent.shape))
    else:  # the same draw as the objective's: uniform scores over the items below the cut-off
        a.generator.set_state(gen_state)
        rnd = torch.rand(s.shape, generator=a.generator).numpy()
        pick = np.argsort(-np.where(s < thr, rnd, -1.0), axis=1, kind="stable")[:, :5]
        excl, neg = np.take_along_axis(s < thr, pick, 1), g[pick]
    has = excl.any(1)
    assert has.sum() >= 8 and excl.all() == (proxies == "items")  # items are drawn from below the cut-off
    lp = (q * pos).sum(1) / 0.5
    ln = np.where(excl, np.einsum("bd,bmd->bm", q, neg) / 0.5, -np.inf)
    full = np.concatenate([lp[:, None], ln], 1)
    want = -(lp - np.log(np.exp(full - full.max(1, keepdims=True)).sum(1)) - full.max(1))
    assert loss == pytest.approx(want[has].mean(), rel=1e-4) and loss > 0.05
    assert np.array_equal(obj.learned.numpy(), has)  # every query with an exclusion set, whatever its confidence
    # the top-1 candidate is never excluded: its cluster has a member (itself) above the cut-off
    if proxies == "prototypes":
        assert not excl[np.arange(16), assign[top[:, 0]]].any()
    a.close()


def test_epcl_batch_proxies_is_the_complementary_loss_of_the_excluded_candidates(setup):
    enc, g, qs = setup
    a = create_adapter(enc, g, "t2i", "epcl", temperature=0.1, proxies="batch", exclude_ratio=0.2)
    batch, pred = _pred(a, qs)
    loss = a.objective.loss(a, batch, pred, 0)
    z = pred.logits.detach().numpy().astype(np.float64)
    p = _softmax(z)
    excl = p < 0.2 * p.max(1, keepdims=True)
    has = excl.any(1)
    want = -np.log(1 - (p * excl).sum(1))
    assert 0 < has.sum() <= len(qs) and not excl[np.arange(len(qs)), z.argmax(1)].any()  # never the top-1
    assert float(loss) == pytest.approx(want[has].mean(), rel=1e-4) and float(loss) > 0
    assert np.array_equal(a.objective.learned.numpy(), has)
    # its gradient lowers the excluded candidates' share: one small step against it
    loss.backward()
    a.optimizer.step()
    batch2, pred2 = _pred(a, qs)
    p2 = _softmax(pred2.logits.detach().numpy().astype(np.float64))
    assert (p2 * excl).sum() < (p * excl).sum()
    a.close()


def test_a_guide_sets_the_candidates_and_the_exclusion_sets(setup):
    """predict(q, guide): the candidates are the guide's nearest items, ``target`` its logits
    over them; EPCL batch reads its exclusion sets from that target, the loss from q."""
    enc, g, qs = setup
    a = create_adapter(enc, g, "t2i", "epcl", temperature=0.1, proxies="batch", exclude_ratio=0.2)
    batch = a.prepare(qs)
    rng = np.random.default_rng(7)
    guide = F.normalize(torch.from_numpy(rng.standard_normal((len(qs), DIM)).astype(np.float32)), dim=-1)
    with torch.enable_grad():
        pred = a.predict(a.forward(batch.inputs), guide)
    gt = torch.from_numpy(g)
    assert torch.equal(pred.nn, (guide @ gt.T).argmax(1))
    assert not torch.equal(pred.nn, (pred.q.detach() @ gt.T).argmax(1))  # the guide, not the query, chose
    c = gt[pred.nn]
    assert torch.allclose(pred.target, guide @ c.T / 0.1, atol=1e-5)
    assert torch.allclose(pred.logits, pred.q @ c.T / 0.1, atol=1e-5)
    loss = a.objective.loss(a, batch, pred, 0)
    z, zg = pred.logits.detach().numpy().astype(np.float64), pred.target.numpy().astype(np.float64)
    pg = _softmax(zg)
    excl = pg < 0.2 * pg.max(1, keepdims=True)
    has = excl.any(1)
    want = -np.log(1 - (_softmax(z) * excl).sum(1))
    assert has.any() and float(loss) == pytest.approx(want[has].mean(), rel=1e-4)
    own = _softmax(z)
    assert not np.array_equal(excl, own < 0.2 * own.max(1, keepdims=True))  # not the query's own sets
    with pytest.raises(InputError, match="guide of batch 0 must be finite and shaped"):
        a.step(batch, guide=guide[:3])
    a.close()


def test_epcl_batch_proxies_temperature_rescales_the_logits(setup):
    enc, g, qs = setup
    a = create_adapter(enc, g, "t2i", "epcl", temperature=0.1, proxies="batch", proxy_temperature=0.2)
    batch, pred = _pred(a, qs)
    z = pred.logits.detach().numpy().astype(np.float64) / 2
    p = _softmax(z)
    excl = p < 0.1 * p.max(1, keepdims=True)
    want = -np.log(1 - (p * excl).sum(1))[excl.any(1)].mean()
    assert float(a.objective.loss(a, batch, pred, 0)) == pytest.approx(want, rel=1e-4)
    a.close()


def test_rest_with_epcl_adds_the_term(setup):
    enc, g, qs = setup
    plain = create_adapter(enc, g, "t2i", "rest", temperature=0.1)
    both = create_adapter(enc, g, "t2i", "rest", temperature=0.1, epcl_weight=2.0, epcl={"n_proxies": 6})
    solo = create_adapter(enc, g, "t2i", "epcl", temperature=0.1, n_proxies=6)
    batch, pred = _pred(plain, qs)
    l_plain = float(plain.objective.loss(plain, batch, pred, 0).detach())
    l_both = float(both.objective.loss(both, batch, pred, 0).detach())
    l_solo = float(solo.objective.loss(solo, batch, pred, 0).detach())
    assert l_both == pytest.approx(l_plain + 2.0 * l_solo, rel=1e-4)
    for x in (plain, both, solo):
        x.close()


def test_oracle_is_supervised_infonce_over_the_true_positives(setup):
    enc, g, qs = setup
    a = create_adapter(enc, g, "t2i", "oracle", temperature=0.1)
    a.batch_labels = [[i % N_GALLERY, (i + 5) % N_GALLERY] for i in range(16)]
    batch, pred = _pred(a, qs)
    logits = pred.q.detach().numpy() @ g.T / 0.1
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - \
        logits.max(1, keepdims=True)
    want = -np.mean([np.log(np.exp(logp[i, pos]).sum()) for i, pos in enumerate(a.batch_labels)])
    assert float(a.objective.loss(a, batch, pred, 0).detach()) == pytest.approx(want, rel=1e-5)
    a.close()


def test_every_objective_moves_the_parameters(setup):
    """An update that is a no-op (or a loss without gradient) fails here."""
    from qshift.adapt import OBJECTIVES

    enc, g, qs = setup
    for name in OBJECTIVES:
        a = create_adapter(enc, g, "t2i", name, temperature=0.1, lr=1e-2, steps=2,
                           source_texts=[str(i) for i in range(32, 64)], reset_on_collapse=False)
        if name == "oracle":
            a.batch_labels = [[i % N_GALLERY] for i in range(len(qs))]
        if name == "deyo":
            a.objective.destroy = lambda adapter, batch: adapter.prepare([str(i) for i in range(40, 56)]).inputs
            a.objective.plpd_threshold = -1.0
        guide = None
        if a.objective.needs_guide:  # distill learns from a guide (the fused query in a pipeline)
            guide = np.random.default_rng(5).standard_normal((len(qs), DIM)).astype(np.float32)
        a.adapt(qs, guide=guide)
        assert any(not torch.equal(p, p0) for p, p0 in zip(a.params, a._initial)), name
        a.close()


def test_distill_is_kl_from_the_guide_and_pulls_towards_it(setup):
    """distill: L = mean_i KL(softmax(t_i) ‖ softmax(z_i)) with t the guide's logits; a step
    lowers it (a sign flip raises it); REST's distill_weight adds exactly w · L; no guide, no loss."""
    enc, g, qs = setup
    rng = np.random.default_rng(3)
    guide = F.normalize(torch.from_numpy(rng.standard_normal((len(qs), DIM)).astype(np.float32)), dim=-1)
    a = create_adapter(enc, g, "t2i", "distill", temperature=0.1, lr=0.05, steps=1)
    batch = a.prepare(qs)
    with torch.enable_grad():
        pred = a.predict(a.forward(batch.inputs), guide)
    pt, z = _softmax(pred.target.numpy().astype(np.float64)), pred.logits.detach().numpy().astype(np.float64)
    want = (pt * (np.log(pt) - np.log(_softmax(z)))).sum(1).mean()
    before = float(a.objective.loss(a, batch, pred, 0))
    assert before == pytest.approx(want, rel=1e-4) and before > 0.1
    a.step(batch, guide=guide)
    with torch.enable_grad():
        after = float(a.objective.loss(a, batch, a.predict(a.forward(batch.inputs), guide), 0))
    assert after < before
    with torch.enable_grad():
        with pytest.raises(InputError, match="needs the guide's logits"):
            a.objective.loss(a, batch, a.predict(a.forward(batch.inputs)), 0)
    a.close()
    plain = create_adapter(enc, g, "t2i", "rest", temperature=0.1)
    both = create_adapter(enc, g, "t2i", "rest", temperature=0.1, distill_weight=2.0)
    assert both.objective.needs_guide and not plain.objective.needs_guide
    with torch.enable_grad():
        pred = plain.predict(plain.forward(batch.inputs), guide)
        gap = both.objective.loss(both, batch, pred, 0) - plain.objective.loss(plain, batch, pred, 0)
    assert float(gap) == pytest.approx(2 * want, rel=1e-3)
    plain.close()
    both.close()
    with pytest.raises(InputError, match="epcl_weight and distill_weight must be >= 0, got 0.0, -1.0"):
        create_adapter(enc, g, "t2i", "rest", distill_weight=-1.0)
