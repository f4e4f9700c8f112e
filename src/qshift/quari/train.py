"""Training QuARI and the static task-adaptation baseline from stored embeddings only
(no encoder in the loop) — QuARI §3.3.

* Pairs (q_i, d_i): a query embedding and its target embedding (T2I: a caption and
  its image; T2T: a caption and the mean of the item's other captions). Each epoch uses
  one query per target, so a batch never holds the same target twice. Targets may come
  in ``groups`` (T2T: the five caption-means of one item, near-copies at cos ≈ 0.97):
  then each epoch draws one target per group, so that no batch holds a near-copy of a
  positive as a negative, semi-positives come from other groups, and whole groups are
  held out.
* Query noise (Eq. 8, after LinCIR): q ← q + U[0,1]·ε before normalisation. The paper's
  ε ~ N(0, I) is relative to unnormalised CLIP features; qshift's embeddings are unit
  vectors, so ε ~ N(0, σ²I) with σ = ``noise_std`` (default 1/√E: ‖ε‖ ≈ ‖q‖).
* Semi-positives (Eq. 10): for every target its 100 nearest targets (FAISS, backbone
  space, itself excluded); the top 2 join the batch's candidate columns with weight
  α = softmax(cos / τ_sp) over the 100 (τ_sp = the contrastive τ; the paper does not
  give one).
* Hard negatives (reconstruction, off by default: ``hard_negatives`` = 0): the paper's
  batches hold random in-batch negatives only, which a few thousand instances make easy;
  for instance retrieval, whose galleries hold near-duplicates, every target's
  ``hard_negatives`` nearest non-positives (backbone space; other groups' training targets
  and an optional ``negatives`` pool, e.g. the train split's near-duplicate distractors)
  join the batch as columns with α = 0. Validation picks whether to use them.
* Loss (Eq. 9–10): S_ij = cos(q'_i, T_i d_j) / τ (τ = 0.07) over the batch's targets and
  semi-positives, symmetric: rows over all candidate columns with targets α, columns
  over the batch's queries for the positives.
* ``column_loss=False`` (reconstruction, on by default as in the paper): drop the column
  half. Each row is scored through its own T_i, so a column's softmax compares scores made
  by different transforms — a per-query change of scale or offset lowers it without
  changing any query's ranking. Validation decides.
* AdamW (weight decay 1e-2) with a cosine schedule, after ``warmup_steps`` of linear
  warm-up (reconstruction, 0 by default: the paper names no warm-up; a transformer trained
  at qshift's larger rate for hundreds of epochs may need one). The paper's rate (1e-5 → 2e-7) is for
  millions of pairs; with thousands, qshift defaults to 3e-4 → 3e-6 (documented choice).
* ``static_lr_scale`` (reconstruction, 1 by default): with the model's ``static_base``, U₀ and
  V₀ learn at this multiple of the rate. Why: on World-ILIAS the static rank-32 map alone
  (TA of QuARI's form) reaches 54.8 val mAP@1k in 300 epochs at a constant 1e-3, while
  inside QuARI, at the same schedule as the hypernetwork, U₀ stays small (its part alone
  49.3, zero-shot 47.9). Measured: at 10× U₀ grows (‖U₀‖ 8.1 against 1.9) but its part alone
  reaches only 50.1 and the whole model falls to 51.95 (52.90 at 1), so the default stays 1.
* ``static_init_epochs`` (reconstruction, 0 by default = off): two-stage training for a
  ``static_rank`` model. Stage 1 fits U₀, V₀ alone as the rank-r₀ TA map (:func:`train_ta`'s
  recipe — symmetric InfoNCE, AdamW at 1e-3, no weight decay — for this many epochs, on the
  training targets only); since an ``identity_init`` model starts with a zero per-query part,
  the model then *is* that static map, and stage 2 trains everything from there. The
  held-out check scores the stage-1 model as epoch 0, so the saved weights are never worse
  on the held-out targets than the static map alone. Why: within QuARI's loss the static
  part stays near zero-shot (World-ILIAS val-10k: its part alone 28.2, zero-shot 28.3) while
  the same rank-128 map trained as TA reaches 37.1 in 300 epochs; the paper starts from a
  backbone whose static gap is already small and names no such stage. Measured on val-10k
  (World-ILIAS pick, 300 + 300 epochs): 40.20 mAP@1k against 31.80 without stage 1 (TA full
  rank 37.89) — but its static part alone scores 40.12: the gain is the static map's, and
  the per-query part adds 0.08. Test (3 seeds): 40.14 ± 0.16 on 10k (zero-shot 27.89, TA
  43.51; static part alone 40.13) and 23.37 ± 0.21 on 100k (zero-shot 13.56, TA 26.76).
* Held-out check (not in the paper, which trains on millions of pairs): ``val_fraction``
  of the targets (of the groups, when given; at most 1,000) and their queries are kept out
  of training; after every epoch their R@1 among the held-out targets is measured, the
  best epoch's weights are the ones saved, and the backbone's own R@1 on them is logged
  beside it — with a few thousand pairs the hypernetwork can over-fit, and a user must
  see when it does not beat the backbone.

The TA baseline is one linear map P (E × E, identity at the start) applied to queries
and gallery alike, trained with the symmetric InfoNCE on the same pairs; "TA + QuARI"
trains QuARI on P-projected features.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qshift.errors import CheckpointMismatchError, InputError
from qshift.io import atomic_path, read_json, write_json
from qshift.progress import progress_bar
from qshift.quari.model import QuARI, QuARIConfig
from qshift.quari.scoring import lowrank_scores


@dataclass(frozen=True)
class QuARITrainConfig:
    epochs: int = 10
    batch_size: int = 320
    lr: float = 3e-4
    lr_min: float = 3e-6
    weight_decay: float = 1e-2
    temperature: float = 0.07
    noise: bool = True
    noise_std: float | None = None
    semi_positives: bool = True
    n_neighbors: int = 100
    n_semi: int = 2
    hard_negatives: int = 0      # per target, nearest non-positives as extra columns (reconstruction)
    column_loss: bool = True     # the − log q_ji half of Eq. 10 (off: query-side softmax only; reconstruction)
    warmup_steps: int = 0        # linear warm-up before the cosine schedule (reconstruction)
    static_lr_scale: float = 1.0  # static_base's U₀, V₀ learn at lr × this (reconstruction)
    static_init_epochs: int = 0  # > 0: stage 1 fits U₀, V₀ alone as a TA map first (reconstruction)
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise InputError(f"quari train: epochs >= 1 and batch_size >= 2 needed, got {self.epochs}, "
                             f"{self.batch_size}")
        if not 0 < self.lr < 1:
            raise InputError(f"quari train: lr must be in (0, 1), got {self.lr}")
        if self.hard_negatives < 0:
            raise InputError(f"quari train: hard_negatives must be >= 0, got {self.hard_negatives}")
        if not self.static_lr_scale > 0:
            raise InputError(f"quari train: static_lr_scale must be > 0, got {self.static_lr_scale}")
        if self.warmup_steps < 0:
            raise InputError(f"quari train: warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.static_init_epochs < 0:
            raise InputError(f"quari train: static_init_epochs must be >= 0, got {self.static_init_epochs}")
        if not 0 <= self.val_fraction <= 0.5:
            raise InputError(f"quari train: val_fraction must be in [0, 0.5], got {self.val_fraction}")

    @staticmethod
    def from_dict(d: dict) -> "QuARITrainConfig":
        known = {f.name for f in fields(QuARITrainConfig)}
        if set(d) - known:
            raise InputError(f"quari train: unknown keys {sorted(set(d) - known)}; known: {sorted(known)}")
        return QuARITrainConfig(**d)


def check_pairs(queries: np.ndarray, targets: np.ndarray, target_of: np.ndarray,
                groups: np.ndarray | None = None) -> None:
    for name, arr in (("queries", queries), ("targets", targets)):
        if arr.ndim != 2:
            raise InputError(f"quari: {name} must be a 2-D array, got shape {arr.shape}")
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
        if bad.size:
            raise InputError(f"quari: {name} rows {bad[:10].tolist()} contain NaN/inf")
    if queries.shape[1] != targets.shape[1]:
        raise InputError(f"quari: query dim {queries.shape[1]} ≠ target dim {targets.shape[1]}")
    if len(target_of) != len(queries) or (len(target_of) and (target_of.min() < 0 or target_of.max() >= len(targets))):
        raise InputError("quari: target_of must give a valid target index for every query")
    if groups is not None and (groups.shape != (len(targets),) or (len(groups) and groups.min() < 0)):
        raise InputError(f"quari: groups must give a non-negative group id for each of the {len(targets)} targets")


def semi_positives(targets: np.ndarray, n_neighbors: int, n_semi: int, tau: float,
                   groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``n_semi`` neighbours of every target among its ``n_neighbors`` nearest (itself,
    and targets of its own group, excluded) and their weights α."""
    import faiss

    groups = np.arange(len(targets)) if groups is None else groups
    k = min(n_neighbors + 1 + int(np.bincount(groups).max()) - 1, len(targets))
    index = faiss.IndexFlatIP(targets.shape[1])
    index.add(np.ascontiguousarray(targets, dtype=np.float32))
    sims, idx = index.search(np.ascontiguousarray(targets, dtype=np.float32), k)
    own = (idx < 0) | (groups[np.maximum(idx, 0)] == groups[:, None])
    sims = np.where(own, -np.inf, sims)
    order = np.argsort(-sims, axis=1, kind="stable")
    keep = min(n_neighbors, k - 1)
    sims, idx = np.take_along_axis(sims, order, 1)[:, :keep], np.take_along_axis(idx, order, 1)[:, :keep]
    w = np.nan_to_num(torch.softmax(torch.from_numpy(sims / tau), dim=1).numpy())    # a row of only -inf: 0
    return idx[:, :n_semi], w[:, :n_semi].astype(np.float32)


def hard_negative_rows(targets: np.ndarray, n: int, groups: np.ndarray | None = None,
                       pool: np.ndarray | None = None) -> np.ndarray:
    """The ``n`` nearest non-positives of every target (backbone cosine): rows of
    ``targets`` of another group, or of ``pool`` (numbered after the targets)."""
    import faiss

    groups = np.arange(len(targets)) if groups is None else groups
    cand = targets if pool is None else np.concatenate([targets, pool])
    cand_groups = np.concatenate([groups, np.full(len(cand) - len(targets), -1)])
    if len(cand) - int(np.bincount(groups).max()) < n:
        raise InputError(f"quari: {n} hard negatives per target need more candidates than the {len(cand)} given")
    k = min(n + int(np.bincount(groups).max()), len(cand))
    index = faiss.IndexFlatIP(cand.shape[1])
    index.add(np.ascontiguousarray(cand, dtype=np.float32))
    sims, idx = index.search(np.ascontiguousarray(targets, dtype=np.float32), k)
    sims = np.where((idx < 0) | (cand_groups[np.maximum(idx, 0)] == groups[:, None]), -np.inf, sims)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :n]
    return np.take_along_axis(idx, order, 1)


def quari_loss(model: QuARI, q: torch.Tensor, d: torch.Tensor, semi: torch.Tensor | None,
               alpha: torch.Tensor | None, tau: float, hard: torch.Tensor | None = None,
               hard_mask: torch.Tensor | None = None, column: bool = True) -> torch.Tensor:
    """Eq. 9–10 for one batch: q, d (B × E); semi (B·n_semi × E) with weights alpha (B × n_semi);
    ``hard``: extra negative columns (α = 0), ``hard_mask`` (B × len(hard)): True where a
    hard column belongs to that row's own group (left out of its softmax). ``column=False``
    drops the − log q_ii half (see :class:`QuARITrainConfig`)."""
    b = len(q)
    qp, u, v = model(q)
    cols = torch.cat([x for x in (d, semi, hard) if x is not None])
    s = lowrank_scores(qp, u, v, cols, model.cfg.anchor) / tau                        # S_ij = cos(q'_i, T_i d_j) / τ
    if hard is not None and hard_mask is not None:
        s = torch.cat([s[:, :len(cols) - len(hard)], s[:, len(cols) - len(hard):].masked_fill(hard_mask, -1e4)], 1)
    target = torch.zeros_like(s)
    target[torch.arange(b), torch.arange(b)] = 1.0                    # α_ii = 1
    if semi is not None and alpha is not None:
        n = alpha.shape[1]
        rows = torch.arange(b).repeat_interleave(n)
        target[rows, b + torch.arange(b * n)] = alpha.reshape(-1)      # α_ij = w_ij for semi-positives
    row = -(target * s.log_softmax(dim=1)).sum(1)                     # − Σ_j α_ij log p_ij
    if not column:
        return row.sum() / b
    col = -s[:, :b].log_softmax(dim=0).diagonal()                     # − log q_ii (over the batch's queries)
    return (row.sum() + col.sum()) / (2 * b)


def learning_rate(cfg: QuARITrainConfig, step: int, total: int) -> float:
    """Cosine annealing from ``lr`` to ``lr_min`` over ``total`` steps, scaled by a linear
    warm-up over the first ``warmup_steps``."""
    cosine = cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * step / max(1, total)))
    return cosine * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cosine


VAL_MAX_TARGETS, VAL_MAX_QUERIES = 1000, 2000


def queries_by_target(target_of: np.ndarray, n_targets: int) -> tuple[list[np.ndarray], np.ndarray]:
    """(the query rows of every target, the targets that have at least one query), in
    O(N log N) (a scan per target would be O(targets × queries))."""
    counts = np.bincount(target_of, minlength=n_targets)
    by_target = np.split(np.argsort(target_of, kind="stable"), np.cumsum(counts)[:-1])
    return by_target, np.flatnonzero(counts)


def split_targets(usable: np.ndarray, fraction: float, seed: int,
                  groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(training targets, held-out targets): ``fraction`` of the groups of ``usable`` (at
    most 1,000 groups) held out with all their targets."""
    g = usable if groups is None else groups[usable]
    names = np.unique(g)
    n_val = min(VAL_MAX_TARGETS, int(round(len(names) * fraction)))
    if n_val < 2 or len(names) - n_val < 2:
        return usable, usable[:0]
    held = np.isin(g, np.random.default_rng([seed, 1]).permutation(names)[:n_val])
    return usable[~held], usable[held]


def epoch_targets(usable: np.ndarray, groups: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """This epoch's targets in random order: every usable target, or one per group."""
    order = rng.permutation(usable)
    if groups is None:
        return order
    _, first = np.unique(groups[order], return_index=True)
    return order[np.sort(first)]


@torch.no_grad()
def held_out_r1(model: QuARI | None, q: torch.Tensor, d: torch.Tensor, target_of: np.ndarray,
                groups: np.ndarray | None = None) -> float:
    """R@1 (%) of queries ``q`` among targets ``d`` (query i's target: row ``target_of[i]``;
    with ``groups`` of the rows of ``d``, any target of the right group counts);
    ``model=None`` scores with the backbone's cosine."""
    groups = np.arange(len(d)) if groups is None else groups
    hits = 0
    for s in range(0, len(q), 256):
        qb = q[s:s + 256]
        if model is None:
            scores = qb @ d.T
        else:
            was = model.training
            model.eval()
            scores = lowrank_scores(*model(qb), d, model.cfg.anchor)
            model.train(was)
        hits += int((groups[scores.argmax(1).numpy()] == groups[target_of[s:s + 256]]).sum())
    return 100.0 * hits / max(1, len(q))


def train_quari(queries: np.ndarray, targets: np.ndarray, target_of: np.ndarray, model_cfg: QuARIConfig,
                cfg: QuARITrainConfig, out_dir: str | Path, *, backbone: str = "", progress: bool = True,
                projection: np.ndarray | None = None, groups: np.ndarray | None = None,
                negatives: np.ndarray | None = None) -> dict:
    """Train (or resume) QuARI; writes ``model.safetensors`` + ``quari.json`` into ``out_dir``.
    ``groups``: the group of every target (see the module's docstring), or None;
    ``negatives``: a pool of non-relevant vectors for ``cfg.hard_negatives``."""
    check_pairs(queries, targets, target_of, groups)
    if model_cfg.dim != queries.shape[1]:
        raise InputError(f"quari: model dim {model_cfg.dim} ≠ embedding dim {queries.shape[1]}")
    out_dir = Path(out_dir)
    if cfg.static_lr_scale != 1 and not model_cfg.static_base:
        raise InputError("quari train: static_lr_scale needs the model's static_base (U₀, V₀)")
    if cfg.static_init_epochs and not model_cfg.static_rank:
        raise InputError("quari train: static_init_epochs needs the model's static_rank (U₀, V₀ appended, with "
                         "identity_init: only then is the model at the start of stage 2 the static map alone)")
    out_dir.mkdir(parents=True, exist_ok=True)
    if negatives is not None and (negatives.ndim != 2 or negatives.shape[1] != targets.shape[1]):
        raise InputError(f"quari: negatives must be an N × {targets.shape[1]} array, got shape {negatives.shape}")
    if projection is not None:
        queries, targets = project(queries, projection), project(targets, projection)
        negatives = None if negatives is None else project(negatives, projection)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = QuARI(model_cfg)
    static = [p for n, p in model.named_parameters() if n in ("base_u", "base_v")]
    rest = [p for n, p in model.named_parameters() if n not in ("base_u", "base_v")]
    param_groups = [{"params": rest, "scale": 1.0}]
    if static:                                                              # static_base's U₀, V₀
        param_groups.append({"params": static, "scale": cfg.static_lr_scale})
    opt = torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    qt, dt = torch.from_numpy(queries.astype(np.float32)), torch.from_numpy(targets.astype(np.float32))
    by_target, usable = queries_by_target(target_of, len(targets))
    usable, val = split_targets(usable, cfg.val_fraction, cfg.seed, groups)
    sp_idx = sp_w = None
    if cfg.semi_positives and len(usable) > cfg.n_semi + 1:                 # among training targets only
        local_idx, local_w = semi_positives(targets[usable], cfg.n_neighbors, cfg.n_semi, cfg.temperature,
                                            None if groups is None else groups[usable])
        sp_idx = np.zeros((len(targets), cfg.n_semi), np.int64)
        sp_w = np.zeros((len(targets), cfg.n_semi), np.float32)
        sp_idx[usable], sp_w[usable] = usable[local_idx], local_w
    hard_t = hn_idx = None
    if cfg.hard_negatives:                                                  # among training targets + pool
        extra = 0 if sp_idx is None else cfg.n_semi              # a semi-positive is never also a negative
        local = hard_negative_rows(targets[usable], cfg.hard_negatives + extra,
                                   None if groups is None else groups[usable], negatives)
        rows = np.concatenate([usable, len(targets) + np.arange(0 if negatives is None else len(negatives))])[local]
        if extra:
            keep = ~(rows[:, :, None] == sp_idx[usable][:, None, :]).any(2)
            rows = np.stack([r[k][:cfg.hard_negatives] for r, k in zip(rows, keep)])
        hn_idx = np.zeros((len(targets), cfg.hard_negatives), np.int64)
        hn_idx[usable] = rows
        hard_t = dt if negatives is None else torch.cat([dt, torch.from_numpy(negatives.astype(np.float32))])
        hard_g = np.concatenate([np.arange(len(targets)) if groups is None else groups,
                                 np.full(len(hard_t) - len(targets), -1)])
    val_qi = np.concatenate([by_target[t] for t in val]).astype(np.int64)[:VAL_MAX_QUERIES] if len(val) else None
    if val_qi is not None:
        val_pos = np.searchsorted(val, target_of[val_qi])
        val_q, val_d, val_g = qt[val_qi], dt[val], None if groups is None else groups[val]
        val_zero_shot = held_out_r1(None, val_q, val_d, val_pos, val_g)
    per_epoch = len(usable) if groups is None else len(np.unique(groups[usable]))     # = len(epoch_targets(...))
    steps_per_epoch = max(1, per_epoch // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sigma = cfg.noise_std if cfg.noise_std is not None else 1.0 / math.sqrt(model_cfg.dim)
    state_path, log, start, best = out_dir / "state.pt", [], 0, None

    def held_out_check(entry: dict) -> None:
        """Score the model on the held-out targets into ``entry``; keep its weights if best so far."""
        nonlocal best
        if val_qi is None:
            return
        entry["val_r1"] = held_out_r1(model, val_q, val_d, val_pos, val_g)
        if best is None or entry["val_r1"] > best["val_r1"]:
            best = {"epoch": entry["epoch"], "val_r1": entry["val_r1"],
                    "model": {k: v.clone() for k, v in model.state_dict().items()}}

    if state_path.is_file():
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        start, log, best = st["epoch"], st["log"], st.get("best")
    if cfg.static_init_epochs and start == 0:                              # stage 1: U₀, V₀ as a TA map
        t0 = time.perf_counter()
        fit_static(model, queries, targets, target_of, usable, cfg, groups)
        entry = {"epoch": 0, "stage": "static", "seconds": time.perf_counter() - t0}
        held_out_check(entry)
        log.append(entry)
    step = start * steps_per_epoch
    for epoch in range(start, cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch])
        order = epoch_targets(usable, groups, rng)
        t0, losses = time.perf_counter(), []
        model.train()
        with progress_bar(f"quari epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch, progress) as bar:
            for b in range(steps_per_epoch):
                tgt = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                qi = np.array([rng.choice(by_target[t]) for t in tgt])
                q = qt[qi]
                if cfg.noise:                                               # Eq. 8
                    q = q + torch.rand(len(q), 1) * sigma * torch.randn_like(q)
                q = F.normalize(q, dim=-1)
                semi = alpha = None
                if sp_idx is not None:
                    semi = dt[sp_idx[tgt].reshape(-1)]
                    alpha = torch.from_numpy(sp_w[tgt])
                for g in opt.param_groups:                                  # warm-up, then cosine schedule
                    g["lr"] = learning_rate(cfg, step, total) * g.get("scale", 1.0)
                hard = mask = None
                if hn_idx is not None:                    # another row's own group is not its negative
                    cols = hn_idx[tgt].reshape(-1)
                    hard = hard_t[cols]
                    own = tgt if groups is None else groups[tgt]
                    mask = torch.from_numpy(hard_g[cols][None, :] == own[:, None])
                loss = quari_loss(model, q, dt[tgt], semi, alpha, cfg.temperature, hard, mask, cfg.column_loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                step += 1
                bar.advance(1)
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": time.perf_counter() - t0}
        held_out_check(entry)
        log.append(entry)
        with atomic_path(state_path) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1, "log": log,
                        "best": best}, tmp)
    result = {"log": log, "train_seconds": sum(r["seconds"] for r in log)}
    if best is not None:
        model.load_state_dict(best["model"])
        result.update(best_epoch=best["epoch"], val_r1=best["val_r1"], val_r1_zero_shot=val_zero_shot,
                      val_pairs=len(val_qi))
        if best["val_r1"] <= val_zero_shot:
            warnings.warn(f"quari: on {len(val_qi)} held-out pairs QuARI's best R@1 ({best['val_r1']:.1f}) does not "
                          f"beat the backbone's ({val_zero_shot:.1f}); more or more varied training pairs are needed",
                          stacklevel=2)
    held_out = {k: v for k, v in result.items() if k.startswith(("best", "val"))}
    save_quari(model, out_dir, backbone, cfg, projection, log, held_out)
    return result


def fit_static(model: QuARI, queries: np.ndarray, targets: np.ndarray, target_of: np.ndarray,
               usable: np.ndarray, cfg: QuARITrainConfig, groups: np.ndarray | None = None) -> None:
    """Stage 1 of ``static_init_epochs``: U₀, V₀ of a ``static_rank`` model set to the rank-r₀
    TA map I + AᵀB fitted on the training targets ``usable`` (U₀ = A / a, V₀ = B, so that
    T₀ = I + a·U₀ᵀV₀ is that map)."""
    keep = np.isin(target_of, usable)
    left, right = ta_factors(queries[keep], targets, target_of[keep], model.cfg.static_rank,
                             epochs=cfg.static_init_epochs, batch_size=cfg.batch_size,
                             temperature=cfg.temperature, seed=cfg.seed, groups=groups)
    with torch.no_grad():
        model.base_u.copy_(left / model.cfg.anchor)
        model.base_v.copy_(right)


def project(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Rows of ``x`` mapped by the TA projection P and renormalised."""
    from qshift.retrieval import normalize_rows

    return normalize_rows(x @ p.T)


def save_quari(model: QuARI, out_dir: Path, backbone: str, cfg: QuARITrainConfig | None,
               projection: np.ndarray | None, log: list, held_out: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if projection is not None:
        tensors["ta_projection"] = torch.from_numpy(np.ascontiguousarray(projection, dtype=np.float32))
    with atomic_path(out_dir / "model.safetensors", suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_json(out_dir / "quari.json", {"model": model.cfg.to_dict(), "train": asdict(cfg) if cfg else None,
                                        "backbone": backbone, "log": log, "held_out": held_out or None})


def load_quari(path: str | Path, expect_backbone: str | None = None) -> tuple[QuARI, np.ndarray | None, dict]:
    """A trained QuARI (and its TA projection, if trained on projected features)."""
    from safetensors.torch import load_file

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    meta = read_json(folder / "quari.json")
    if expect_backbone is not None and meta.get("backbone") and meta["backbone"] != expect_backbone:
        raise CheckpointMismatchError(f"{folder}: QuARI was trained on embeddings of {meta['backbone']}, "
                                      f"not {expect_backbone}")
    model = QuARI(QuARIConfig(**meta["model"]))
    state = load_file(str(folder / "model.safetensors"))
    proj = state.pop("ta_projection", None)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointMismatchError(f"{folder}: weights do not match quari.json ({str(exc)[:200]})") from None
    model.eval()
    return model, None if proj is None else proj.numpy(), meta


def train_ta(queries: np.ndarray, targets: np.ndarray, target_of: np.ndarray, epochs: int = 10,
             batch_size: int = 320, lr: float = 1e-3, temperature: float = 0.07, seed: int = 0,
             progress: bool = False, groups: np.ndarray | None = None, rank: int | None = None) -> np.ndarray:
    """The static task-adaptation baseline: one linear map P for queries and gallery
    (batches as QuARI's: one target per group). ``rank`` r: P = I + AᵀB with A, B ∈ R^{r×E}
    (A zero at the start, so P = I), the static map of the form QuARI's T = I + UᵀV takes."""
    e = queries.shape[1]
    if rank is not None:                                        # ta_factors checks the pairs
        left, right = ta_factors(queries, targets, target_of, rank, epochs, batch_size, lr, temperature, seed,
                                 progress, groups)
        return (torch.eye(e) + left.T @ right).numpy()
    check_pairs(queries, targets, target_of, groups)
    torch.manual_seed(seed)
    full = torch.nn.Parameter(torch.eye(e))
    _fit_ta([full], lambda: full, queries, targets, target_of, epochs, batch_size, lr, temperature, seed,
            progress, groups)
    return full.detach().numpy()


def ta_factors(queries: np.ndarray, targets: np.ndarray, target_of: np.ndarray, rank: int, epochs: int = 10,
               batch_size: int = 320, lr: float = 1e-3, temperature: float = 0.07, seed: int = 0,
               progress: bool = False, groups: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` TA map P = I + AᵀB as its factors (A, B), each rank × E."""
    check_pairs(queries, targets, target_of, groups)
    e = queries.shape[1]
    if not 1 <= rank <= e:
        raise InputError(f"quari ta: rank must be in [1, {e}], got {rank}")
    torch.manual_seed(seed)
    left = torch.nn.Parameter(torch.zeros(rank, e))
    right = torch.nn.Parameter(torch.randn(rank, e) / math.sqrt(e))
    _fit_ta([left, right], lambda: torch.eye(e) + left.T @ right, queries, targets, target_of, epochs, batch_size,
            lr, temperature, seed, progress, groups)
    return left.detach(), right.detach()


def _fit_ta(params: list, weight, queries: np.ndarray, targets: np.ndarray, target_of: np.ndarray, epochs: int,
            batch_size: int, lr: float, temperature: float, seed: int, progress: bool,
            groups: np.ndarray | None) -> None:
    """TA's loop: ``weight()`` (the map P from ``params``) trained with the symmetric InfoNCE."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    qt, dt = torch.from_numpy(queries.astype(np.float32)), torch.from_numpy(targets.astype(np.float32))
    by_target, usable = queries_by_target(target_of, len(targets))
    with progress_bar("train TA", epochs, progress) as bar:
        for epoch in range(epochs):
            rng = np.random.default_rng([seed, epoch])
            order = epoch_targets(usable, groups, rng)
            for b in range(max(1, len(order) // batch_size)):
                tgt = order[b * batch_size:(b + 1) * batch_size]
                qi = np.array([rng.choice(by_target[t]) for t in tgt])
                p = weight()
                zq = F.normalize(qt[qi] @ p.T, dim=-1)
                zd = F.normalize(dt[tgt] @ p.T, dim=-1)
                s = zq @ zd.T / temperature
                lab = torch.arange(len(tgt))
                loss = (F.cross_entropy(s, lab) + F.cross_entropy(s.T, lab)) / 2
                opt.zero_grad()
                loss.backward()
                opt.step()
            bar.advance(1)


def describe(path: Path) -> str:
    return json.dumps(read_json(path / "quari.json")["model"])
