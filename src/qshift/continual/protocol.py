"""The continual multi-domain retrieval protocol (``qshift continual run CONFIG``).

A sequence of visual domains, each with training and test data — by default the world's
five training styles (train: the scenes assigned to the style; test: the test split in
that style), in a seeded order per ``orders`` entry (0: as listed). After each step every
method is evaluated T2I and I2T (R@1/5/10) on every domain — seen so far and not yet seen
— and on the ``ood`` domains (the held-out ``pixel`` style). Captions are embedded once by
the frozen text tower; the gallery policy (``gallery``) is ``reencode`` (every step embeds
every gallery with the current model) or ``first`` (a learnt domain's images keep the
embedding of the step it was learnt; unseen domains are embedded by the current model).

Metrics (per method and order, from the step × domain R@1 matrix A, mean of T2I and I2T):
average R@1 over the learnt domains after the last step; backward transfer
BWT = mean_{d<T} A[T, d] − A[d, d] (negative: forgetting); forgetting = mean_d
max_{t<T} A[t, d] − A[T, d]; forward transfer FWT = mean_{d≥1} A[d−1, d] − A₀[d] with A₀
the zero-shot model; OOD = A[T, ood]. Runs resume per step: each step writes the
learner's state (adapters, prototypes, tower, buffers, with the encoder's fingerprint)
to ``state.pt`` and then its results; a resumed run loads the state of its last
finished step and goes on from there.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qshift.errors import InputError
from qshift.io import read_config_file, read_json, stable_hash, write_json

WORLD_STYLES = ("flat", "photo", "sketch", "dark", "cartoon")


@dataclass
class ContinualConfig:
    name: str
    encoder: str = "world:mini-clip"
    domains: list[Any] = field(default_factory=lambda: list(WORLD_STYLES))
    ood: list[Any] = field(default_factory=lambda: ["pixel"])
    orders: list[int] = field(default_factory=lambda: [0])
    # a method name, or {method: NAME, label: LABEL, settings: {...}}: the same method with its
    # own settings over the shared ones (a validation grid runs several under their labels)
    methods: list[Any] = field(default_factory=lambda: ["zero-shot", "seq-ft", "dar"])
    settings: dict = field(default_factory=dict)
    max_train_images: int | None = 2000
    max_test_images: int | None = 1000
    gallery: str = "reencode"
    # images the frozen encoder is at home on (a collection spec; e.g. its training split): what
    # DAR's route_base describes the base model by and source_distill keeps in place. Never test data.
    source: str | None = None
    out: str | None = None

    def __post_init__(self) -> None:
        from qshift.continual.methods import TrainSettings, create_learner  # noqa: F401

        names = [self.domain_name(d) for d in self.domains]
        if not names:
            raise InputError("continual config: no domains")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise InputError(f"continual config: duplicate domain names {dup}")
        if self.gallery not in ("reencode", "first"):
            raise InputError(f"continual config: gallery must be reencode or first, got {self.gallery!r}")
        TrainSettings.from_dict(self.settings)
        if not self.methods:
            raise InputError("continual config: methods is empty")
        labels = [self.method_entry(m)[0] for m in self.methods]
        dup = sorted({n for n in labels if labels.count(n) > 1})
        if dup:
            raise InputError(f"continual config: duplicate method labels {dup}")
        for m in self.methods:
            s = TrainSettings.from_dict({**self.settings, **self.method_entry(m)[2]})
            if s.source_options and not self.source:
                raise InputError(f"continual config: method {self.method_entry(m)[0]!r} has "
                                 f"{' and '.join(s.source_options)}, which needs `source` (images the frozen "
                                 f"encoder was trained on, e.g. its train split)")

    @staticmethod
    def method_entry(m: Any) -> tuple[str, str, dict]:
        """(label, method, its settings over the shared ones) of a ``methods`` entry."""
        if isinstance(m, str):
            return m, m, {}
        if isinstance(m, dict) and "method" in m and set(m) <= {"method", "label", "settings"}:
            return str(m.get("label", m["method"])), str(m["method"]), dict(m.get("settings") or {})
        raise InputError(f"continual config: a method is a name or {{method, label, settings}}, got {m!r}")

    @staticmethod
    def domain_name(d: Any) -> str:
        if isinstance(d, str):
            return d
        if isinstance(d, dict) and {"name", "train", "test"} <= set(d):
            return str(d["name"])
        raise InputError(f"continual config: a domain is a world style or {{name, train, test}}, got {d!r}")

    @staticmethod
    def load(path: str | Path) -> "ContinualConfig":
        data = read_config_file(path)
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a mapping")
        known = {f.name for f in fields(ContinualConfig)}
        if set(data) - known:
            raise InputError(f"{path}: unknown keys {sorted(set(data) - known)}; known: {sorted(known)}")
        return ContinualConfig(**data)


def _collection(spec: Any, split: str) -> Any:
    from qshift.benchmark import resolve_collection

    if isinstance(spec, str):  # a world style
        if spec == "pixel" and split == "train":
            raise InputError("continual: the pixel style has no training split (it is held out)")
        return resolve_collection(f"world:{split}-{spec}")[1]
    return resolve_collection(spec[split])[1]


class DomainSet:
    """Pixels and frozen caption embeddings of every domain, prepared once."""

    def __init__(self, cfg: ContinualConfig, encoder: Any, store: Any) -> None:
        self.cfg, self.enc, self.store = cfg, encoder, store
        self.train: dict[str, Any] = {}
        self.test: dict[str, dict] = {}
        self._source: torch.Tensor | None = None

    def _pixels(self, paths: list) -> torch.Tensor:
        chunks = [self.enc.prepare([str(p) for p in paths[s:s + 256]], "image") for s in range(0, len(paths), 256)]
        return torch.cat(chunks)

    def _captions(self, coll: Any) -> tuple[torch.Tensor, np.ndarray]:
        emb = self.store.encode(self.enc, coll, "text", progress=False)
        return torch.from_numpy(emb.vectors), coll.caption_item()

    def training(self, spec: Any) -> Any:
        from qshift.continual.methods import Domain

        name = self.cfg.domain_name(spec)
        if name not in self.train:
            coll = _collection(spec if isinstance(spec, str) else spec, "train")
            if self.cfg.max_train_images:
                coll = coll.subset(self.cfg.max_train_images)
            if len(coll) == 0:
                raise InputError(f"continual: domain {name!r} has no training data")
            caps, item = self._captions(coll)
            self.train[name] = Domain(name, self._pixels(list(coll.image_paths)), caps, item)
        return self.train[name]

    def source(self) -> torch.Tensor:
        """Pixels of the config's source images (at most ``max_train_images``)."""
        if self._source is None:
            from qshift.benchmark import resolve_collection

            coll = resolve_collection(self.cfg.source)[1]
            if self.cfg.max_train_images:
                coll = coll.subset(self.cfg.max_train_images)
            if len(coll) == 0 or not coll.image_paths:
                raise InputError(f"continual: source {self.cfg.source!r} has no images")
            self._source = self._pixels(list(coll.image_paths))
        return self._source

    def testing(self, spec: Any) -> dict:
        name = self.cfg.domain_name(spec)
        if name not in self.test:
            coll = _collection(spec, "test")
            if self.cfg.max_test_images:
                coll = coll.subset(self.cfg.max_test_images)
            if len(coll) == 0:
                raise InputError(f"continual: domain {name!r} has no test data")
            caps, item = self._captions(coll)
            self.test[name] = {"pixels": self._pixels(list(coll.image_paths)), "captions": caps.numpy(),
                               "caption_item": item, "item_captions": coll.item_captions()}
        return self.test[name]


def recall(images: np.ndarray, t: dict) -> dict:
    from qshift.metrics import Qrels, retrieval_metrics, top_k_and_ranks

    out = {}
    for direction, q, g, qrels in (("t2i", t["captions"], images, Qrels.from_labels(t["caption_item"])),
                                   ("i2t", images, t["captions"], Qrels.from_lists(t["item_captions"]))):
        k = min(10, len(g))  # a gallery under 10 (a held-out slice): R@K from the full ranks
        labels, ranks = top_k_and_ranks(q @ g.T, qrels, k)
        m = retrieval_metrics(labels, qrels, (1, 5, 10), k_map=k, full_ranks=ranks)
        out[direction] = {k: m[k] for k in ("R@1", "R@5", "R@10")}
    out["R@1"] = (out["t2i"]["R@1"] + out["i2t"]["R@1"]) / 2
    return out


def domain_order(names: list[str], seed: int) -> list[int]:
    """Order 0 is the listed one; any other seed draws a permutation that differs from it."""
    n = len(names)
    if seed == 0 or n < 2:
        return list(range(n))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    while (perm == np.arange(n)).all():
        perm = rng.permutation(n)
    return perm.tolist()


def run_continual(cfg: ContinualConfig, out: Path | None = None, store: Any = None, progress: bool = True,
                  console: Any = None) -> Path:
    from qshift.continual.methods import TrainSettings, create_learner
    from qshift.encoders import create_encoder
    from qshift.paths import cache_dir
    from qshift.progress import progress_bar
    from qshift.store import EmbeddingStore

    out = Path(out or cfg.out or Path("runs") / "continual" / cfg.name)
    store = store or EmbeddingStore(cache_dir() / "store")
    probe = create_encoder(cfg.encoder)
    data = DomainSet(cfg, probe, store)
    names = [cfg.domain_name(d) for d in cfg.domains]
    oods = [cfg.domain_name(d) for d in cfg.ood]
    # what a step's result depends on: not the list of methods or orders (each order and method
    # has its own folder, so adding one reuses the others) nor the output folder; the source
    # images only for the methods that read them
    key = stable_hash({**{k: v for k, v in asdict(cfg).items() if k != "source"},
                       "methods": None, "orders": None, "out": None, "encoder_fp": probe.fingerprint()})[:16]
    write_json(out / "config.json", {**asdict(cfg), "key": key})
    runs = [(o, m) for o in cfg.orders for m in cfg.methods]
    shared_key = key
    with progress_bar(f"continual {cfg.name}", len(runs) * len(names), progress) as bar:
        for order_seed, entry in runs:
            method, base, over = cfg.method_entry(entry)
            settings = TrainSettings.from_dict({**cfg.settings, **over})
            key = shared_key if not over else stable_hash([shared_key, base, over])[:16]
            if settings.source_options:
                key = stable_hash([key, cfg.source])[:16]
            order = [cfg.domains[i] for i in domain_order(names, order_seed)]
            folder = out / f"order{order_seed}" / method
            done = [read_json(folder / f"step{t}.json") for t in range(len(order))
                    if (folder / f"step{t}.json").is_file()]
            if len(done) == len(order) and all(s.get("key") == key for s in done):
                bar.advance(len(order))
                continue
            enc = create_encoder(cfg.encoder)
            learner = create_learner(base, enc, settings, len(order))
            if learner.needs_source:
                learner.use_source(data.source())
            start, kept = _resume(folder, key, learner, order, data, done)
            bar.advance(start)
            try:
                for t, spec in enumerate(order):
                    if t < start:
                        continue
                    d = data.training(spec)
                    t0 = time.perf_counter()
                    info = learner.learn(d)
                    seconds = time.perf_counter() - t0
                    evals = {}
                    for ev in [*cfg.domains, *cfg.ood]:
                        n = cfg.domain_name(ev)
                        test = data.testing(ev)
                        if cfg.gallery == "first" and n in kept:
                            images = kept[n]
                        else:
                            images = learner.embed(test["pixels"])
                            if cfg.gallery == "first" and n == d.name:
                                kept[n] = images
                        evals[n] = recall(images, test)
                    step = {"key": key, "method": method, "order": [cfg.domain_name(x) for x in order], "step": t,
                            "domain": d.name, "train": info, "train_seconds": seconds, "eval": evals}
                    _save_state(folder, key, t, learner, kept)
                    write_json(folder / f"step{t}.json", step)
                    if console is not None:
                        console.print(f"{method:>10s} order {order_seed} step {t} ({d.name}): mean R@1 "
                                      f"{np.mean([v['R@1'] for k, v in evals.items() if k in names]):.2f}")
                    bar.advance(1)
            finally:
                learner.close()
    summarize(out, cfg, names, oods)
    return out


def _save_state(folder: Path, key: str, step: int, learner: Any, kept: dict) -> None:
    """The learner after ``step`` (adapters, prototypes, tower, buffers; with the encoder's
    fingerprint), written atomically before the step's results."""
    from qshift.io import atomic_path

    with atomic_path(folder / "state.pt", suffix=".pt") as tmp:
        torch.save({"key": key, "step": step, "learner": learner.state_dict(), "kept": kept}, tmp)


def _resume(folder: Path, key: str, learner: Any, order: list, data: "DomainSet", done: list
            ) -> tuple[int, dict[str, np.ndarray]]:
    """The first step still to run (after the last finished one whose saved state matches,
    which is loaded into ``learner``) and the kept gallery embeddings."""
    finished = 0
    while finished < len(done) and done[finished].get("key") == key and done[finished]["step"] == finished:
        finished += 1
    path = folder / "state.pt"
    if finished == 0 or not path.is_file():
        return 0, {}
    state = torch.load(path, weights_only=False)
    if state.get("key") != key or state.get("step") != finished - 1:
        return 0, {}
    learner.load_state_dict(state["learner"], {ContinualConfig.domain_name(s): data.training(s)
                                                for s in order[:finished]})
    return finished, dict(state["kept"])


def summarize(out: Path, cfg: ContinualConfig, names: list[str], oods: list[str]) -> dict:
    """Matrix, average R@1, BWT, forgetting, FWT and OOD per method and order (results.json)."""
    rows: dict = {}
    for o in cfg.orders:
        zs_dir = out / f"order{o}" / "zero-shot"
        zs = read_json(zs_dir / "step0.json")["eval"] if (zs_dir / "step0.json").is_file() else None
        for m in (cfg.method_entry(e)[0] for e in cfg.methods):
            steps = [read_json(out / f"order{o}" / m / f"step{t}.json") for t in range(len(names))]
            order = steps[0]["order"]
            mat = np.array([[s["eval"][n]["R@1"] for n in order] for s in steps])
            last = mat[-1]
            res = {"order": order, "matrix": mat.tolist(), "average_r1": float(last.mean()),
                   "bwt": float(np.mean([mat[-1, d] - mat[d, d] for d in range(len(order) - 1)])),
                   "forgetting": float(np.mean([mat[:-1, d].max() - mat[-1, d] for d in range(len(order) - 1)])),
                   "ood_r1": {n: steps[-1]["eval"][n]["R@1"] for n in oods},
                   "t2i_r1_last": float(np.mean([steps[-1]["eval"][n]["t2i"]["R@1"] for n in order])),
                   "i2t_r1_last": float(np.mean([steps[-1]["eval"][n]["i2t"]["R@1"] for n in order])),
                   "train_seconds": [s["train_seconds"] for s in steps],
                   "adapter_parameters": steps[-1]["train"].get("adapter_parameters")}
            if zs is not None:
                res["fwt"] = float(np.mean([mat[d - 1, d] - zs[order[d]]["R@1"] for d in range(1, len(order))]))
            rows.setdefault(m, {})[str(o)] = res
    summary = {"config": asdict(cfg), "domains": names, "ood": oods, "results": rows,
               "mean_over_orders": {m: {k: float(np.mean([r[str(o)][k] for o in cfg.orders]))
                                        for k in ("average_r1", "bwt", "forgetting", "fwt")
                                        if k in r[str(cfg.orders[0])]}
                                    | ({"ood_r1": float(np.mean([np.mean(list(r[str(o)]["ood_r1"].values()))
                                                                for o in cfg.orders]))} if oods else {})
                                    for m, r in rows.items()}}
    write_json(out / "results.json", summary)
    _heatmaps(out, summary)
    return summary


def _heatmaps(out: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary["results"])
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.2), squeeze=False)
    for ax, m in zip(axes[0], methods):
        r = summary["results"][m][next(iter(summary["results"][m]))]
        mat = np.array(r["matrix"])
        ax.imshow(mat, vmin=0, vmax=max(1.0, float(mat.max())), cmap="viridis")
        ax.set_title(m, fontsize=9)
        ax.set_xticks(range(len(r["order"])), r["order"], rotation=60, fontsize=7)
        ax.set_yticks(range(len(r["order"])), [f"after {d}" for d in r["order"]], fontsize=7)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                ax.text(j, i, f"{mat[i, j]:.0f}", ha="center", va="center", fontsize=6, color="white")
    fig.suptitle("R@1 (mean of T2I and I2T) after each step × domain, first order")
    fig.tight_layout()
    from qshift.io import atomic_path

    with atomic_path(out / "matrix.png", suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
