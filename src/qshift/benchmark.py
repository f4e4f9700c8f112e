"""The grid benchmark runner (``qshift bench CONFIG``).

A YAML or TOML config names the encoder, the collection, the direction, the shifts ×
severities (plus optional mixed / source-share streams), the methods and the seeds. A
method is a named pipeline (``zero-shot``, ``rest``, ``{name: quari, checkpoint: …}``)
or ``{pipeline: [stages…], label: …}`` (:mod:`qshift.methods`). The runner encodes the
clean gallery once (through the embedding store), builds each shifted query set once
(cached under ``OUT/shifts``), streams every cell's queries through its method's
:class:`~qshift.pipeline.Pipeline` in a seeded order, and writes one JSON per cell
(``OUT/cells/``) and the table ``OUT/results.{csv,parquet}``. A cell whose JSON exists
for the same config is skipped, so an interrupted run resumes. Shifts touch the
queries only; the gallery stays clean.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from qshift.data.collection import Collection, load_collection
from qshift.data.corruptions import expand, modality_of
from qshift.data.streams import CLEAN, mixed_stream, source_share_stream
from qshift.errors import InputError
from qshift.io import read_config_file, read_json, stable_hash, write_json, write_text
from qshift.directions import DIRECTIONS, query_modality
from qshift.metrics import first_positive_rank, retrieval_metrics, top_k_and_ranks
from qshift.methods import method_label, method_stages
from qshift.progress import progress_bar

STREAMS = ("mixed", "source_share")


@dataclass
class BenchConfig:
    name: str
    encoder: str
    collection: str
    direction: str = "t2i"
    shifts: list[str] = field(default_factory=lambda: ["clean"])
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    streams: list[str] = field(default_factory=list)
    stream_severities: list[int] = field(default_factory=lambda: [5])
    methods: list[Any] = field(default_factory=lambda: ["zero-shot"])
    seeds: list[int] = field(default_factory=lambda: [0])
    max_queries: int | None = None
    query_items: str | None = None  # "START:STOP": only these items' captions query (the gallery stays whole)
    query_caption: int = 0
    # per-shift cells: the query set corrupted under `passes` corruption seeds (seed + 1000·p),
    # one continual pass over all of them — a small val split then gives an adaptation stream
    # as long as the test's (reconstruction: items repeat with fresh noise). Streams: unchanged.
    passes: int = 1
    # source anchors of adaptation (TCR/REST/EATA): texts disjoint from the test queries — a
    # spec of qshift.data.texts, "auto" (the world's train split for world collections, none
    # otherwise) or "none"; ``source_size`` of them, drawn with a fixed seed
    source: Any = "auto"
    source_size: int = 1024
    min_similarity: float | None = None
    corrupt_side: int = 224       # image corruptions: smaller images are corrupted at this side
    batch_size: int = 64
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    k_map: int = 10
    out: str | None = None
    format: str = "auto"

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise InputError(f"config: direction must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}")
        want = query_modality(self.direction)
        names = [s for s in self.shifts if s != CLEAN]
        for s in expand(names):
            if modality_of(s) != want:
                raise InputError(f"config: shift {s!r} corrupts {modality_of(s)}s, but {self.direction} queries "
                                 f"are {want}s (shifts touch the queries only)")
        for s in self.streams:
            if s not in STREAMS:
                raise InputError(f"config: unknown stream {s!r}; known: {', '.join(STREAMS)}")
        for sev in [*self.severities, *self.stream_severities]:
            if sev not in (1, 2, 3, 4, 5):
                raise InputError(f"config: severities must be 1–5, got {sev!r}")
        if self.corrupt_side < 0:
            raise InputError(f"config: corrupt_side must be >= 0 (0: corrupt at the native size), "
                             f"got {self.corrupt_side}")
        if not isinstance(self.passes, int) or self.passes < 1:
            raise InputError(f"config: passes must be an integer >= 1, got {self.passes!r}")
        if not self.methods:
            raise InputError("config: methods is empty")
        labels = [method_label(m) for m in self.methods]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise InputError(f"config: methods {dup} appear twice; give each setting its own 'label'")
        for m in self.methods:  # unknown names / stages / options fail before any work
            check_pipeline(method_stages(m), f"config: method {method_label(m)!r}")

    @property
    def shift_names(self) -> list[str]:
        return expand([s for s in self.shifts if s != CLEAN])

    @staticmethod
    def from_dict(d: dict, where: str = "config") -> "BenchConfig":
        known = {f.name for f in fields(BenchConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            import difflib

            hints = [f"{k!r}" + (f" (did you mean {difflib.get_close_matches(k, known, 1)[0]!r}?)"
                                 if difflib.get_close_matches(k, known, 1) else "") for k in unknown]
            raise InputError(f"{where}: unknown key(s) {', '.join(hints)}; known: {', '.join(sorted(known))}")
        missing = [k for k in ("name", "encoder", "collection") if k not in d]
        if missing:
            raise InputError(f"{where}: missing required key(s) {missing}")
        return BenchConfig(**d)


def check_pipeline(stages: list, where: str) -> None:
    """Build every stage of a pipeline config (without binding it): bad names or options
    fail here, naming the method."""
    from qshift.pipeline import create_stage, parse_pipeline

    try:
        for spec in parse_pipeline(stages, where):
            create_stage(spec.kind, spec.name, spec.options)
    except InputError as exc:
        msg = str(exc)
        raise InputError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def load_config(path: str | Path) -> BenchConfig:
    data = read_config_file(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level")
    return BenchConfig.from_dict(data, str(path))


def resolve_collection(spec: str, fmt: str = "auto", base: Path | None = None) -> tuple[Path, Collection]:
    """``world:SPLIT[-STYLE]``, ``shared:REL/PATH`` (under ``../shared/data``) or a path."""
    if spec.startswith(("world-ilias:", "world-inquire:")):
        from qshift.world.protocols import protocol_collection

        coll = protocol_collection(spec, progress=True)
        return Path(coll.source), coll
    if spec.startswith("world:"):
        from qshift.world import world_collection

        path = world_collection(spec.removeprefix("world:"), progress=True)
    elif spec.startswith("shared:"):
        from qshift.paths import shared_data_dir

        root = shared_data_dir()
        if root is None:
            raise InputError(f"{spec}: no shared data folder (set QSHIFT_SHARED_DATA)")
        path = root / spec.removeprefix("shared:")
    else:
        path = Path(spec)
        if not path.is_absolute() and base is not None and not path.exists():
            path = base / path
    return path, load_collection(path, fmt)


class Grid:
    """One benchmark: shared gallery/query state and the cells to run."""

    def __init__(self, cfg: BenchConfig, out: Path, store: Any, progress: bool = True) -> None:
        from qshift.encoders import create_encoder

        self.cfg, self.out, self.store, self.progress = cfg, out, store, progress
        self.coll_path, coll = resolve_collection(cfg.collection, cfg.format)
        self.encoder = create_encoder(cfg.encoder)
        # what every cell depends on; a cell's own method and parameters are checked per cell, so
        # adding a method to a grid runs only its cells
        what = {**asdict(cfg), "out": None, "methods": None, "encoder_fp": self.encoder.fingerprint(),
                "collection_key": coll.key()}
        if cfg.passes == 1:  # the default leaves the key of every earlier grid as it was
            del what["passes"]
        self.key = stable_hash(what)[:16]
        self.coll = coll
        self._setup()

    # -- clean task ------------------------------------------------------------------
    def _setup(self) -> None:
        cfg, coll = self.cfg, self.coll
        from qshift.retrieval import build_task

        task = build_task(coll, self.encoder, cfg.direction, self.store, progress=self.progress,
                          query_caption=cfg.query_caption)
        raw = task.raw
        items = task.meta.get("query_items")  # the item each query describes (None: queries are not items)
        keep = np.arange(len(raw))
        if cfg.query_items:
            if items is None:
                raise InputError(f"config: query_items needs queries that are items' captions or images; "
                                 f"{coll.name}'s queries are not")
            start, _, stop = cfg.query_items.partition(":")
            try:
                lo, hi = int(start or 0), int(stop) if stop else len(coll)
            except ValueError:
                raise InputError(f"config: query_items must be 'START:STOP', got {cfg.query_items!r}") from None
            keep = keep[(items[keep] >= lo) & (items[keep] < hi)]
            if not len(keep):
                raise InputError(f"config: query_items {cfg.query_items!r} selects no query")
        if cfg.max_queries and cfg.max_queries < len(keep):
            keep = np.sort(np.random.default_rng(0).choice(keep, cfg.max_queries, replace=False))
        self.raw_queries = [raw[i] for i in keep]
        # what the source anchors must not contain: every caption of a queried item (or the queries)
        self.query_item_texts = {c for i in sorted(set(items[keep].tolist())) for c in coll.captions[i]} \
            if items is not None and query_modality(cfg.direction) == "text" else set(map(str, self.raw_queries))
        self._raw_hash = stable_hash(self.raw_queries)  # part of every shifted set's key
        self.clean_queries = task.queries[keep]
        self.qrels = task.qrels.take(keep)
        self.gallery = task.gallery
        self.source_texts, self.source_info = self._source()

    def _source(self) -> tuple[list[str] | None, dict]:
        """The adaptation source anchors: a fixed-seed sample of ``source_size`` texts from
        data disjoint from the test queries. Texts that equal a caption of a queried item (a
        procedural world repeats short captions across splits) are dropped and counted; a
        source that shares more than a tenth of its texts with them is refused."""
        cfg = self.cfg
        spec = cfg.source
        if spec == "auto":
            spec = "world:train" if str(cfg.collection).startswith("world:") else None
        if spec in (None, "none") or query_modality(cfg.direction) != "text":
            return None, {"spec": None}
        from qshift.data.texts import spec_texts

        texts = list(dict.fromkeys(spec_texts(spec, "config: source")))
        clean = self.query_item_texts
        shared = [t for t in texts if t in clean]
        if len(shared) > 0.1 * len(texts):
            raise InputError(f"config: source {spec!r} shares {len(shared)} of its {len(texts)} texts with the test "
                             f"queries (e.g. {shared[0]!r}); anchors must come from data disjoint from them")
        texts = [t for t in texts if t not in clean]
        if len(texts) > cfg.source_size:
            pick = np.sort(np.random.default_rng(0).choice(len(texts), cfg.source_size, replace=False))
            texts = [texts[i] for i in pick]
        return texts, {"spec": spec, "texts": len(texts), "dropped_shared": len(shared),
                       "hash": stable_hash(texts)[:12]}

    # -- shifted queries ----------------------------------------------------------------
    def shift_key(self, shift: str, severity: int, seed: int) -> str:
        """What one shifted query set depends on (not the methods, so adding one reuses it)."""
        cfg = self.cfg
        what = {"queries": self._raw_hash, "shift": shift, "severity": severity, "seed": seed}
        if modality_of(shift) == "text":
            what["min_similarity"] = cfg.min_similarity
        else:
            what["corrupt_side"] = cfg.corrupt_side
        return stable_hash(what)[:12]

    def shifted(self, shift: str, severity: int, seed: int) -> tuple[list[Any], dict]:
        """Raw shifted queries (texts, or paths of corrupted images) for one cell, cached."""
        if shift == CLEAN:
            return self.raw_queries, {"generator": "none"}
        key = self.shift_key(shift, severity, seed)
        cache = self.out / "shifts" / f"{shift}-s{severity}-seed{seed}.json"
        if cache.is_file():
            data = read_json(cache)
            if data.get("key") == key:
                return data["queries"], data["info"]
        if modality_of(shift) == "text":
            from qshift.data.corruptions.text import corrupt_texts

            enc = None
            if self.cfg.min_similarity is not None:
                from qshift.encoders import create_encoder

                enc = create_encoder("st:all-MiniLM-L6-v2")
            res = corrupt_texts(self.raw_queries, shift, severity, seed, min_similarity=self.cfg.min_similarity,
                                encoder=enc)
            queries, info = res.texts, {"generator": res.generator, **res.stats}
        else:
            folder = self.out / "shifts" / f"{shift}-s{severity}-seed{seed}-{key}"
            queries, info = self._corrupt_images(folder, shift, severity, seed), {"generator": "imagecorruptions"}
        write_json(cache, {"key": key, "queries": [str(q) for q in queries], "info": info})
        return queries, info

    def _corrupt_images(self, folder: Path, shift: str, severity: int, seed: int) -> list[str]:
        """Corrupted copies of the query images in ``folder`` (its name carries the shift key,
        so images of other settings are never reused; a partial folder resumes)."""
        from qshift.data.corruptions.image import corrupt_image
        from qshift.data.images import load_image
        from qshift.io import write_bytes

        paths = []
        with progress_bar(f"corrupt {shift} s{severity}", len(self.raw_queries), self.progress) as bar:
            for k, src in enumerate(self.raw_queries):
                target = folder / f"{k:06d}.png"
                if not target.is_file():
                    buf = io.BytesIO()
                    corrupt_image(load_image(src), shift, severity, seed, k,
                                  reference_side=self.cfg.corrupt_side).save(buf, format="PNG")
                    write_bytes(target, buf.getvalue())
                paths.append(str(target))
                bar.advance(1)
        return paths

    def encode(self, queries: list[Any], tag: str) -> np.ndarray:
        """Frozen-encoder embeddings of raw queries, through the store."""
        if query_modality(self.cfg.direction) == "image":
            coll = Collection(f"bench-{self.cfg.name}-{tag}", [f"q{i}" for i in range(len(queries))],
                              [["-"]] * len(queries), [Path(q) for q in queries])
            return self.store.encode(self.encoder, coll, "image", progress=self.progress).vectors
        coll = Collection(f"bench-{self.cfg.name}-{tag}", [f"q{i}" for i in range(len(queries))],
                          [[q] for q in queries])
        return self.store.encode(self.encoder, coll, "text", progress=self.progress).vectors

    # -- cells ------------------------------------------------------------------------
    def cells(self) -> list[dict]:
        cfg = self.cfg
        out = []
        for seed in cfg.seeds:
            for m in cfg.methods:
                if isinstance(m, str):
                    mname, params = m, {}
                elif "pipeline" in m:
                    mname, params = "pipeline", {"pipeline": m["pipeline"]}
                else:
                    mname, params = m["name"], {k: v for k, v in m.items() if k not in ("name", "label", "labels")}
                base = {"method": method_label(m), "method_name": mname, "params": params, "seed": seed}
                if isinstance(m, dict) and m.get("labels"):
                    base["sees_labels"] = True  # a ceiling row (e.g. the oracle): it is given the true positives
                if CLEAN in cfg.shifts:
                    out.append({**base, "shift": CLEAN, "severity": 0})
                for s in self.cfg.shift_names:
                    for sev in cfg.severities:
                        out.append({**base, "shift": s, "severity": sev})
                for stream in cfg.streams:
                    out.append({**base, "shift": f"stream:{stream}", "severity": 0})
        return out

    @staticmethod
    def cell_method(cell: dict) -> str | dict:
        """The method entry a cell runs (the inverse of :meth:`cells`)."""
        if cell["method_name"] == "pipeline":
            return {"pipeline": cell["params"]["pipeline"]}
        return {"name": cell["method_name"], **cell["params"]}

    def cell_path(self, cell: dict) -> Path:
        safe = cell["method"].replace("/", "_").replace(" ", "_")
        return self.out / "cells" / safe / f"{cell['shift'].replace(':', '_')}-s{cell['severity']}-seed{cell['seed']}.json"

    def run_cell(self, cell: dict) -> dict:
        cfg = self.cfg
        seed = cell["seed"]
        stream_items = None
        if cell["shift"].startswith("stream:"):
            stream_items = self._stream(cell["shift"].split(":", 1)[1], seed)
            raw, info, tags = self._stream_queries(stream_items, seed)
            order = np.arange(len(raw))  # the stream fixes the order
            encode = lambda: self._stream_embeddings(stream_items, seed)  # noqa: E731
        else:
            raw, info, order, encode = self._passes(cell["shift"], cell["severity"], seed)
        qrels = self.qrels.take([it.query for it in stream_items] if stream_items is not None
                                else np.tile(np.arange(len(self.qrels)), cfg.passes))
        from qshift.pipeline import Pipeline, PipelineContext

        ctx = PipelineContext(self.encoder, cfg.direction, gallery=self.gallery, batch_size=cfg.batch_size,
                              seed=seed, source_texts=self.source_texts)
        if cell.get("sees_labels"):  # only rows marked `labels: true` (ceilings), never a method
            ctx.extra["labels"] = [qrels.indices[qrels.indptr[i]:qrels.indptr[i + 1]] for i in range(len(qrels))]
        t0 = time.perf_counter()
        with Pipeline.from_method(self.cell_method(cell), ctx) as pipe:
            scores = pipe.score(raw, order, embeddings=encode())
            seconds = time.perf_counter() - t0
            clean_after = self.clean_r1_after(pipe) if stream_items is not None else None
        if not np.isfinite(scores).all():
            raise RuntimeError(f"method {cell['method']} returned non-finite scores in cell {cell}")
        k = min(max(max(cfg.ks), cfg.k_map), scores.shape[1])
        top, ranks = top_k_and_ranks(scores, qrels, k)
        metrics = retrieval_metrics(top, qrels, cfg.ks, k_map=min(cfg.k_map, k), full_ranks=ranks)
        hits = (ranks[order] == 0).astype(float)  # R@1 along the stream, in 10 windows
        curve = [float(w.mean() * 100) for w in np.array_split(hits, min(10, len(hits)))]
        result = {**cell, "key": self.key, "name": cfg.name, "direction": cfg.direction,
                  "encoder": self.encoder.fingerprint(), "collection": str(self.coll_path),
                  "metrics": metrics, "queries": len(raw), "gallery": int(len(self.gallery)),
                  "seconds": seconds, "queries_per_s": len(raw) / max(seconds, 1e-9),
                  "stage_seconds": pipe.timings, "stage_info": pipe.info, "source": self.source_info,
                  "curve_r1": curve, "shift_info": info}
        if stream_items is not None:
            per = {}
            for s in sorted({it.shift for it in stream_items}):
                mask = np.array([it.shift == s for it in stream_items])
                per[s] = float((ranks[mask] == 0).mean() * 100)
            result["per_shift_r1"] = per
            result["clean_r1_after"] = clean_after
        return result

    def _passes(self, shift: str, severity: int, seed: int) -> tuple[list[Any], dict, np.ndarray, Any]:
        """Raw queries, shift info, stream order and an embedding thunk of a per-shift cell:
        ``passes`` copies of the query set (corruption seed ``seed + 1000·p`` for pass p), each
        pass in its own seeded order, one after the other."""
        raws, infos, orders, tags = [], [], [], []
        for p in range(self.cfg.passes):
            s = seed + 1000 * p
            raw, info = self.shifted(shift, severity, s)
            rng = np.random.default_rng([seed, 7] if p == 0 else [seed, 7, p])
            orders.append(rng.permutation(len(raw)) + len(raw) * p)
            raws.append(raw)
            infos.append(info)
            tags.append(f"{shift}-s{severity}-seed{s}")

        def encode() -> np.ndarray:
            if shift == CLEAN:
                return np.concatenate([self.clean_queries] * len(raws))
            return np.concatenate([self.encode(r, t) for r, t in zip(raws, tags)])

        info = infos[0] if len(infos) == 1 else {"passes": len(infos), "per_pass": infos}
        return [q for r in raws for q in r], info, np.concatenate(orders), encode

    def clean_r1_after(self, pipe: Any, chunk: int = 256) -> float:
        """R@1 of every clean query embedded by the query tower as the stream left it (the
        frozen tower where no stage adapts): zero-shot clean R@1 minus this is forgetting."""
        ad = next((s.adapter for s in pipe.stages if s.kind == "adapt"), None)
        q = self.clean_queries if ad is None else np.concatenate(
            [ad.embed(self.raw_queries[i:i + chunk], self.clean_queries[i:i + chunk])
             for i in range(0, len(self.raw_queries), chunk)])
        return float((first_positive_rank(q @ self.gallery.T, self.qrels) == 0).mean() * 100)

    def _stream(self, kind: str, seed: int) -> list:
        n = len(self.raw_queries)
        shifts, sevs = self.cfg.shift_names, self.cfg.stream_severities
        if not shifts:
            raise InputError("config: streams need at least one shift in 'shifts'")
        return mixed_stream(n, shifts, sevs, seed) if kind == "mixed" else source_share_stream(n, shifts, sevs, seed)

    def _stream_queries(self, items: list, seed: int) -> tuple[list[Any], dict, list[str]]:
        raw, tags = [], []
        sets: dict[tuple[str, int], list[Any]] = {}
        for it in items:
            if (it.shift, it.severity) not in sets:
                sets[(it.shift, it.severity)] = self.shifted(it.shift, it.severity, seed)[0]
            raw.append(sets[(it.shift, it.severity)][it.query])
            tags.append(f"{it.shift}-s{it.severity}")
        return raw, {"generator": "stream", "shifts": sorted({t for t in tags})}, tags

    def _stream_embeddings(self, items: list, seed: int) -> np.ndarray:
        out = np.empty((len(items), self.gallery.shape[1]), np.float32)
        groups: dict[tuple[str, int], list[int]] = {}
        for pos, it in enumerate(items):
            groups.setdefault((it.shift, it.severity), []).append(pos)
        for (shift, sev), positions in groups.items():
            if shift == CLEAN:
                emb = self.clean_queries
            else:
                emb = self.encode(self.shifted(shift, sev, seed)[0], f"{shift}-s{sev}-seed{seed}")
            out[positions] = emb[[items[p].query for p in positions]]
        return out


def run_benchmark(cfg: BenchConfig, out: Path | None = None, store: Any = None, progress: bool = True,
                  console: Any = None) -> Path:
    """Run (or resume) every cell; returns the output folder."""
    from qshift.paths import cache_dir
    from qshift.store import EmbeddingStore

    out = Path(out or cfg.out or Path("runs") / "bench" / cfg.name)
    store = store or EmbeddingStore(cache_dir() / "store")
    grid = Grid(cfg, out, store, progress)
    write_json(out / "config.json", {**asdict(cfg), "key": grid.key})
    cells = grid.cells()
    results = []
    with progress_bar(f"bench {cfg.name}", len(cells), progress) as bar:
        for cell in cells:
            path = grid.cell_path(cell)
            res = read_json(path) if path.is_file() else None
            if res is None or res.get("key") != grid.key or res.get("method_name") != cell["method_name"] \
                    or res.get("params") != cell["params"]:
                res = grid.run_cell(cell)
                write_json(path, res)
                if console is not None:
                    console.print(f"{cell['method']:>12s} {cell['shift']:>18s} s{cell['severity']} "
                                  f"seed {cell['seed']}: R@1 {res['metrics']['R@1']:.2f}")
            results.append(res)
            bar.advance(1)
    write_table(results, out)
    return out


def write_table(results: list[dict], out: Path) -> None:
    import pandas as pd

    rows = []
    for r in results:
        rows.append({"name": r["name"], "direction": r["direction"], "method": r["method"], "shift": r["shift"],
                     "severity": r["severity"], "seed": r["seed"], **r["metrics"], "queries": r["queries"],
                     "gallery": r["gallery"], "seconds": r["seconds"], "queries_per_s": r["queries_per_s"]})
    df = pd.DataFrame(rows)
    write_text(out / "results.csv", df.to_csv(index=False))
    from qshift.io import atomic_path

    with atomic_path(out / "results.parquet", suffix=".parquet") as tmp:
        df.to_parquet(tmp, index=False)
    write_text(out / "cells.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in results))
