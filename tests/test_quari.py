import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from qshift.errors import CheckpointMismatchError, InputError
from qshift.io import read_json
from qshift.quari import (QuARI, QuARIConfig, QuARITrainConfig, load_quari, quari_rerank, quari_scores,
                          quari_search, save_ta, train_quari, train_ta)
from qshift.quari.scoring import (lowrank_scores, lowrank_scores_numpy, materialize, materialized_scores,
                                  search_vectors)
from qshift.quari.train import hard_negative_rows, quari_loss, semi_positives


def _unit(rng, n, e):
    x = rng.standard_normal((n, e)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 9), st.integers(2, 12), st.integers(1, 6), st.integers(0, 10_000),
       st.sampled_from([None, 0.8, 2.0]))
def test_lowrank_equals_materialized(b, n, e, r, seed, anchor):
    g = torch.Generator().manual_seed(seed)
    qp, u, v = torch.randn(b, e, generator=g), torch.randn(b, r, e, generator=g), torch.randn(b, r, e, generator=g)
    d = torch.randn(n, e, generator=g)
    ref = materialized_scores(qp, u, v, d, anchor)
    assert torch.allclose(lowrank_scores(qp, u, v, d, anchor), ref, atol=1e-4)
    assert np.allclose(lowrank_scores_numpy(qp.numpy(), u.numpy(), v.numpy(), d.numpy(), anchor), ref.numpy(),
                       atol=1e-4)
    per_query = d[None].expand(b, n, e)
    assert torch.allclose(lowrank_scores(qp, u, v, per_query, anchor), ref, atol=1e-4)
    # the numerator is linear in d: MIPS with w ranks like q'ᵀ T d
    w = search_vectors(qp, u, v, anchor)
    t = materialize(u, v, anchor)
    assert torch.allclose(d @ w.T, torch.einsum("be,bef,nf->nb", qp, t, d), atol=1e-3 * (1 + float(w.abs().max())))


def test_half_precision_paths_agree():
    rng = np.random.default_rng(0)
    qp, u, v = (torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in ((3, 64), (3, 8, 64), (3, 8, 64)))
    d = torch.from_numpy(_unit(rng, 200, 64))
    for anchor in (None, 0.8):
        ref = lowrank_scores(qp, u, v, d, anchor)
        for dt in (torch.bfloat16, torch.float16):
            assert torch.allclose(lowrank_scores(qp, u, v, d, anchor, dtype=dt), ref, atol=3e-2)


def test_model_shapes_and_bad_input():
    cfg = QuARIConfig(dim=16, rank=4, hidden=32, layers=2, heads=2, steps=3)
    m = QuARI(cfg)
    qp, u, v = m(torch.randn(5, 16))
    assert qp.shape == (5, 16) and u.shape == v.shape == (5, 4, 16)
    assert torch.allclose(qp.norm(dim=1), torch.ones(5)) and torch.allclose(u.flatten(1).norm(dim=1), torch.ones(5))
    with pytest.raises(InputError, match=r"shape \(B, 16\)"):
        m(torch.randn(5, 12))
    with pytest.raises(InputError, match="divisible"):
        QuARIConfig(dim=16, hidden=30, heads=4)
    with pytest.raises(InputError, match="empty candidate"):
        lowrank_scores(qp, u, v, torch.zeros(0, 16))
    one = QuARI(QuARIConfig(dim=16, rank=4, hidden=32, layers=1, heads=2, steps=3, one_step=True))
    assert one.n_steps == 1 and m.n_steps == 3


def test_unit_query_head_bounds_the_move_of_q():
    """With the head normalised, λ bounds the move: cos(q', q) ≥ 2λ − 1, whatever the head's scale."""
    lam = 0.9
    for unit in (True, False):
        m = QuARI(QuARIConfig(dim=16, rank=4, hidden=32, layers=1, heads=2, steps=2, query_residual=lam,
                              unit_query_head=unit))
        with torch.no_grad():
            for p in m.decode_q.parameters():
                p.mul_(50.0)  # a head whose outputs are far longer than the unit queries
        q = torch.nn.functional.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
        with torch.no_grad():
            cos = (m(q)[0] * q).sum(1)
        if unit:
            assert cos.min() >= 2 * lam - 1 - 1e-5
        else:  # the raw head dominates the mix: the bound does not hold
            assert cos.min() < 2 * lam - 1


def test_identity_init_starts_at_the_backbone_and_learns(tmp_path):
    """identity_init: T = I and q' = q before training (the backbone's exact scores); training
    moves away from it and beats the backbone on the toy task; bad combinations refused."""
    rng = np.random.default_rng(0)
    q, t, tof = _toy(rng)
    mcfg = QuARIConfig(dim=16, rank=4, hidden=32, layers=1, heads=2, steps=2, identity_init=True)
    qs = q[::2]
    cos = (qs / np.linalg.norm(qs, axis=1, keepdims=True)) @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
    assert np.allclose(quari_scores(QuARI(mcfg).eval(), qs, t), cos, atol=1e-5)
    train_quari(q, t, tof, mcfg, QuARITrainConfig(epochs=200, batch_size=50, lr=3e-3, n_neighbors=10, val_fraction=0),
                tmp_path / "run", progress=False)         # slower than the normalised form (B = 0 start)
    model, _, _ = load_quari(tmp_path / "run")
    assert model.cfg.identity_init
    with torch.no_grad():
        _, u, _ = model(torch.from_numpy(qs))
    assert u.abs().max() > 1e-3                      # the low-rank change grew from zero
    hit = lambda s: (s.argmax(1) == np.arange(len(t))).mean()  # noqa: E731
    assert hit(quari_scores(model, qs, t)) > hit(cos) + 0.15
    for bad in (dict(anchor=None), dict(unit_query_head=True), dict(query_residual=0.0)):
        with pytest.raises(InputError, match="identity_init needs"):
            QuARIConfig(dim=16, identity_init=True, **bad)


@pytest.mark.parametrize("anchor", [0.8, None])
def test_tied_query_takes_the_query_through_its_own_transform(anchor):
    """tied_query with λ = 1: q' = normalise(T q) for the T the model predicts (with λ < 1 the
    head is mixed in); untied, q' does not depend on T."""
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    kw = dict(dim=16, rank=4, hidden=32, layers=1, heads=2, steps=2, anchor=anchor)
    model = QuARI(QuARIConfig(**kw, tied_query=True, query_residual=1.0)).eval()
    with torch.no_grad():
        qp, u, v = model(q)
    t = materialize(u, v, anchor)
    assert torch.allclose(qp, torch.nn.functional.normalize(torch.einsum("bef,bf->be", t, q), dim=-1), atol=1e-5)
    untied = QuARI(QuARIConfig(**kw, query_residual=1.0)).eval()
    with torch.no_grad():
        assert torch.allclose(untied(q)[0], q, atol=1e-6)


def test_static_base_is_the_query_independent_part_of_the_transform(tmp_path):
    """static_base: U = U₀ + MLP_u, V = V₀ + MLP_v. At the identity start T = I; with the
    decoders silenced every query gets U₀, V₀ (tied, λ = 1: q' = normalise(q + a·U₀ᵀV₀ q), the
    rank-r TA map); training moves U₀ away from zero."""
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    kw = dict(dim=16, rank=4, hidden=32, layers=1, heads=2, steps=2, identity_init=True, query_residual=1.0,
              tied_query=True)
    model = QuARI(QuARIConfig(**kw, static_base=True)).eval()
    with torch.no_grad():
        qp, u, _ = model(q)
        assert torch.allclose(qp, q, atol=1e-6) and u.abs().max() == 0
        model.base_u.copy_(torch.randn(4, 16))
        model = model.static_part()
        qp, u, v = model(q)
    assert torch.allclose(u, model.base_u.expand(5, -1, -1)) and torch.allclose(v, model.base_v.expand(5, -1, -1))
    ta = torch.eye(16) + 0.8 * model.base_u.T @ model.base_v
    assert torch.allclose(qp, torch.nn.functional.normalize(q @ ta.T, dim=-1), atol=1e-5)
    assert not hasattr(QuARI(QuARIConfig(**kw)), "base_u")
    with pytest.raises(InputError, match="static_part needs"):
        QuARI(QuARIConfig(**kw)).static_part()
    rng = np.random.default_rng(0)
    qs, t, tof = _toy(rng)
    train_quari(qs, t, tof, QuARIConfig(**kw, static_base=True),
                QuARITrainConfig(epochs=5, batch_size=50, lr=3e-3, n_neighbors=10, val_fraction=0), tmp_path / "run",
                progress=False)
    trained = load_quari(tmp_path / "run")[0]
    assert trained.cfg.static_base and trained.base_u.abs().max() > 1e-3
    # static_lr_scale: U₀, V₀ take steps that much larger (Adam: step ≈ rate); refused without static_base
    fast = QuARITrainConfig(epochs=5, batch_size=50, lr=3e-3, n_neighbors=10, val_fraction=0, static_lr_scale=10)
    train_quari(qs, t, tof, QuARIConfig(**kw, static_base=True), fast, tmp_path / "fast", progress=False)
    assert load_quari(tmp_path / "fast")[0].base_u.norm() > 3 * trained.base_u.norm()
    with pytest.raises(InputError, match="static_lr_scale"):
        QuARITrainConfig(static_lr_scale=0)
    with pytest.raises(InputError, match="static_lr_scale needs"):
        train_quari(qs, t, tof, QuARIConfig(**kw), fast, tmp_path / "plain", progress=False)


def test_static_rank_appends_a_static_part_of_its_own_rank(tmp_path):
    """static_rank r₀: U₀, V₀ (r₀ × E) are appended to the predicted U, V, so T = I + a·(UᵀV + U₀ᵀV₀)
    has rank r + r₀; the start is still T = I, the static part alone is the rank-r₀ map, and
    training moves U₀."""
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    kw = dict(dim=16, rank=2, hidden=32, layers=1, heads=2, steps=2, identity_init=True, query_residual=1.0,
              tied_query=True, static_base=True)
    model = QuARI(QuARIConfig(**kw, static_rank=6)).eval()
    assert model.base_u.shape == (6, 16)
    with torch.no_grad():
        qp, u, v = model(q)
        assert u.shape == v.shape == (5, 8, 16) and torch.allclose(qp, q, atol=1e-6)
        model.base_u.copy_(torch.randn(6, 16))
        for dec in (model.decode_u, model.decode_v):             # some per-query part as well
            torch.nn.init.normal_(dec[-1].weight)
        qp, u, v = model(q)
        full = torch.eye(16) + 0.8 * (u.transpose(1, 2) @ v)
        assert torch.allclose(u[:, 2:], model.base_u.expand(5, -1, -1))     # the static rows, after r predicted
        static = model.static_part()(q)[0]
    assert torch.allclose(qp, torch.nn.functional.normalize(torch.einsum("bef,bf->be", full, q), dim=-1), atol=1e-5)
    # scoring applies T₀ to the gallery once and uses the r predicted rows: the same cos(q', T d)
    from qshift.quari.scoring import materialized_scores
    from qshift.quari.search import quari_scores
    from qshift.quari.stage import LowRankTransform

    g = torch.nn.functional.normalize(torch.randn(30, 16), dim=-1)
    exact = materialized_scores(qp, u, v, g, 0.8).numpy()
    assert np.allclose(quari_scores(model, q.numpy(), g.numpy()), exact, atol=1e-5)
    with torch.no_grad():
        lt = LowRankTransform(qp, u, v, g, 0.8, "full", 5, model.static_map(g), model.per_query_rows(u, v))
    assert model.per_query_rows(u, v)[0].shape == (5, 2, 16)
    assert np.allclose(lt.score(None), exact, atol=1e-5)
    cand = np.arange(15).reshape(5, 3) * 2
    assert np.allclose(lt.score(cand), np.take_along_axis(exact, cand, 1), atol=1e-5)
    with pytest.raises(InputError, match="identity_init"):
        QuARIConfig(**{**kw, "identity_init": False, "query_residual": 0.5}, static_rank=4)
    ta = torch.eye(16) + 0.8 * model.base_u.T @ model.base_v
    assert torch.allclose(static, torch.nn.functional.normalize(q @ ta.T, dim=-1), atol=1e-5)
    assert not torch.allclose(static, qp, atol=1e-3)
    with pytest.raises(InputError, match="static_rank"):
        QuARIConfig(**{**kw, "static_base": False}, static_rank=4)
    with pytest.raises(InputError, match="static_rank"):
        QuARIConfig(**kw, static_rank=-1)
    rng = np.random.default_rng(0)
    qs, t, tof = _toy(rng)
    train_quari(qs, t, tof, QuARIConfig(**kw, static_rank=6),
                QuARITrainConfig(epochs=5, batch_size=50, lr=3e-3, n_neighbors=10, val_fraction=0), tmp_path / "run",
                progress=False)
    trained = load_quari(tmp_path / "run")[0]
    assert trained.cfg.static_rank == 6 and trained.base_u.shape == (6, 16) and trained.base_u.abs().max() > 1e-3


def test_static_init_fits_the_static_part_as_a_ta_map_first(tmp_path):
    """static_init_epochs: stage 1 sets U₀, V₀ to the rank-r₀ TA map fitted on the training
    targets (I + a·U₀ᵀV₀ = train_ta's map), the held-out check scores it as epoch 0, and a
    model that is not static_rank is refused."""
    from qshift.quari.train import train_ta

    rng = np.random.default_rng(0)
    qs, t, tof = _toy(rng)
    kw = dict(dim=16, rank=2, hidden=32, layers=1, heads=2, steps=2, identity_init=True, query_residual=1.0,
              tied_query=True, static_base=True, static_rank=6)
    base = dict(epochs=1, batch_size=50, lr=1e-9, lr_min=1e-10, n_neighbors=10, semi_positives=False, noise=False)
    train_quari(qs, t, tof, QuARIConfig(**kw), QuARITrainConfig(**base, val_fraction=0, static_init_epochs=20),
                tmp_path / "run", progress=False)
    model = load_quari(tmp_path / "run")[0]
    ta = train_ta(qs, t, tof, epochs=20, batch_size=50, temperature=0.07, rank=6)
    with torch.no_grad():
        static = (torch.eye(16) + 0.8 * model.base_u.T @ model.base_v).numpy()
    assert np.abs(ta - np.eye(16)).max() > 0.05 and np.allclose(static, ta, atol=1e-4)
    log = read_json(tmp_path / "run" / "quari.json")["log"]
    assert log[0]["epoch"] == 0 and log[0]["stage"] == "static" and log[1]["epoch"] == 1
    # with a held-out split, stage 1 is epoch 0 of the best-epoch choice and is trained without it
    train_quari(qs, t, tof, QuARIConfig(**kw), QuARITrainConfig(**base, val_fraction=0.2, static_init_epochs=20),
                tmp_path / "held", progress=False)
    meta = read_json(tmp_path / "held" / "quari.json")
    assert "val_r1" in meta["log"][0] and meta["held_out"]["val_r1"] >= meta["log"][0]["val_r1"]
    assert meta["log"][0]["val_r1"] > meta["held_out"]["val_r1_zero_shot"]
    assert not np.allclose((torch.eye(16) + 0.8 * load_quari(tmp_path / "held")[0].base_u.T
                            @ load_quari(tmp_path / "held")[0].base_v).detach().numpy(), ta, atol=1e-4)
    with pytest.raises(InputError, match="static_init_epochs needs"):
        train_quari(qs, t, tof, QuARIConfig(**{**kw, "static_rank": 0}),
                    QuARITrainConfig(**base, static_init_epochs=2), tmp_path / "no", progress=False)
    with pytest.raises(InputError, match="static_init_epochs"):
        QuARITrainConfig(static_init_epochs=-1)


def test_learning_rate_warms_up_then_follows_the_cosine():
    from qshift.quari.train import learning_rate

    plain, warm = QuARITrainConfig(lr=1e-3, lr_min=1e-5), QuARITrainConfig(lr=1e-3, lr_min=1e-5, warmup_steps=10)
    assert learning_rate(plain, 0, 100) == pytest.approx(1e-3) and learning_rate(plain, 100, 100) == pytest.approx(1e-5)
    assert learning_rate(warm, 0, 100) == pytest.approx(learning_rate(plain, 0, 100) / 10)
    assert learning_rate(warm, 4, 100) == pytest.approx(learning_rate(plain, 4, 100) / 2)
    assert all(learning_rate(warm, s, 100) == learning_rate(plain, s, 100) for s in range(9, 100))
    with pytest.raises(InputError, match="warmup_steps"):
        QuARITrainConfig(warmup_steps=-1)


def test_semi_positives_exclude_self_and_weights():
    rng = np.random.default_rng(1)
    t = _unit(rng, 50, 8)
    idx, w = semi_positives(t, 10, 2, 0.07)
    assert idx.shape == (50, 2) and (idx != np.arange(50)[:, None]).all()
    sims = (t[:, None] * t[idx]).sum(-1)
    assert (sims[:, 0] >= sims[:, 1] - 1e-6).all() and (w[:, 0] >= w[:, 1]).all() and (w > 0).all()



def test_hard_negatives_are_nearest_non_positives():
    rng = np.random.default_rng(2)
    t, pool = _unit(rng, 40, 8), _unit(rng, 30, 8)
    groups = np.repeat(np.arange(20), 2)
    idx = hard_negative_rows(t, 5, groups, pool)
    cand, cand_g = np.concatenate([t, pool]), np.concatenate([groups, np.full(30, -1)])
    assert idx.shape == (40, 5) and (cand_g[idx] != groups[:, None]).all()      # never the own group
    for i in range(40):                                                           # the 5 nearest others
        sims = cand @ t[i]
        sims[cand_g == groups[i]] = -np.inf
        assert set(idx[i]) == set(np.argsort(-sims)[:5])
    assert (idx >= 40).any()                                                      # the pool takes part
    with pytest.raises(InputError, match="hard negatives"):
        hard_negative_rows(t[:4], 5, groups[:4])


def test_hard_negative_columns_raise_the_loss_unless_masked():
    torch.manual_seed(0)
    model = QuARI(QuARIConfig(dim=8, rank=2, hidden=16, layers=1, heads=2, steps=1, token_dropout=0)).eval()
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    d = torch.nn.functional.normalize(q + 0.1 * torch.randn(4, 8), dim=-1)
    base = quari_loss(model, q, d, None, None, 0.07)
    hard = d.clone()                                   # each row's own positive, as a "negative"
    unmasked = quari_loss(model, q, d, None, None, 0.07, hard)
    own = quari_loss(model, q, d, None, None, 0.07, hard, torch.eye(4, dtype=torch.bool))
    assert unmasked > own > base                       # the own-group copy is left out, the others count
    assert torch.allclose(quari_loss(model, q, d, None, None, 0.07, hard, torch.ones(4, 4, dtype=torch.bool)),
                          base, atol=1e-5)


def test_column_half_of_the_loss_is_optional():
    """column=False: the query-side softmax alone, −mean log p_ii; the default adds the
    column half (over the batch's queries), as Eq. 10."""
    torch.manual_seed(0)
    model = QuARI(QuARIConfig(dim=8, rank=2, hidden=16, layers=1, heads=2, steps=1, token_dropout=0)).eval()
    q = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    d = torch.nn.functional.normalize(q + 0.3 * torch.randn(6, 8), dim=-1)
    with torch.no_grad():
        qp, u, v = model(q)
        s = lowrank_scores(qp, u, v, d, model.cfg.anchor) / 0.07
    lab = torch.arange(6)
    row, col = (torch.nn.functional.cross_entropy(x, lab) for x in (s, s.T))
    with torch.no_grad():
        assert torch.allclose(quari_loss(model, q, d, None, None, 0.07, column=False), row, atol=1e-5)
        assert torch.allclose(quari_loss(model, q, d, None, None, 0.07), (row + col) / 2, atol=1e-5)


def _toy(rng, n=200, e=16, k=2, info=4):
    """Query and target share ``info`` informative dimensions; the other dimensions are
    independent nuisance on each side, so raw cosine is poor and learning to drop them
    (a static map, or a query-adaptive one) helps."""
    z = rng.standard_normal((n, info)).astype(np.float32)
    target_of = np.repeat(np.arange(n), k)
    targets = np.concatenate([z, 1.5 * rng.standard_normal((n, e - info))], 1).astype(np.float32)
    queries = np.concatenate([z[target_of] + 0.2 * rng.standard_normal((n * k, info)),
                              1.5 * rng.standard_normal((n * k, e - info))], 1).astype(np.float32)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return unit(queries), unit(targets), target_of


def test_training_learns_and_checkpoints(tmp_path):
    rng = np.random.default_rng(0)
    q, t, tof = _toy(rng)
    mcfg = QuARIConfig(dim=16, rank=4, hidden=32, layers=1, heads=2, steps=2)
    res = train_quari(q, t, tof, mcfg, QuARITrainConfig(epochs=80, batch_size=50, lr=3e-3, n_neighbors=10, val_fraction=0),
                      tmp_path / "run", backbone="enc#1", progress=False)
    assert res["log"][-1]["loss"] < res["log"][0]["loss"] * 0.8
    model, proj, meta = load_quari(tmp_path / "run", expect_backbone="enc#1")
    assert proj is None and meta["backbone"] == "enc#1"
    qs = q[::2]  # one query per target
    zero = (qs @ t.T).argmax(1)
    learned = quari_scores(model, qs, t).argmax(1)
    assert (learned == np.arange(len(t))).mean() > (zero == np.arange(len(t))).mean() + 0.15
    with pytest.raises(CheckpointMismatchError, match="enc#1"):
        load_quari(tmp_path / "run", expect_backbone="other#2")
    # rerank and full search agree with exact full scores on their top-1
    full = quari_scores(model, qs[:20], t)
    _, lab = quari_rerank(model, qs[:20], t, np.argsort(-full, 1)[:, :30])
    assert (lab[:, 0] == full.argmax(1)).all()
    import faiss

    ix = faiss.IndexFlatIP(16)
    ix.add(t)
    _, lab = quari_search(model, ix, t, qs[:20], k=5, overfetch=80)  # over-fetch = whole gallery
    assert (lab[:, 0] == full.argmax(1)).all()


def test_held_out_targets_pick_the_saved_epoch(tmp_path):
    import torch

    from qshift.quari.train import held_out_r1, split_targets

    rng = np.random.default_rng(0)
    q, t, tof = _toy(rng, n=200)
    mcfg = QuARIConfig(dim=16, rank=4, hidden=32, layers=1, heads=2, steps=2)
    cfg = QuARITrainConfig(epochs=80, batch_size=50, lr=3e-3, n_neighbors=10, val_fraction=0.1)
    res = train_quari(q, t, tof, mcfg, cfg, tmp_path / "run", progress=False)
    vals = [r["val_r1"] for r in res["log"]]
    assert res["val_r1"] == max(vals) and res["best_epoch"] == vals.index(max(vals)) + 1
    assert res["val_r1"] > res["val_r1_zero_shot"] + 10
    _, val = split_targets(np.arange(200), 0.1, cfg.seed)
    assert len(val) == 20 and res["val_pairs"] == 40
    qi = np.flatnonzero(np.isin(tof, val))
    model, _, meta = load_quari(tmp_path / "run")
    again = held_out_r1(model, torch.from_numpy(q[qi]), torch.from_numpy(t[val]), np.searchsorted(val, tof[qi]))
    assert again == pytest.approx(res["val_r1"]) and meta["held_out"]["best_epoch"] == res["best_epoch"]
    # a backbone that is already perfect on the held-out pairs cannot be beaten: the user is told
    with pytest.warns(UserWarning, match="does not beat the backbone"):
        train_quari(t[tof], t, tof, mcfg, QuARITrainConfig(epochs=1, batch_size=20, n_neighbors=10, val_fraction=0.2),
                    tmp_path / "perfect", progress=False)
    with pytest.raises(InputError, match="val_fraction"):
        QuARITrainConfig(val_fraction=0.7)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 7), max_size=40), st.integers(8, 10))
def test_queries_by_target_matches_a_scan(target_of, n_targets):
    from qshift.quari.train import queries_by_target

    target_of = np.array(target_of, dtype=np.int64)
    by_target, usable = queries_by_target(target_of, n_targets)
    assert len(by_target) == n_targets
    for t in range(n_targets):
        assert by_target[t].tolist() == np.flatnonzero(target_of == t).tolist()
    assert usable.tolist() == sorted(set(target_of.tolist()))


def test_groups_of_near_copy_targets():
    from qshift.quari.train import epoch_targets, split_targets

    rng = np.random.default_rng(4)
    base = _unit(rng, 30, 8)
    t = np.repeat(base, 3, axis=0) + 0.01 * rng.standard_normal((90, 8)).astype(np.float32)
    t = (t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float32)
    groups = np.repeat(np.arange(30), 3)                     # three near-copies per group, as T2T caption-means
    idx, w = semi_positives(t, 10, 2, 0.07)
    assert (groups[idx[:, 0]] == groups).all()               # without groups the nearest is a near-copy
    idx, w = semi_positives(t, 10, 2, 0.07, groups)
    assert (groups[idx] != groups[:, None]).all() and (w > 0).all()
    order = epoch_targets(np.arange(90), groups, rng)
    assert sorted(groups[order].tolist()) == list(range(30))  # one target per group, every group
    train, val = split_targets(np.arange(90), 0.2, 0, groups)
    assert len(val) == 18 and not set(groups[train]) & set(groups[val])
    with pytest.raises(InputError, match="groups must give"):
        train_quari(t, t, np.arange(90), QuARIConfig(dim=8, rank=2, hidden=16, layers=1, heads=2),
                    QuARITrainConfig(), "unused", groups=groups[:10], progress=False)


def test_t2t_targets_are_grouped_by_item():
    from qshift.data.collection import Collection
    from qshift.quari.data import target_groups

    coll = Collection("c", ["a", "b"], [["x one", "x two", "x three"], ["y one", "y two"]])
    assert target_groups(coll, "t2t").tolist() == [0, 0, 0, 1, 1] and target_groups(coll, "t2i") is None


def test_caption_clauses_are_short_queries_of_the_same_item():
    from qshift.data.collection import Collection
    from qshift.quari.data import caption_clauses, clause_collection

    assert caption_clauses("A large red star to the left of a blue ring, and two small squares.") == [
        "a large red star", "a blue ring", "two small squares"]
    assert caption_clauses("a picture of four pink triangles") == ["four pink triangles"]
    assert caption_clauses("a red star over a cross, next to a green star") == ["a red star", "a cross",
                                                                               "a green star"]
    assert caption_clauses("a dog and a dog") == ["a dog"]                      # distinct
    assert caption_clauses("red, and a blue kite", min_words=2) == ["a blue kite"]
    coll = Collection("c", ["a", "b"], [["a red star above a blue ring"], ["one green circle"]],
                      source="c.csv", meta={"protocol": {"kind": "inquire"}, "x": 1})
    cl = clause_collection(coll)
    assert cl.ids == coll.ids and cl.captions == [["a red star above a blue ring", "a red star", "a blue ring"],
                                                  ["one green circle"]]
    assert cl.caption_item().tolist() == [0, 0, 0, 1]        # a clause is a query for its own item
    assert cl.source == "" and cl.meta == {"x": 1}           # stored by content, not as the source file
    only = clause_collection(coll, keep_captions=False)
    assert only.captions == [["a red star", "a blue ring"], ["one green circle"]]  # one clause: the caption


def test_bad_training_input(tmp_path):
    rng = np.random.default_rng(0)
    q, t, tof = _toy(rng, n=20)
    q[5, 3] = np.nan
    with pytest.raises(InputError, match=r"queries rows \[5\]"):
        train_quari(q, t, tof, QuARIConfig(dim=16, rank=2, hidden=16, layers=1, heads=2), QuARITrainConfig(),
                    tmp_path, progress=False)
    with pytest.raises(InputError, match="model dim 8"):
        q, t, tof = _toy(rng, n=20)
        train_quari(q, t, tof, QuARIConfig(dim=8, rank=2, hidden=16, layers=1, heads=2), QuARITrainConfig(),
                    tmp_path, progress=False)
    with pytest.raises(InputError, match="out of range"):
        m = QuARI(QuARIConfig(dim=16, rank=2, hidden=16, layers=1, heads=2))
        quari_rerank(m, q[:2], t, np.array([[0, 99], [1, 2]]))
    with pytest.raises(InputError, match="k=50"):
        quari_search(m, None, t, q[:2], k=50)


def test_ta_baseline_and_methods(tmp_path):
    rng = np.random.default_rng(2)
    q, t, tof = _toy(rng, n=200)
    p = train_ta(q, t, tof, epochs=40, batch_size=50, lr=1e-2)
    zs = ((q[::2] @ t.T).argmax(1) == np.arange(200)).mean()
    pq = q[::2] @ p.T
    pt = t @ p.T
    ta = ((pq / np.linalg.norm(pq, axis=1, keepdims=True)) @ (pt / np.linalg.norm(pt, axis=1, keepdims=True)).T)
    assert (ta.argmax(1) == np.arange(200)).mean() > zs + 0.2  # dropping the nuisance dimensions helps
    low = train_ta(q, t, tof, epochs=40, batch_size=50, lr=1e-2, rank=4)       # P = I + AᵀB, rank 4
    assert np.linalg.matrix_rank(low - np.eye(16), tol=1e-4) == 4
    lq, lt = q[::2] @ low.T, t @ low.T
    lo = (lq / np.linalg.norm(lq, axis=1, keepdims=True)) @ (lt / np.linalg.norm(lt, axis=1, keepdims=True)).T
    assert (lo.argmax(1) == np.arange(200)).mean() > zs + 0.1
    with pytest.raises(InputError, match="rank must be in"):
        train_ta(q, t, tof, rank=17)
    save_ta(tmp_path / "ta.safetensors", p)
    from qshift.pipeline import create_stage

    assert create_stage("transform", "ta", {"checkpoint": str(tmp_path / "ta.safetensors")}).name == "ta"
    with pytest.raises(InputError, match="not a trained QuARI"):
        create_stage("transform", "quari", {"checkpoint": str(tmp_path)})


def test_cli_train_ta_and_quari_from_store(image_collection, tmp_path):
    from typer.testing import CliRunner

    from qshift.cli import app
    from qshift.quari.search import load_ta

    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    common = ["-e", "openclip:qshift-tiny-vit", "--store", tmp_path / "store", "--json"]
    r = run("quari", "ta", image_collection, "-o", tmp_path / "ta.safetensors", "--epochs", "2", "--batch-size", "4",
            *common)
    assert r.exit_code == 0, r.output
    assert load_ta(tmp_path / "ta.safetensors").shape[0] == load_ta(tmp_path / "ta.safetensors").shape[1]
    pairs = json.loads(r.stdout)["pairs"]
    r = run("quari", "ta", image_collection, "-o", tmp_path / "ta-cl.safetensors", "--epochs", "1", "--clauses",
            *common)                              # "one square that is red, picture 0" adds two clauses
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["pairs"] == 2 * pairs
    r = run("quari", "ta", image_collection, "-o", tmp_path / "ta-x.safetensors", "--clauses", "--direction", "t2t",
            *common)
    assert r.exit_code != 0 and "--clauses splits the captions" in r.output
    small = ["--rank", "2", "--hidden", "16", "--layers", "1", "--heads", "2", "--steps", "2", "--epochs", "2",
             "--batch-size", "4"]
    r = run("quari", "train", image_collection, "-o", tmp_path / "q", *small, "--ta", tmp_path / "ta.safetensors",
            "--query-residual", "0.9", "--unit-query-head", *common)
    assert r.exit_code == 0, r.output
    model, proj, meta = load_quari(tmp_path / "q")
    assert proj is not None and meta["backbone"].startswith("openclip:qshift-tiny-vit") and model.cfg.rank == 2
    assert model.cfg.query_residual == 0.9 and model.cfg.unit_query_head
    r = run("quari", "train", image_collection, "-o", tmp_path / "q3", *small, "--query-residual", "1.5", *common)
    assert r.exit_code != 0 and "query_residual must be in [0, 1]" in r.output
    r = run("quari", "train", image_collection, "-o", tmp_path / "q4", *small, "--identity-init", "--no-column-loss",
            "--tied-query", "--static-base", "--static-rank", 3, "--static-lr-scale", 4, "--warmup-steps", 3,
            "--static-init-epochs", 2, *common)
    assert r.exit_code == 0, r.output
    assert load_quari(tmp_path / "q4")[0].cfg.identity_init and load_quari(tmp_path / "q4")[0].cfg.tied_query
    assert load_quari(tmp_path / "q4")[0].cfg.static_base and load_quari(tmp_path / "q4")[0].cfg.static_rank == 3
    assert read_json(tmp_path / "q4" / "quari.json")["train"]["column_loss"] is False
    assert read_json(tmp_path / "q4" / "quari.json")["train"]["warmup_steps"] == 3
    assert read_json(tmp_path / "q4" / "quari.json")["train"]["static_lr_scale"] == 4
    assert read_json(tmp_path / "q4" / "quari.json")["log"][0]["stage"] == "static"
    r = run("quari", "train", image_collection, "-o", tmp_path / "q5", *small, "--identity-init", "--unit-query-head",
            *common)
    assert r.exit_code != 0 and "identity_init needs" in r.output
    r = run("quari", "train", image_collection, "-o", tmp_path / "q2", "--direction", "i2t", *common)
    assert r.exit_code != 0 and "direction must be one of t2i, t2t" in r.output


def test_training_with_hard_negatives_and_a_pool(tmp_path):
    rng = np.random.default_rng(0)
    q, t, tof = _toy(rng, n=100)
    mcfg = QuARIConfig(dim=16, rank=4, hidden=32, layers=1, heads=2, steps=1)
    cfg = QuARITrainConfig(epochs=30, batch_size=25, lr=3e-3, n_neighbors=10, hard_negatives=4, val_fraction=0)
    res = train_quari(q, t, tof, mcfg, cfg, tmp_path / "run", progress=False, negatives=_unit(rng, 50, 16))
    assert np.isfinite([r["loss"] for r in res["log"]]).all()
    assert res["log"][-1]["loss"] < res["log"][0]["loss"] * 0.9
    model, _, _ = load_quari(tmp_path / "run")
    qs = q[::2]
    assert (quari_scores(model, qs, t).argmax(1) == np.arange(len(t))).mean() > ((qs @ t.T).argmax(1) ==
                                                                                np.arange(len(t))).mean()
    with pytest.raises(InputError, match="negatives must be an N × 16"):
        train_quari(q, t, tof, mcfg, cfg, tmp_path / "bad", progress=False, negatives=_unit(rng, 5, 8))
    with pytest.raises(InputError, match="hard_negatives must be >= 0"):
        QuARITrainConfig(hard_negatives=-1)
