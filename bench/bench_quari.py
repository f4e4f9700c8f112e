"""QuARI benchmarks (issue 7): accuracy of zero-shot / TA / QuARI / TA+QuARI and the three
ablations, and the latency of low-rank scoring, re-ranking and full search.

    .venv/bin/python bench/bench_quari.py accuracy --testbed world --encoder world:mini-clip
    .venv/bin/python bench/bench_quari.py accuracy --testbed world-pixel --epochs 60 --seeds 0,1,2
    .venv/bin/python bench/bench_quari.py accuracy --testbed coco
    .venv/bin/python bench/bench_quari.py accuracy --testbed world-ilias --epochs 60 --seeds 0,1,2
    .venv/bin/python bench/bench_quari.py accuracy --testbed world-ilias-100k --epochs 60 --seeds 0,1,2
    .venv/bin/python bench/bench_quari.py accuracy --testbed world-inquire --epochs 60 --seeds 0,1,2
    .venv/bin/python bench/bench_quari.py accuracy --testbed world-ilias-val --model query_residual=0.9,anchor=0.2
    .venv/bin/python bench/bench_quari.py accuracy --testbed world-ilias-val --train hard_negatives=8
    .venv/bin/python bench/bench_quari.py accuracy --testbed world-ilias-val --epochs 10 --ta-epochs 2000
    .venv/bin/python bench/bench_quari.py ta-budget --testbed world-ilias-val --ta-epochs 10,60,250,1000,2000
    .venv/bin/python bench/bench_quari.py ta-budget --testbed world-ilias-val --ta-epochs 25,100,300,1000 --ta-rank 32
    .venv/bin/python bench/bench_quari.py accuracy --testbed world-ilias --epochs 10 --ta-epochs 2000 \
        --variants "QuARI,TA + QuARI,w/o iterative generation,w/o semi-positives,w/o noise,TA + QuARI w/o noise"
    .venv/bin/python bench/bench_quari.py accuracy --testbed world-ilias-val --train-instances 20000 --variants QuARI
    .venv/bin/python bench/bench_quari.py ta-anatomy --testbed world-ilias-val --ta-epochs 2000
    .venv/bin/python bench/bench_quari.py inquire-ceiling
    .venv/bin/python bench/bench_quari.py latency

Accuracy trains on the training split (world: train; world-pixel: the held-out pixel
style's val split, a domain the backbone never saw; COCO: the 1k-image dev captions;
world-ilias / world-inquire: QuARI's own protocols, :mod:`qshift.world.protocols`, trained
on their train split — ILIAS instances never in the test set, INQUIRE query templates
never in the test set) from stored embeddings and reports on the test split. Runs go to
runs/bench/quari-<training set>/ and are reused when present (delete them to retrain):
world-ilias-100k scores the checkpoints of world-ilias on a 100k gallery and adds full
search through FAISS (queries/s, recall of the exact QuARI top-k). ``--model`` overrides
hypernetwork fields (e.g. how far q' and T may move from the backbone's query and the
identity: ``query_residual``, ``anchor``) and ``--train`` training fields (e.g.
``hard_negatives``); both tag the run folder and the result key. ``--ta-epochs`` gives TA its
own budget (a linear map needs far more steps than the hypernetwork, whose val score stops
improving within tens of epochs); it also sets the TA features of "TA + QuARI".
``--train-instances N`` trains World-ILIAS on ``world-ilias:train-iN`` (default 2,000
instances). ``ta-anatomy`` asks what QuARI would have to express to match TA (TA is QuARI's
score cos(q', T d) with q' = Wq, T = W): the parts, QuARI's λ-mix and rank-r truncations.
``--train-set captions|clauses`` trains World-INQUIRE on the world's caption pairs (and their
clauses) instead of the train templates. ``inquire-ceiling`` measures what any linear scoring of
the images could win on World-INQUIRE's test templates (oracle rows: a ceiling, not a method).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, previous_results, md_table, timeit, write_results  # noqa: E402

from qshift.io import read_json, write_json  # noqa: E402

RUNS = Path(os.environ.get("QSHIFT_BENCH_RUNS", "runs/bench"))
# CPU-sized hypernetwork (the paper's 4 layers × hidden 512 × rank 64 × 4 steps is for a GPU)
MODEL = dict(rank=32, hidden=64, layers=2, heads=4, steps=3)
LR = 1e-3  # with ~10³ steps instead of the paper's ~10⁵ a larger rate than the CLI's 3e-4
BATCH = 128  # the paper's ≈320 makes each CPU step ~6× dearer (scores grow with batch²)
RERANK_K = 100
RERANK_ROW = f"QuARI, re-rank top-{RERANK_K}"
STATIC_ROW = "QuARI, static part only"  # a static_base model with U = U₀, V = V₀ for every query
VARIANTS = {  # name: (model overrides, train overrides, on TA features)
    "QuARI": ({}, {}, False),
    "TA + QuARI": ({}, {}, True),
    "w/o iterative generation": ({"one_step": True}, {}, False),
    "w/o semi-positives": ({}, {"semi_positives": False}, False),
    "w/o noise": ({}, {"noise": False}, False),
}
# opt-in (--variants): the same ablations of QuARI trained on TA features, each compared with
# "TA + QuARI" (where the per-query part is the only thing the ablation can change)
TA_ABLATIONS = {f"TA + QuARI {k}": (m, t, True) for k, (m, t, _) in VARIANTS.items() if k.startswith("w/o")}
ALL_VARIANTS = {**VARIANTS, **TA_ABLATIONS}


def ablation_reference(name: str) -> str:
    """The full model an ablation row is compared with."""
    return "TA + QuARI" if name.startswith("TA + QuARI w/o") else "QuARI"


# the cut-offs each protocol reports (ILIAS: mAP@1k; INQUIRE: mAP@50, nDCG@50); captions: @10
K_MAP = {"world-ilias": 1000, "world-ilias-100k": 1000, "world-ilias-val": 1000, "world-ilias-val-10k": 1000,
         "world-ilias-train": 1000,
         "world-inquire": 50, "world-inquire-val": 50}
# training sets (and run folders) shared between testbeds; the -val testbeds pick the epochs
TRAIN_SET = {"world-ilias-100k": "world-ilias", "world-ilias-val": "world-ilias", "world-ilias-val-10k": "world-ilias",
             "world-ilias-train": "world-ilias",
             "world-inquire-val": "world-inquire"}


def _headline(testbed: str) -> tuple[int, str]:
    """(k of mAP@k, the headline metric): R@1 for caption retrieval (one positive), mAP@k for
    the protocols."""
    k_map = K_MAP.get(testbed, 10)
    return k_map, "R@1" if testbed not in K_MAP else f"mAP@{k_map}"


def _train_ta_file(path: Path, enc, q: np.ndarray, t: np.ndarray, tof: np.ndarray, groups: np.ndarray | None,
                   epochs: int, batch: int, seed: int, rank: int | None = None) -> float:
    """Train the TA map (lr 1e-3) and save it at ``path`` for the pipeline's ``ta`` stage;
    returns the training seconds."""
    from qshift.quari import train_ta
    from qshift.quari.search import save_ta

    t0 = time.perf_counter()
    p = train_ta(q, t, tof, epochs=epochs, batch_size=batch, lr=1e-3, seed=seed, groups=groups, rank=rank)
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_ta(path, p, backbone=enc.fingerprint())
    return seconds


def _reuse_or_train_ta(path: Path, enc, q: np.ndarray, t: np.ndarray, tof: np.ndarray, groups: np.ndarray | None,
                       epochs: int, batch: int, seed: int) -> float:
    """:func:`_train_ta_file`, unless ``path`` already holds a map trained on the same data and
    backbone (a sidecar JSON records their hash and the training seconds, which are returned)."""
    import hashlib

    from qshift.io import read_json, write_json

    h = hashlib.sha256()
    for a in (q, t, tof, groups if groups is not None else np.zeros(0)):
        h.update(np.ascontiguousarray(a).tobytes())
    key = {"data": h.hexdigest()[:16], "backbone": enc.fingerprint(), "epochs": epochs, "batch": batch, "seed": seed}
    side = path.with_suffix(".json")
    if path.is_file() and side.is_file():
        meta = read_json(side)
        if meta.get("key") == key:
            return float(meta["train_s"])
    seconds = _train_ta_file(path, enc, q, t, tof, groups, epochs, batch, seed)
    write_json(side, {"key": key, "train_s": seconds})
    return seconds


def _metrics(scores: np.ndarray, qrels, k_map: int = 10) -> dict[str, float]:
    from qshift.metrics import first_positive_rank, retrieval_metrics

    k = min(max(k_map, 10), scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(part, np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable"), 1)
    return retrieval_metrics(top, qrels, ks=(1, 5, 10), k_map=k_map, full_ranks=first_positive_rank(scores, qrels))


TEMPLATE_KEY = "template:"  # per-template headline metrics in a World-INQUIRE row: "template:position"


def _scored(scores: np.ndarray, task, k_map: int) -> dict[str, float]:
    """:func:`_metrics`, plus the headline mAP@k of every query template for a task whose
    queries come from templates (World-INQUIRE): a mean over templates of very different
    difficulty hides which kinds of query a method helps."""
    from qshift.metrics import Qrels

    out = _metrics(scores, task.qrels, k_map)
    templates = np.asarray(task.meta.get("templates") or [])
    q = task.qrels
    for name in sorted(set(templates.tolist())):
        rows = np.flatnonzero(templates == name)
        sub = Qrels.from_lists([q.indices[q.indptr[r]:q.indptr[r + 1]] for r in rows])
        out[TEMPLATE_KEY + name] = _metrics(scores[rows], sub, k_map)[f"mAP@{k_map}"]
    return out


def _protocol_testbed(name: str, encoder: str | None, store, train_instances: int | None = None,
                      train_set: str = "protocol"):
    """World-ILIAS (i2i) or World-INQUIRE (t2i): train split's pairs (World-ILIAS: of
    ``train_instances`` instances, default 2,000; World-INQUIRE with ``train_set`` "captions":
    the world's train split of caption–image pairs instead of the train templates' queries, as
    the paper trains on generic caption data; "clauses": those captions and their clauses,
    :func:`qshift.quari.data.clause_collection`), test split's task."""
    from qshift.encoders import create_encoder
    from qshift.quari.data import protocol_negatives, protocol_pairs, training_pairs
    from qshift.retrieval import build_task
    from qshift.world.protocols import protocol_collection

    enc = create_encoder(encoder or "world:mini-clip")
    kind = "ilias" if name.startswith("world-ilias") else "inquire"
    direction = "i2i" if kind == "ilias" else "t2i"
    test_spec = {"world-ilias": "world-ilias:test-10k", "world-ilias-100k": "world-ilias:test-100k",
                 "world-ilias-val": "world-ilias:val", "world-ilias-val-10k": "world-ilias:val-10k",
                 "world-ilias-train": "world-ilias:train",
                 "world-inquire": "world-inquire:test",
                 "world-inquire-val": "world-inquire:val"}[name]
    if train_instances and kind != "ilias":
        raise SystemExit("--train-instances: world-ilias testbeds only")
    captions = train_set != "protocol"
    if captions and kind != "inquire":
        raise SystemExit(f"--train-set {train_set}: world-inquire testbeds only")
    if captions:
        from qshift.data.collection import load_collection
        from qshift.quari.data import clause_collection
        from qshift.world import world_collection

        train = load_collection(world_collection("train"))
        if train_set == "clauses":
            train = clause_collection(train)
        pairs = (*training_pairs(train, enc, "t2i", store), None, None)
    else:
        train = protocol_collection(f"world-{kind}:train{instances_tag(train_instances)}", progress=True)
        pairs = (*protocol_pairs(train, enc, store), protocol_negatives(train, enc, store))
    test = protocol_collection(test_spec, progress=True)
    task = build_task(test, enc, direction, store)
    what = (("caption–image pairs" if train_set == "captions" else "captions and their clauses → image")
            + ", no template query" if captions else
            f"{len({i for i in train.meta['protocol']['instance'] if i >= 0})} instances"
            if kind == "ilias" else f"{len(train.meta['protocol']['queries'])} queries of templates "
            f"{', '.join(train.meta['protocol']['templates'])}")
    source = "world:train" if captions else f"world-{kind}:train"
    test_what = ("" if kind == "ilias" else
                 f", templates {', '.join(test.meta['protocol']['templates'])}")
    desc = (f"{enc.spec}: train on {source} ({what}; {len(pairs[0])} pairs), test on {test_spec} "
            f"({len(task.queries)} queries × {len(task.gallery)} gallery{test_what}, {direction.upper()})")
    return enc, pairs, task, desc


def _testbed(name: str, encoder: str | None, train_instances: int | None = None, train_set: str = "protocol"):
    """(encoder, train pairs, test task, description)."""
    from qshift.data.collection import load_collection
    from qshift.encoders import create_encoder
    from qshift.paths import cache_dir, shared_data_dir
    from qshift.quari.data import target_groups, training_pairs
    from qshift.retrieval import build_task
    from qshift.store import EmbeddingStore

    store = EmbeddingStore(cache_dir() / "store")
    if name in K_MAP:
        return _protocol_testbed(name, encoder, store, train_instances, train_set)
    if train_instances or train_set != "protocol":
        raise SystemExit("--train-instances / --train-set: protocol testbeds only")
    if name.startswith("world"):
        from qshift.world import world_collection

        enc = create_encoder(encoder or "world:mini-clip")
        # world: the training styles (the backbone's own training pairs); world-pixel: the
        # held-out pixel style, trained on its val split (1k images) — a new domain
        train_split, test_split = ("train", "test") if name == "world" else ("val-pixel", "test-pixel")
        train = load_collection(world_collection(train_split))
        test, direction = load_collection(world_collection(test_split)), "t2i"
        names = (f"world {train_split}", f"world {test_split}")
    else:
        enc = create_encoder(encoder or "st:all-MiniLM-L6-v2")
        root = shared_data_dir()
        if root is None:
            raise SystemExit("COCO testbed needs ../shared/data")
        train = load_collection(root / "coco-5k-dev" / "captions.txt")
        test = load_collection(root / "coco-5k-test" / "captions.txt")
        direction = "t2t"
        names = (train.name, test.name)
    pairs = (*training_pairs(train, enc, direction, store), target_groups(train, direction), None)
    task = build_task(test, enc, direction, store)
    desc = (f"{enc.spec}: train on {names[0]} ({len(pairs[0])} pairs), test on {names[1]} "
            f"({len(task.queries)} queries × {len(task.gallery)} gallery, {direction.upper()})")
    return enc, pairs, task, desc


def _pipeline_scores(enc, task, method: str | dict) -> np.ndarray:
    """Whole-gallery scores of the test queries through the query pipeline (the stored
    query embeddings stand for the encode stage)."""
    from qshift.pipeline import Pipeline, PipelineContext

    ctx = PipelineContext(enc, task.direction, gallery=task.gallery)
    with Pipeline.from_method(method, ctx) as pipe:
        return pipe.score(task.query_texts or task.query_ids, embeddings=task.queries)


def _static_part_scores(enc, task, folder: Path) -> np.ndarray:
    """Scores of a ``static_base`` QuARI reduced to its query-independent part,
    :meth:`QuARI.static_part` (with λ = 1 and the tied query, the rank-r static map
    I + a·U₀ᵀV₀ that QuARI learned)."""
    import tempfile

    from qshift.quari import load_quari
    from qshift.quari.train import save_quari

    model, proj, meta = load_quari(folder)
    with tempfile.TemporaryDirectory() as tmp:
        save_quari(model.static_part(), Path(tmp), meta["backbone"], None, proj, [])
        return _pipeline_scores(enc, task, {"name": "quari", "checkpoint": tmp})


def _accuracy_one_seed(enc, pairs, task, run_dir: Path, epochs: int, seed: int, k_map: int = 10,
                       lr: float = LR, batch: int = BATCH, variants: list[str] | None = None,
                       model: dict | None = None, train: dict | None = None,
                       ta_epochs: int | None = None) -> tuple[dict, dict]:
    """Metrics of every method for one training seed (checkpoints cached per seed); TA (and
    the TA features of "TA + QuARI") trains for ``ta_epochs`` (default: ``epochs``)."""
    from qshift.quari import QuARIConfig, QuARITrainConfig, train_quari
    from qshift.quari.search import load_ta

    q, t, tof, groups, pool = pairs
    tail = "" if seed == 0 else f"-seed{seed}"
    rows = {"zero-shot": _scored(_pipeline_scores(enc, task, "zero-shot"), task, k_map)}
    ta_path = run_dir / f"ta{tail}.safetensors"
    if not ta_path.is_file():
        seconds = _train_ta_file(ta_path, enc, q, t, tof, groups, ta_epochs or epochs, batch, seed)
        write_json(ta_path.with_suffix(".json"), {"train_seconds": seconds})
    timing = ta_path.with_suffix(".json")
    train_seconds = {"TA": read_json(timing)["train_seconds"] if timing.is_file() else float("nan")}
    p = load_ta(ta_path)
    rows["TA"] = _scored(_pipeline_scores(enc, task, {"name": "ta", "checkpoint": str(ta_path)}), task, k_map)
    for name, (m_over, t_over, on_ta) in ALL_VARIANTS.items():
        if name not in (VARIANTS if variants is None else variants):
            continue
        out = run_dir / (name.replace(" ", "_").replace("/", "").replace("+", "plus") + tail)
        mcfg = QuARIConfig(dim=q.shape[1], **{**MODEL, **(model or {}), **m_over})
        # the fixed epoch budget on every training pair (as the paper); the CLI holds 10 % out by default
        tcfg = QuARITrainConfig(epochs=epochs, batch_size=batch, lr=lr, lr_min=lr / 100, val_fraction=0.0,
                                seed=seed, **{**(train or {}), **t_over})
        if not (out / "quari.json").is_file():
            train_quari(q, t, tof, mcfg, tcfg, out, backbone=enc.fingerprint(), projection=p if on_ta else None,
                        groups=groups, negatives=pool)
        train_seconds[name] = sum(r["seconds"] for r in read_json(out / "quari.json")["log"])
        rows[name] = _scored(_pipeline_scores(enc, task, {"name": "quari", "checkpoint": str(out)}), task, k_map)
        if name == "QuARI":
            rerank = {"name": "quari", "checkpoint": str(out), "mode": "rerank", "k": RERANK_K}
            rows[RERANK_ROW] = _scored(_pipeline_scores(enc, task, rerank), task, k_map)
            if mcfg.static_base:
                rows[STATIC_ROW] = _scored(_static_part_scores(enc, task, out), task, k_map)
    return rows, train_seconds


def encoder_tag(testbed: str, encoder: str | None) -> str:
    """``@world:lit-minilm`` for a protocol testbed run with another encoder than its default
    (in result keys and run folders, so that each encoder keeps its own checkpoints)."""
    return f"@{encoder}" if testbed in K_MAP and encoder not in (None, "world:mini-clip") else ""


# training fields the runner sets itself (the budget flags and the seeds)
RUNNER_TRAIN_FIELDS = {"epochs", "batch_size", "lr", "lr_min", "val_fraction", "seed"}


def parse_model(spec: str | None, train: bool = False) -> dict:
    """``--model query_residual=0.9,anchor=0.2`` → hypernetwork overrides of :data:`MODEL`;
    with ``train``, ``--train hard_negatives=8`` → QuARITrainConfig overrides (``none`` for
    None; numbers as numbers)."""
    from qshift.quari import QuARIConfig, QuARITrainConfig

    cls, flag = (QuARITrainConfig, "--train") if train else (QuARIConfig, "--model")
    banned = RUNNER_TRAIN_FIELDS if train else {"dim"}
    out: dict = {}
    for item in filter(None, (spec or "").split(",")):
        k, sep, v = item.partition("=")
        if not sep or k not in cls.__dataclass_fields__ or k in banned:
            raise SystemExit(f"{flag}: expected KEY=VALUE with KEY a {cls.__name__} field "
                             f"(not {', '.join(sorted(banned))}), got {item!r}")
        out[k] = None if v.lower() == "none" else (int(v) if v.lstrip("-").isdigit() else float(v))
    return out


def model_tag(over: dict) -> str:
    """The hypernetwork overrides' tag in run folders and result keys: ~anchor=0.2~query_residual=0.9."""
    return "".join(f"~{k}={v:g}" if isinstance(v, (int, float)) else f"~{k}={v}" for k, v in sorted(over.items()))


def budget_tag(epochs: int, lr: float = LR, batch: int = BATCH, ta_epochs: int | None = None) -> str:
    """The training budget's tag in run folders and val result keys: -e30[-lr0.003][-b32][-ta2000]."""
    return (f"-e{epochs}" + (f"-lr{lr:g}" if lr != LR else "") + (f"-b{batch}" if batch != BATCH else "")
            + ta_tag(epochs, ta_epochs))


def instances_tag(train_instances: int | None, train_set: str = "protocol") -> str:
    """-i20000 when World-ILIAS trains on another number of instances than its 2,000; -capt
    when World-INQUIRE trains on the world's caption pairs, -clauses on them and their clauses."""
    return (f"-i{train_instances}" if train_instances else "") + TRAIN_SET_TAGS[train_set]


TRAIN_SET_TAGS = {"protocol": "", "captions": "-capt", "clauses": "-clauses"}


def ta_tag(epochs: int, ta_epochs: int | None) -> str:
    """-ta2000 when TA has its own budget (in run folders and every result key)."""
    return f"-ta{ta_epochs}" if ta_epochs not in (None, epochs) else ""


def bench_accuracy(testbed: str, encoder: str | None, epochs: int, seeds: list[int], lr: float = LR,
                   batch: int = BATCH, variants: list[str] | None = None, model: dict | None = None,
                   train: dict | None = None, ta_epochs: int | None = None,
                   train_instances: int | None = None, train_set: str = "protocol") -> dict:
    """Every method (or ``variants`` of QuARI only) over ``seeds`` training seeds: mean metrics,
    and the headline metric per seed with the ablations' paired differences to full QuARI
    (the seed spread decides what is a gap)."""
    enc, pairs, task, desc = _testbed(testbed, encoder, train_instances, train_set)
    run_dir = RUNS / (f"quari-{TRAIN_SET.get(testbed, testbed)}{encoder_tag(testbed, encoder)}"
                      + instances_tag(train_instances, train_set))
    if testbed in K_MAP:                    # one folder per budget (the val testbeds compare them)
        run_dir = run_dir.with_name(run_dir.name + budget_tag(epochs, lr, batch, ta_epochs)
                                    + model_tag({**(model or {}), **(train or {})}))
    run_dir.mkdir(parents=True, exist_ok=True)
    k_map, head = _headline(testbed)
    if variants is not None and set(variants) - set(ALL_VARIANTS):
        raise SystemExit(f"unknown variants {sorted(set(variants) - set(ALL_VARIANTS))}; known: {list(ALL_VARIANTS)}")
    variants = None if variants is None else ["QuARI", *[v for v in variants if v != "QuARI"]]  # the reference
    per_seed = [_accuracy_one_seed(enc, pairs, task, run_dir, epochs, s, k_map, lr, batch, variants, model or {},
                                   train or {}, ta_epochs)
                for s in seeds]
    names = list(per_seed[0][0])
    rows = {k: {m: float(np.mean([r[k][m] for r, _ in per_seed])) for m in per_seed[0][0][k]} for k in names}
    sd = lambda x: float(np.std(x, ddof=1)) if len(x) > 1 else 0.0  # noqa: E731
    per = {k: [r[k][head] for r, _ in per_seed] for k in names}
    diffs = {k: np.subtract(per[k], per[ablation_reference(k)]) for k in ALL_VARIANTS
             if "w/o" in k and k in per and ablation_reference(k) in per}
    out = {"testbed": desc, "model": {**MODEL, **(model or {})}, "model_overrides": model or {},
           "train_overrides": train or {}, "epochs": epochs, "ta_epochs": ta_epochs or epochs, "lr": lr,
           "train_instances": train_instances, "train_set": train_set,
           "batch_size": batch, "seeds": seeds,
           "metric": head, "rows": rows, "per_seed": per, "sd": {k: sd(v) for k, v in per.items()},
           "train_seconds": per_seed[0][1],
           "template_queries": dict(sorted(Counter(task.meta.get("templates") or []).items())),
           "quari_gain": rows["QuARI"][head] - rows["zero-shot"][head],
           "ablation_minus_full": {k: {"mean": float(d.mean()), "sd": sd(d)} for k, d in diffs.items()},
           "ablations_below_full": {k: bool(d.mean() < 0) for k, d in diffs.items()},
           "ablations_below_by_more_than_spread": {k: bool(-d.mean() > sd(per[ablation_reference(k)]))
                                                   for k, d in diffs.items()}}
    if testbed == "world-ilias-100k":
        out["full_search"] = _full_search(enc, task, run_dir)
    return out


def bench_ta_budget(testbed: str, encoder: str | None, budgets: list[int], seed: int = 0,
                    batch: int = BATCH, train_instances: int | None = None, rank: int | None = None) -> dict:
    """TA alone at several epoch budgets (a val testbed picks TA's own budget: the linear map
    is cheap and keeps improving long after the hypernetwork stops); ``rank``: TA restricted
    to P = I + AᵀB of that rank — the static map of QuARI's own form."""
    enc, (q, t, tof, groups, _), task, desc = _testbed(testbed, encoder, train_instances)
    k_map, head = _headline(testbed)
    rows = [{"epochs": 0, **_metrics(_pipeline_scores(enc, task, "zero-shot"), task.qrels, k_map), "train s": 0.0}]
    run_dir = RUNS / (f"ta-budget-{TRAIN_SET.get(testbed, testbed)}{encoder_tag(testbed, encoder)}"
                      + instances_tag(train_instances))
    for epochs in budgets:                 # scored through the pipeline's ta stage, as the accuracy rows
        path = run_dir / f"ta-e{epochs}-b{batch}{'' if rank is None else f'-r{rank}'}-seed{seed}.safetensors"
        seconds = _train_ta_file(path, enc, q, t, tof, groups, epochs, batch, seed, rank)
        scores = _pipeline_scores(enc, task, {"name": "ta", "checkpoint": str(path)})
        rows.append({"epochs": epochs, **_metrics(scores, task.qrels, k_map), "train s": seconds})
    best = max(rows[1:], key=lambda r: r[head])
    return {"testbed": desc, "metric": head, "seed": seed, "batch_size": batch, "rows": rows,
            "best_epochs": best["epochs"], "train_instances": train_instances, "rank": rank}


# the per-query linear scorer's grid (the best cell on test is the ceiling)
PROBE_LRS, PROBE_TAUS, PROBE_STEPS = (1e-4, 1e-3, 1e-2), (0.02, 0.05, 0.1), (0, 30, 100, 300, 1000, 3000)


def bench_inquire_ceiling(encoder: str | None, ta_epochs: int = 300, seed: int = 0, batch: int = BATCH) -> dict:
    """What any linear scoring of the images could win on World-INQUIRE's test templates.

    QuARI scores an image d by cos(q', T d) — for a given query, (Tᵀq')ᵀd up to the norm of
    T d, a linear function of d; so does TA. Two oracle rows (they use the test templates'
    labels, so they are ceilings, never methods): (1) a *linear scorer per test query*: a
    free vector w started at the query's text embedding and trained with a listwise softmax
    loss on that query's exact relevance over the **train** gallery (other scenes than the
    test gallery's), scored on the test gallery as w·d; the best cell of an (lr, τ, steps)
    grid, picked on the test queries themselves; (2) TA trained on the test templates'
    queries against their relevant train-gallery images (at most 64 each). Where the scorer
    stays near zero-shot, the embedding does not carry what the query asks for linearly, and
    no linear transform can make it. The grid takes ~15 min on 2 cores; TA's map is reused from
    runs/ when its data and backbone match (its training seconds are kept beside it)."""
    import torch

    from qshift.encoders.base import IMAGE
    from qshift.paths import cache_dir
    from qshift.store import EmbeddingStore
    from qshift.world.protocols import TEMPLATES, inquire_scenes, protocol_collection, template_relevance

    enc, _, task, desc = _testbed("world-inquire", encoder)
    k_map, head = _headline("world-inquire")
    train = protocol_collection("world-inquire:train", progress=True)
    x_train = EmbeddingStore(cache_dir() / "store").encode(enc, train, IMAGE).vectors
    scenes = inquire_scenes("train", len(train.ids))
    texts = list(task.query_texts or [])
    relevant = dict(r for name in TEMPLATES if TEMPLATES[name][0] == "test"
                    for r in template_relevance(name, scenes, min_relevant=1))
    missing = [t for t in texts if t not in relevant]
    if missing:
        raise SystemExit(f"inquire-ceiling: no relevant train-gallery image for {missing[:3]}")
    rows = {"zero-shot": _scored(_pipeline_scores(enc, task, "zero-shot"), task, k_map)}
    # (1) one free scoring vector per test query, started at its text embedding (step 0 = zero-shot)
    # and trained listwise on the train gallery (the softmax mass on the query's relevant images),
    # over a grid of (lr, τ, steps); the best cell on the test queries is the ceiling (an oracle pick)
    y = np.zeros((len(x_train), len(texts)), bool)
    for i, t in enumerate(texts):
        y[relevant[t], i] = True
    x, mask, gallery = (torch.from_numpy(np.ascontiguousarray(a)) for a in (x_train, y, task.gallery))
    grid = []
    for lr in PROBE_LRS:
        for tau in PROBE_TAUS:
            w = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(task.queries)).clone())
            opt = torch.optim.Adam([w], lr=lr)
            done = 0
            for steps in PROBE_STEPS:
                for _ in range(steps - done):
                    logits = (x @ w.T) / tau                                   # train gallery × queries
                    loss = (torch.logsumexp(logits, 0) - torch.logsumexp(logits.masked_fill(~mask, -1e9), 0)).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                done = steps
                with torch.no_grad():
                    grid.append({"lr": lr, "tau": tau, "steps": steps,
                                 **_scored((w @ gallery.T).numpy(), task, k_map)})
    best = max(grid, key=lambda r: r[head])
    rows[f"linear scorer per query, best of the grid (lr {best['lr']:g}, τ {best['tau']:g}, {best['steps']} steps; "
         "oracle)"] = {k: v for k, v in best.items() if k not in ("lr", "tau", "steps")}
    # (2) TA on the test templates' own queries over the train gallery
    groups = np.concatenate([[i] * min(64, len(relevant[t])) for i, t in enumerate(texts)]).astype(np.int64)
    rng = np.random.default_rng(seed)
    tgt = np.concatenate([np.sort(rng.choice(relevant[t], min(64, len(relevant[t])), replace=False))
                          for t in texts])
    q = enc.encode_text(texts)[groups]
    path = RUNS / f"inquire-ceiling{encoder_tag('world-inquire', encoder)}" / f"ta-e{ta_epochs}-seed{seed}.safetensors"
    seconds = _reuse_or_train_ta(path, enc, q, x_train[tgt], np.arange(len(tgt)), groups, ta_epochs, batch, seed)
    rows["TA on the test templates (oracle)"] = {
        **_scored(_pipeline_scores(enc, task, {"name": "ta", "checkpoint": str(path)}), task, k_map),
        "train s": seconds}
    return {"testbed": f"{enc.spec}: {desc.split(', test on ', 1)[1]}", "metric": head, "seed": seed,
            "ta_epochs": ta_epochs, "rows": rows, "probe_grid": [{k: r[k] for k in ("lr", "tau", "steps", head)} for r in grid],
            "template_queries": dict(sorted(Counter(task.meta.get("templates") or []).items()))}


def bench_ta_anatomy(testbed: str, encoder: str | None, ta_epochs: int, seed: int = 0, batch: int = BATCH,
                     ranks: tuple[int, ...] = (32, 64), lams: tuple[float, ...] = (0.1, 0.5, 0.9)) -> dict:
    """What QuARI would have to express to match TA. QuARI scores cos(q', T d); TA is the
    case q' = Wq, T = W for every query. Scores the parts (T = W with q' = q, q' = Wq with
    T = I), QuARI's λ-mix q' = norm((1−λ)·Wq + λ·q) with T = W, and W − I truncated to
    rank r (QuARI's T = I + UᵀV has rank-r U, V); with how far q' = Wq moves from q and the
    size of W − I (the anchored form bounds ‖T − I‖_F by a)."""
    from qshift.quari.search import load_ta
    from qshift.quari.train import project
    from qshift.retrieval import normalize_rows

    enc, (q, t, tof, groups, _), task, desc = _testbed(testbed, encoder)
    path = RUNS / f"ta-anatomy-{TRAIN_SET.get(testbed, testbed)}{encoder_tag(testbed, encoder)}-ta{ta_epochs}" / (
        "ta.safetensors" if seed == 0 else f"ta-seed{seed}.safetensors")
    _reuse_or_train_ta(path, enc, q, t, tof, groups, ta_epochs, batch, seed)
    w = load_ta(path).astype(np.float32)
    k_map, head = _headline(testbed)
    qs, gs = task.queries, task.gallery
    wq, wg = project(qs, w), project(gs, w)
    rows = []

    def row(name: str, qp: np.ndarray, td: np.ndarray) -> None:
        m = _metrics(qp @ td.T, task.qrels, k_map)
        rows.append({"q'": name.split(" | ")[0], "T": name.split(" | ")[1], head: m[head], "R@1": m["R@1"]})

    row("q | I (zero-shot)", qs, gs)
    row("Wq | W (TA)", wq, wg)
    row("q | W", qs, wg)
    row("Wq | I", wq, gs)
    for lam in lams:
        row(f"norm((1−λ)·Wq + λ·q), λ {lam:g} | W", normalize_rows((1 - lam) * wq + lam * qs), wg)
    u, sv, vt = np.linalg.svd(w - np.eye(len(w), dtype=np.float32))
    for r in ranks:
        wr = np.eye(len(w), dtype=np.float32) + (u[:, :r] * sv[:r]) @ vt[:r]
        row(f"W_{r}q | W_{r} = I + rank-{r} part of W − I", project(qs, wr), project(gs, wr))
    cos = (wq * qs).sum(1)
    return {"testbed": desc, "metric": head, "ta_epochs": ta_epochs, "seed": seed, "rows": rows,
            "cos_q_wq": {"mean": float(cos.mean()), "min": float(cos.min()), "max": float(cos.max())},
            "w_minus_i": {"frobenius": float(np.sqrt((sv ** 2).sum())), "top_singular_values": sv[:5].tolist(),
                          "energy_in_top_r": {str(r): float((sv[:r] ** 2).sum() / (sv ** 2).sum()) for r in ranks}}}


def _full_search(enc, task, run_dir: Path, k: int = 100) -> dict:
    """Full search with seed 0's QuARI over the protocol's gallery through FAISS (exact MIPS
    and IVF; w = Tᵀq', over-fetch, exact re-scoring): queries/s and recall of the exact
    QuARI top-k (every gallery item scored)."""
    import faiss
    import torch

    from qshift.quari import load_quari, quari_search

    model, _, _ = load_quari(run_dir / "QuARI", expect_backbone=enc.fingerprint())
    gallery = np.ascontiguousarray(task.gallery, dtype=np.float32)
    queries = np.ascontiguousarray(task.queries, dtype=np.float32)
    exact = np.argsort(-_pipeline_scores(enc, task, {"name": "quari", "checkpoint": str(run_dir / "QuARI")}),
                       axis=1, kind="stable")[:, :k]
    rows = []
    flat = faiss.IndexFlatIP(gallery.shape[1])
    flat.add(gallery)
    nlist = 256
    ivf = faiss.index_factory(gallery.shape[1], f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(gallery[np.random.default_rng(0).choice(len(gallery), 64 * nlist, replace=False)])
    ivf.add(gallery)
    with torch.inference_mode():
        for name, ix, nprobe in (("Flat", flat, 0), (f"IVF{nlist},Flat", ivf, 8), (f"IVF{nlist},Flat", ivf, 32)):
            if nprobe:
                ix.nprobe = nprobe
            for overfetch in (2, 10):
                t0 = time.perf_counter()
                _, lab = quari_search(model, ix, gallery, queries, k=k, overfetch=overfetch, batch=64)
                dt = time.perf_counter() - t0
                rec = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(lab, exact)]))
                rows.append({"index": name, "nprobe": nprobe or "-", "overfetch": overfetch,
                             "queries_per_s": len(queries) / dt, f"recall@{k}_of_exact_quari": rec})
    return {"gallery": len(gallery), "queries": len(queries), "k": k, "rows": rows}


def bench_latency(e: int = 512, r: int = 64, n_gallery: int = 1_000_000, k: int = 1000) -> dict:
    import faiss
    import torch

    from qshift.quari import QuARI, QuARIConfig, quari_search
    from qshift.quari.scoring import lowrank_scores, materialized_scores

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # the paper-sized hypernetwork (for a GPU) and the CPU-sized one of the accuracy runs (at rank r)
    nets = {"4L h256 4 steps": QuARI(QuARIConfig(dim=e, rank=r, hidden=256, layers=4, heads=4, steps=4)).eval(),
            "2L h64 3 steps": QuARI(QuARIConfig(dim=e, rank=r, hidden=64, layers=2, heads=4, steps=3)).eval()}
    model = nets["4L h256 4 steps"]
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    out: dict = {"E": e, "r": r, "k": k, "threads": torch.get_num_threads()}
    rows = []
    with torch.inference_mode():
        for b in (1, 32):
            qs = torch.from_numpy(unit(rng.standard_normal((b, e))))
            cand = torch.from_numpy(unit(rng.standard_normal((b, k, e))))
            qp, u, v = model(qs)
            t_nets = {name: timeit(lambda: net(qs), reps=15) for name, net in nets.items()}
            for anchor in (model.cfg.anchor, None):  # T = I + a·UᵀV (default) and the paper's T = UᵀV
                t_low = timeit(lambda: lowrank_scores(qp, u, v, cand, anchor), reps=15)
                t_mat = timeit(lambda: materialized_scores(qp, u, v, cand, anchor), reps=7)
                t_b16 = timeit(lambda: lowrank_scores(qp, u, v, cand, anchor, dtype=torch.bfloat16), reps=15)
                for name, t_net in t_nets.items():
                    rows.append({"batch": b, "T": "I + a·UᵀV" if anchor else "UᵀV", "hypernet": name,
                                 "hypernet_ms_per_query": 1e3 * t_net / b,
                                 "lowrank_rerank_ms_per_query": 1e3 * t_low / b,
                                 "lowrank_bf16_ms_per_query": 1e3 * t_b16 / b,
                                 "materialized_ms_per_query": 1e3 * t_mat / b,
                                 "speedup_vs_materialized": t_mat / t_low,
                                 "rerank_total_ms_per_query": 1e3 * (t_net + t_low) / b})
    out["rerank"] = rows
    # full search: IVF over n_gallery random unit vectors; recall of the exact QuARI top-10
    gallery = unit(rng.standard_normal((n_gallery, e)))
    t0 = time.perf_counter()
    nlist = 1024
    index = faiss.index_factory(e, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(gallery[rng.choice(n_gallery, 64 * nlist, replace=False)])
    index.add(gallery)
    build_s = time.perf_counter() - t0
    queries = unit(rng.standard_normal((32, e)))
    g_t = torch.from_numpy(gallery)
    with torch.inference_mode():
        exact = []
        for i in range(len(queries)):
            qp, u, v = model(torch.from_numpy(queries[i:i + 1]))
            exact.append(torch.topk(lowrank_scores(qp, u, v, g_t, model.cfg.anchor)[0], 10).indices.numpy())
    exact = np.stack(exact)
    flat = faiss.IndexFlatIP(e)
    flat.add(gallery)
    search_rows = []
    for name, ix, nprobe in (("Flat", flat, 0), (f"IVF{nlist},Flat", index, 16), (f"IVF{nlist},Flat", index, 64),
                             (f"IVF{nlist},Flat", index, 256)):
        if nprobe:
            ix.nprobe = nprobe
        for overfetch in (10, 50):
            t0 = time.perf_counter()
            _, lab = quari_search(model, ix, gallery, queries, k=10, overfetch=overfetch, batch=32)
            dt = time.perf_counter() - t0
            rec = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(lab, exact)])
            search_rows.append({"index": name, "nprobe": nprobe or "-", "overfetch": overfetch,
                                "queries_per_s": len(queries) / dt, "recall@10_of_exact_quari": rec})
    out["full_search"] = {"gallery": n_gallery, "index": f"IVF{nlist},Flat", "build_s": build_s, "rows": search_rows}
    return out


NOTES = {
    "world": "In-domain: the backbone was trained on these very training pairs, so there is little left "
             "for a per-query transform to add.",
    "world-pixel": "A new domain: the pixel style was held out of the backbone's training; QuARI and TA "
                   "learn from its val split (1k images, 5k captions) and are tested on its test split.",
    "coco": "In-domain too: all-MiniLM-L6-v2 was trained on 828k COCO caption pairs among its 1B "
            "(its model card), and 5k dev pairs (1k items) are few for the hypernetwork. T2T targets are "
            "grouped by item (one caption-mean per item in a batch; before, an item's near-copy targets "
            "were in-batch negatives and QuARI lost 3.7 R@1 to zero-shot, TA 1.5).",
    "world-ilias": "Instance retrieval (QuARI's ILIAS setting on the world): the query is one rendering of a "
                   "scene, its positives the scene's other renderings (other styles, jittered layout, lighting, "
                   "sometimes a small extra object); the distractors include two near-duplicates of every "
                   "instance (one object's colour or shape changed). QuARI and TA learn on the train split's "
                   "instances (rendering → the instance's other renderings), disjoint from the test instances.",
    "world-ilias-100k": "The same queries and checkpoints as world-ilias, among 100k gallery images "
                        "(random scenes fill the gallery).",
    "world-ilias-train": "A fit check, not a result: the training instances themselves (their rendering 0 as "
                         "the query, the 10k training gallery), scored with world-ilias's checkpoints — does a "
                         "method learn to rank the instances it was trained on?",
    "world-ilias-val": "Validation (300 instances never trained on, 1.5k gallery): picks the epoch budgets "
                       "(QuARI's and, with --ta-epochs, TA's) and the hypernetwork's settings.",
    "world-ilias-val-10k": "Validation at the test gallery's size: world-ilias-val's 300 instances and "
                           "checkpoints among 10k gallery images (random scenes fill the gallery) — does a "
                           "setting's val gain survive a gallery as large as the test's?",
    "world-inquire-val": "Validation (the val templates — sizes, size and colour, colour and position — never "
                         "trained on and none of them a test template; 4k gallery): picks the epoch budget and "
                         "the settings. (Until 2026-12-07 val held the size template alone, 24 queries.)",
    "world-inquire": "Many-positive text queries (QuARI's INQUIRE setting on the world): relevant sets come "
                     "from the scene graphs. QuARI and TA learn from the train templates' queries and their "
                     "relevant train-gallery images (at most 64 per query) and are tested on templates they "
                     "never saw (counts and positions) over a gallery of new scenes.",
}


def _legacy(a: dict) -> dict:
    """Results written before the headline metric was named (R@1 throughout)."""
    if "metric" in a:
        return a
    return {**a, "metric": "R@1", "per_seed": a.get("r1_per_seed", {}), "sd": a.get("r1_sd", {}),
            "quari_gain": a["quari_gain_r1"], "ablation_minus_full": a.get("ablation_minus_full_r1", {})}


ROW_ORDER = ("zero-shot", "TA", "QuARI", RERANK_ROW, STATIC_ROW, "TA + QuARI")


def _ordered(rows: dict) -> list[str]:
    """Methods in a fixed order (baselines, QuARI, then ablations) whether the rows come fresh
    from a run or back from the sorted JSON."""
    return sorted(rows, key=lambda m: (ROW_ORDER.index(m) if m in ROW_ORDER else len(ROW_ORDER), m))


ACCURACY = ("world", "world-pixel", "coco", "world-ilias-val", "world-ilias-val-10k", "world-ilias", "world-ilias-100k",
            "world-ilias-train", "world-inquire-val", "world-inquire")


def render_md(data: dict) -> str:
    md = ["# QuARI (issues 7, 21)", ""]
    sets = "|".join(re.escape(t) for t in TRAIN_SET_TAGS.values() if t)
    testbed_of = lambda k: re.sub(rf"(-e\d+(-lr[^-]+)?(-b\d+)?)?(-ta\d+)?(-i\d+)?({sets})?$", "",  # noqa: E731
                                  k[len("accuracy_"):].split("@")[0].split("~")[0])
    keys = sorted((k for k in data if k.startswith("accuracy_")), key=lambda k: (ACCURACY.index(testbed_of(k)), k))
    for key in keys:
        testbed = testbed_of(key)
        a = _legacy(data[key])
        seeds, head = a.get("seeds", [0]), a["metric"]
        md += [f"## Accuracy — {a['testbed']}", "",
               f"`.venv/bin/python bench/bench_quari.py accuracy --testbed {testbed} --epochs {a['epochs']}"
               f" --seeds {','.join(map(str, seeds))}"
               + (f" --encoder {key.split('@', 1)[1].split('~')[0]}" if "@" in key else "")
               + (f" --model {','.join(f'{k}={v}' for k, v in sorted(a['model_overrides'].items()))}"
                  if a.get("model_overrides") else "")
               + (f" --train {','.join(f'{k}={v}' for k, v in sorted(a['train_overrides'].items()))}"
                  if a.get("train_overrides") else "")
               + (f" --lr {a['lr']:g}" if a.get("lr", LR) != LR else "")
               + (f" --batch {a['batch_size']}" if a.get("batch_size", BATCH) != BATCH else "")
               + (f" --ta-epochs {a['ta_epochs']}" if a.get("ta_epochs", a["epochs"]) != a["epochs"] else "")
               + (f" --train-instances {a['train_instances']}" if a.get("train_instances") else "")
               + (f" --train-set {a['train_set']}" if a.get("train_set", "protocol") != "protocol" else "")
               + (f" --variants \"{','.join(m for m in ALL_VARIANTS if m in a['rows'])}\""
                  if set(VARIANTS) ^ (set(a["rows"]) & set(ALL_VARIANTS)) else "")
               + f"` (hypernetwork {dict(sorted(a['model'].items()))}, batch {a.get('batch_size')}, "
               f"lr {a.get('lr')}; metrics are means over {len(seeds)} training seed(s))", ""]
        if testbed in K_MAP:
            k = K_MAP[testbed]
            cols = [f"mAP@{k}", f"nDCG@{k}", "MRR", "R@1", "R@10"]
        else:
            cols = ["R@1", "R@5", "R@10", "mAP@10", "nDCG@10", "MRR"]
        extra = [f"{head} sd", f"{head} per seed"] if len(seeds) > 1 else []
        rows = [{"method": m, **{c: v[c] * (100 if c == "MRR" else 1) for c in cols},
                 f"{head} sd": a["sd"].get(m, 0.0),
                 f"{head} per seed": " ".join(f"{x:.2f}" for x in a["per_seed"].get(m, [])),
                 "train s": a["train_seconds"].get(m, 0.0)} for m, v in ((m, a["rows"][m]) for m in _ordered(a["rows"]))]
        gaps = a["ablation_minus_full"]
        md += [md_table(rows, ["method", *cols, *extra, "train s"],
                        {c: ".2f" for c in [*cols, f"{head} sd", "train s"]}), "",
               f"QuARI − zero-shot: {a['quari_gain']:+.2f} {head}. Ablation − its full model (QuARI, or TA + "
               f"QuARI for the TA + QuARI ablations; {head}, paired by seed): "
               + ", ".join(f"{k}: {g['mean']:+.2f}" + (f" ± {g['sd']:.2f}" if len(seeds) > 1 else "")
                           for k, g in gaps.items()), "",
               NOTES[testbed], ""]
        if a.get("template_queries"):
            tq = a["template_queries"]
            trows = [{"method": m, **{f"{t} ({n})": a["rows"][m].get(TEMPLATE_KEY + t, float("nan"))
                                      for t, n in tq.items()}} for m in _ordered(a["rows"])]
            md += [f"{head} per query template (queries), mean over seeds:", "",
                   md_table(trows, list(trows[0]), {c: ".2f" for c in list(trows[0])[1:]}), ""]
        if "full_search" in a:
            fs = a["full_search"]
            md += [f"Full search with seed 0's QuARI over the {fs['gallery']:,}-image gallery ({fs['queries']} "
                   f"queries, top-{fs['k']}; w = Tᵀq' through FAISS, over-fetched and re-scored exactly):", "",
                   md_table(fs["rows"], list(fs["rows"][0]),
                            {c: ".3f" if c.startswith("recall") else ".1f" for c in fs["rows"][0]
                             if c not in ("index", "nprobe", "overfetch")}), ""]
    for key in sorted(k for k in data if k.startswith("ta_budget_")):
        a = data[key]
        testbed, head = re.sub(r"(-r\d+)?(-i\d+)?$", "", key[len("ta_budget_"):].split("@")[0]), a["metric"]
        k = K_MAP.get(testbed, 10)
        cols = [f"mAP@{k}", "R@1", "R@10"] if testbed in K_MAP else ["R@1", "R@10"]
        low = f" --ta-rank {a['rank']}" if a.get("rank") else ""
        form = f" (rank {a['rank']}: P = I + AᵀB)" if a.get("rank") else ""
        md += [f"## TA's epoch budget{form} — {a['testbed']}", "",
               f"`.venv/bin/python bench/bench_quari.py ta-budget --testbed {testbed} --ta-epochs "
               f"{','.join(str(r['epochs']) for r in a['rows'][1:])}"
               + (f" --train-instances {a['train_instances']}" if a.get("train_instances") else "") + low
               + f"` (seed {a['seed']}, batch {a['batch_size']}, "
               "lr 1e-3; epochs 0 = zero-shot)", "",
               md_table(a["rows"], ["epochs", *cols, "train s"], {c: ".2f" for c in [*cols, "train s"]}), "",
               f"Best {head}: {a['best_epochs']} epochs.", ""]
    for key in sorted(k for k in data if k.startswith("ta_anatomy_")):
        a = data[key]
        testbed, head = key[len("ta_anatomy_"):].split("@")[0], a["metric"]
        c, w = a["cos_q_wq"], a["w_minus_i"]
        md += [f"## What QuARI would have to express to match TA — {a['testbed']}", "",
               f"`.venv/bin/python bench/bench_quari.py ta-anatomy --testbed {testbed} --ta-epochs {a['ta_epochs']}` "
               f"(TA seed {a['seed']}). QuARI scores cos(q', T d); TA is q' = Wq, T = W for every query.", "",
               md_table(a["rows"], ["q'", "T", head, "R@1"], {head: ".2f", "R@1": ".2f"}), "",
               f"cos(q, Wq): mean {c['mean']:.2f}, min {c['min']:.2f}, max {c['max']:.2f} (QuARI's λ-mix with the "
               f"unit head keeps cos(q', q) ≥ 2λ − 1). W − I: Frobenius norm {w['frobenius']:.1f}, top singular "
               f"values {', '.join(f'{x:.1f}' for x in w['top_singular_values'])} (the anchored "
               "T = I + a·UᵀV/(‖U‖‖V‖) keeps ‖T − I‖_F ≤ a); share of its energy in the top r: "
               + ", ".join(f"r {r}: {e:.2f}" for r, e in w["energy_in_top_r"].items()) + ".", ""]
    for key in sorted(k for k in data if k.startswith("inquire_ceiling")):
        a, enc_flag = data[key], (f" --encoder {key.split('@', 1)[1]}" if "@" in key else "")
        head, tq = a["metric"], a["template_queries"]
        rows = [{"method": m, head: v[head], **{f"{t} ({n})": v.get(TEMPLATE_KEY + t, float("nan"))
                                                for t, n in tq.items()}}
                for m, v in sorted(a["rows"].items(), key=lambda mv: (mv[0] != "zero-shot", mv[0].startswith("TA")))]
        md += [f"## What a linear scoring could win on World-INQUIRE's test templates — {a['testbed']}", "",
               f"`.venv/bin/python bench/bench_quari.py inquire-ceiling{enc_flag} --ta-epochs {a['ta_epochs']}` "
               f"(seed {a['seed']}). Oracle rows use the test templates' labels on the *train* gallery (other "
               "scenes); they are ceilings, not methods. For a given query QuARI's score cos(q', T d) is linear in "
               "the image embedding d up to ‖T d‖, as TA's is; the per-query scorer is the best linear scorer that "
               "query's own labels find.", "",
               md_table(rows, list(rows[0]), {c: ".2f" for c in list(rows[0])[1:]}), ""]
        if a.get("probe_grid"):
            g = a["probe_grid"]
            cells = sorted({(r["lr"], r["tau"]) for r in g})
            md += [f"The per-query scorer's grid ({head}; rows lr, τ; columns steps; step 0 = zero-shot):", "",
                   md_table([{"lr": lr, "τ": tau, **{str(r["steps"]): r[head] for r in g
                                                     if (r["lr"], r["tau"]) == (lr, tau)}} for lr, tau in cells],
                            ["lr", "τ", *[str(s) for s in sorted({r["steps"] for r in g})]],
                            {str(s): ".2f" for s in {r["steps"] for r in g}}), ""]
    if "latency" in data:
        lat = data["latency"]
        md += [f"## Latency (E={lat['E']}, r={lat['r']}, top-{lat['k']} re-rank, {lat['threads']} threads)", "",
               "`.venv/bin/python bench/bench_quari.py latency` — two hypernetworks: 4 layers, hidden 256, 4 "
               "steps (paper-sized) and 2 layers, hidden 64, 3 steps (the accuracy runs'); re-rank total = "
               "hypernetwork + low-rank scoring of the top-k", "",
               md_table(lat["rerank"], list(lat["rerank"][0]),
                        {c: ".3f" for c in lat["rerank"][0] if c not in ("batch", "T", "hypernet")}),
               "", "Random vectors and an untrained hypernetwork: scores are close together, so this is the hard "
               "case for both the IVF probe and the over-fetch (the norm ‖Td‖ re-orders near-ties). Flat = exact "
               "MIPS with w = Tᵀq', then exact re-scoring.", "", f"Full search over {lat['full_search']['gallery']:,} random vectors, "
               f"{lat['full_search']['index']} (built in {lat['full_search']['build_s']:.0f} s), 32 queries:", "",
               md_table(lat["full_search"]["rows"], list(lat["full_search"]["rows"][0]),
                        {"queries_per_s": ".1f", "recall@10_of_exact_quari": ".3f"}), ""]
    return "\n".join(md)


PROTOCOL_PLOT = "quari_protocols.png"
# the result shown in the plot for each protocol test bed: the settings its val testbed picked
# (World-ILIAS: TA 2,000 epochs, QuARI's unit query head with λ 0.9, no column half of the loss;
# World-INQUIRE: TA 1,000 epochs, QuARI's defaults; see quari.md)
HEADLINE = {"world-ilias": "accuracy_world-ilias-ta2000~column_loss=0~query_residual=0.9~unit_query_head=1",
            "world-ilias-100k": "accuracy_world-ilias-100k-ta2000~column_loss=0~query_residual=0.9~unit_query_head=1",
            "world-inquire": "accuracy_world-inquire-ta1000"}


def plot_protocols(data: dict, path: Path) -> bool:
    """Bars of the headline metric (mean ± sd over seeds) per method on the protocol test
    beds; False when none has results yet."""
    key = lambda t: HEADLINE[t] if HEADLINE.get(t) in data else f"accuracy_{t}"  # noqa: E731
    beds = [t for t in ("world-ilias", "world-ilias-100k", "world-inquire") if key(t) in data]
    if not beds:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qshift.io import atomic_path

    fig, axes = plt.subplots(1, len(beds), figsize=(4.8 * len(beds), 4.2), squeeze=False)
    for ax, bed in zip(axes[0], beds):
        a = data[key(bed)]
        names = list(a["rows"])
        means = [a["rows"][m][a["metric"]] for m in names]
        sds = [a["sd"].get(m, 0.0) for m in names]
        colors = ["#888" if m in ("zero-shot", "TA") else "#c84" if "w/o" in m else "#3a7" for m in names]
        ax.barh(range(len(names)), means, xerr=sds, color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(a["rows"]["zero-shot"][a["metric"]], color="k", lw=0.8, ls="--")
        ax.set_xlabel(f"{a['metric']} (mean ± sd, {len(a['seeds'])} seeds)")
        own_ta = a.get("ta_epochs", a["epochs"]) != a["epochs"]
        ax.set_title(bed + (f" (TA {a['ta_epochs']} epochs)" if own_ta else ""), fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["accuracy", "ta-budget", "ta-anatomy", "inquire-ceiling", "latency"])
    ap.add_argument("--testbed", choices=list(ACCURACY), default="world")
    ap.add_argument("--encoder")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", default="0", help="training seeds, comma-separated (e.g. 0,1,2)")
    ap.add_argument("--no-write", action="store_true",
                    help="train and print only (e.g. one seed per process); a later run over all seeds writes")
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--ta-epochs", help="TA's own epoch budget (default: --epochs; also the TA features of "
                    "'TA + QuARI'); for ta-budget, a comma-separated list")
    ap.add_argument("--variants", help="QuARI variants to train, comma-separated (default: all)")
    ap.add_argument("--model", help="hypernetwork overrides, e.g. query_residual=0.9,anchor=0.2 (QuARIConfig fields)")
    ap.add_argument("--train", help="training overrides, e.g. hard_negatives=8 (QuARITrainConfig fields)")
    ap.add_argument("--gallery", type=int, default=1_000_000)
    ap.add_argument("--ta-rank", type=int, help="ta-budget: TA restricted to P = I + AᵀB of this rank")
    ap.add_argument("--train-instances", type=int,
                    help="World-ILIAS training instances (default 2,000; world-ilias:train-iN, a superset)")
    ap.add_argument("--train-set", choices=list(TRAIN_SET_TAGS), default="protocol",
                    help="World-INQUIRE: train on the train templates' queries (protocol), on the world's "
                         "caption-image pairs (captions, as the paper trains on generic caption data) or on "
                         "those captions and their clauses (clauses: short partial descriptions)")
    args = ap.parse_args()
    if args.train_set != "protocol" and args.what != "accuracy":
        raise SystemExit(f"--train-set {args.train_set}: accuracy only, not {args.what}")
    if args.ta_rank and args.what != "ta-budget":
        raise SystemExit(f"--ta-rank: ta-budget only, not {args.what}")
    if args.train_instances and args.what not in ("accuracy", "ta-budget"):
        raise SystemExit(f"--train-instances: accuracy and ta-budget only, not {args.what}")
    if args.what == "accuracy":
        seeds = [int(x) for x in args.seeds.split(",")]
        ta_epochs = int(args.ta_epochs) if args.ta_epochs else None
        tag = budget_tag(args.epochs, args.lr, args.batch, ta_epochs)
        model, train = parse_model(args.model), parse_model(args.train, train=True)
        key = (f"accuracy_{args.testbed}"
               + (tag if "-val" in args.testbed else ta_tag(args.epochs, ta_epochs))
               + instances_tag(args.train_instances, args.train_set)
               + encoder_tag(args.testbed, args.encoder) + model_tag({**model, **train}))
        part = bench_accuracy(args.testbed, args.encoder, args.epochs, seeds, args.lr, args.batch,
                              args.variants.split(",") if args.variants else None, model, train, ta_epochs,
                              args.train_instances, args.train_set)
        if args.no_write:
            print(json.dumps(part["per_seed"], indent=1))
            return
    elif args.what == "ta-budget":
        budgets = [int(x) for x in (args.ta_epochs or "10,60,250,1000,2000").split(",")]
        key = (f"ta_budget_{args.testbed}" + (f"-r{args.ta_rank}" if args.ta_rank else "")
               + instances_tag(args.train_instances) + encoder_tag(args.testbed, args.encoder))
        part = bench_ta_budget(args.testbed, args.encoder, budgets, int(args.seeds.split(",")[0]), args.batch,
                               args.train_instances, args.ta_rank)
    elif args.what == "ta-anatomy":
        key = f"ta_anatomy_{args.testbed}" + encoder_tag(args.testbed, args.encoder)
        part = bench_ta_anatomy(args.testbed, args.encoder, int(args.ta_epochs or 2000), int(args.seeds.split(",")[0]),
                                args.batch)
    elif args.what == "inquire-ceiling":
        key = "inquire_ceiling" + encoder_tag("world-inquire", args.encoder)
        part = bench_inquire_ceiling(args.encoder, int(args.ta_epochs or 300), int(args.seeds.split(",")[0]),
                                     args.batch)
    else:
        key, part = "latency", bench_latency(n_gallery=args.gallery)
    data = previous_results("quari")  # read after the run: another part may have finished meanwhile
    data[key] = part
    md = render_md(data)
    if plot_protocols(data, RESULTS / PROTOCOL_PLOT):
        md += f"\n![QuARI on its own protocols]({PROTOCOL_PLOT})\n"
    write_results("quari", data, md)
    print(md)


if __name__ == "__main__":
    main()
