"""The ``qshift`` command line (typer + rich)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from qshift.clikit import (
    CaptionsPerItemOpt, EncoderOpt, FormatOpt, ImageRootOpt, JsonOpt, LimitOpt, OnErrorOpt, SplitOpt, StoreOpt,
    _collection, _handle_errors, _print_json, _store, out)
from qshift.continual.cli import app as continual_app
from qshift.quari.cli import app as quari_app
from qshift.world.cli import app as world_app

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Image–text retrieval over frozen encoders that stays accurate under query shift.")
app.add_typer(world_app, name="world")
app.add_typer(quari_app, name="quari")
app.add_typer(continual_app, name="continual")

def metrics_table(rows: dict[str, dict[str, float]], title: str) -> Table:
    cols = [c for c in next(iter(rows.values())) if c not in ("queries", "gallery")]
    table = Table(title=title)
    table.add_column("task")
    for c in cols:
        table.add_column(c, justify="right")
    table.add_column("queries × gallery", justify="right")
    for name, m in rows.items():
        table.add_row(name, *[f"{m[c]:.2f}" for c in cols], f"{int(m['queries'])} × {int(m['gallery'])}")
    return table


@app.command()
@_handle_errors
def encode(collection: Path = typer.Argument(..., help="Collection file or folder."),
           encoder: str = EncoderOpt,
           modality: str = typer.Option("text", help="text, image or both."),
           store: Optional[Path] = StoreOpt, fmt: str = FormatOpt, limit: Optional[int] = LimitOpt,
           captions_per_item: int = CaptionsPerItemOpt,
           image_root: Optional[Path] = ImageRootOpt,
           split: str = SplitOpt,
           shard_size: int = typer.Option(2048, help="Rows per cache shard."),
           batch_size: Optional[int] = typer.Option(None, help="Encoder batch size."),
           on_error: str = OnErrorOpt,
           ray: bool = typer.Option(False, "--ray", help="Encode the missing shards on Ray (a local instance, or "
                                    "the cluster at --address); the store is the same as the local path's."),
           address: Optional[str] = typer.Option(None, help="Ray cluster: HOST:PORT, ray://HOST:PORT or auto."),
           workers: int = typer.Option(2, help="Ray: encoder actors (one model load each; a GPU each if any)."),
           as_json: bool = JsonOpt) -> None:
    """Encode a collection into the embedding cache (resumes; re-encodes only what changed).

    Example: `qshift encode ../shared/data/coco-5k-test/captions.txt -e st:all-MiniLM-L6-v2`;
    on Ray: `qshift encode world:test -e world:mini-clip --modality image --ray --workers 2`
    """
    from qshift.encoders import create_encoder

    coll = _collection(collection, fmt, limit, captions_per_item, image_root, split)
    enc = create_encoder(encoder)
    modalities = ["text", "image"] if modality == "both" else [modality]
    st = _store(store)
    report = []
    for m in modalities:
        t0 = time.perf_counter()
        runner = None
        if ray:
            from qshift.scale.encode import ray_runner

            runner = ray_runner(enc, m, workers=workers, address=address, on_error=on_error, batch_size=batch_size)
        emb = st.encode(enc, coll, m, shard_size=shard_size, on_error=on_error, progress=not as_json,
                        batch_size=batch_size, runner=runner)
        report.append({"modality": m, "entry": str(emb.path), "n": len(emb.ids), "dim": emb.dim,
                       "skipped": int((~emb.valid).sum()), "seconds": round(time.perf_counter() - t0, 3)})
    if as_json:
        _print_json(report)
        return
    for r in report:
        out.print(f"{r['modality']}: {r['n']} × {r['dim']} in {r['seconds']:.2f}s "
                  f"({r['skipped']} skipped) → {r['entry']}")


@app.command()
@_handle_errors
def index(entry: Path = typer.Argument(..., help="A store entry directory (printed by `qshift encode`)."),
          out_dir: Path = typer.Option(..., "--out", "-o", help="Where to write the index."),
          factory: str = typer.Option("Exact", help="Exact, Exact,fp16, Flat, IVF1024,Flat, HNSW32, IVF256,PQ32, ..."),
          nprobe: Optional[int] = typer.Option(None, help="IVF lists visited per query."),
          ef_search: Optional[int] = typer.Option(None, help="HNSW efSearch."),
          as_json: bool = JsonOpt) -> None:
    """Build an index over stored embeddings.

    Example: `qshift index ~/.cache/qshift/store/coco.image.ab12… -o runs/coco-index --factory HNSW32`
    """
    from qshift.index import build_index
    from qshift.store import EmbeddingStore

    emb = EmbeddingStore.load(entry)
    params = {k: v for k, v in (("nprobe", nprobe), ("efSearch", ef_search)) if v is not None}
    t0 = time.perf_counter()
    idx = build_index(emb.dim, factory, **params)
    idx.add(emb.vectors[emb.valid], [i for i, v in zip(emb.ids, emb.valid) if v])
    idx.meta = {"fingerprint": emb.fingerprint, "modality": emb.modality, "entry": str(entry)}
    idx.save(out_dir)
    info = {"index": str(out_dir), "factory": factory, "n": len(idx), "dim": emb.dim,
            "seconds": round(time.perf_counter() - t0, 3)}
    _print_json(info) if as_json else out.print(f"{factory} index of {len(idx)} × {emb.dim} → {out_dir}")


def pipeline_entries(pipeline: Optional[Path], method: Optional[str], adapt: Optional[str],
                     quari: Optional[Path], rerank: Optional[int], refine: Optional[str] = None) -> list:
    """One stage list from ``--pipeline``, ``--method`` and the short stage flags (each flag
    adds its stage at its kind's place in refine → encode → adapt → transform → rank)."""
    from qshift.methods import method_stages
    from qshift.pipeline import KINDS, parse_pipeline

    entries: list = []
    if pipeline is not None:
        parse_pipeline(pipeline)  # the file's own order and names are checked as written
        from qshift.io import read_config_file

        data = read_config_file(pipeline)
        entries += data.get("stages", data.get("pipeline", [])) if isinstance(data, dict) else list(data or [])
    if method:
        entries += method_stages(method)
    if refine:
        entries.append({"refine": refine})
    if adapt:
        entries.append({"adapt": {"method": adapt}})
    if quari is not None:
        entries.append({"transform": {"quari": {"checkpoint": str(quari),
                                                **({"mode": "rerank", "k": rerank} if rerank else {})}}})
    elif rerank:
        from qshift.errors import InputError

        raise InputError("--rerank re-ranks with a transform: give --quari DIR too")

    def kind(e: Any) -> int:
        k = next(iter(e)) if isinstance(e, dict) and e else e
        return KINDS.index(k) if k in KINDS else -1

    return sorted(entries, key=kind)


@app.command()
@_handle_errors
def search(index_dir: Path = typer.Argument(..., help="Index directory (from `qshift index`)."),
           encoder: str = EncoderOpt,
           text: Optional[list[str]] = typer.Option(None, "--text", "-t", help="Text query (repeatable)."),
           image: Optional[list[Path]] = typer.Option(None, "--image", "-i", help="Image query (repeatable)."),
           k: int = typer.Option(10, "-k", help="Results per query."),
           pipeline: Optional[Path] = typer.Option(None, "--pipeline", "-p", help="Pipeline config (YAML/TOML list "
                                                   "of stages; `qshift methods` lists the stages)."),
           method: Optional[str] = typer.Option(None, "--method", "-m", help="A named method (`qshift methods`), "
                                                "e.g. `rest`; added to the pipeline."),
           refine: Optional[str] = typer.Option(None, "--refine", help="Add a query-repair stage with its "
                                                "defaults: spell, llm or openai."),
           adapt: Optional[str] = typer.Option(None, "--adapt", help="Add an online adapt stage (a TTA method)."),
           quari: Optional[Path] = typer.Option(None, "--quari", help="Add a QuARI transform (trained folder)."),
           rerank: Optional[int] = typer.Option(None, "--rerank", help="With --quari: re-rank the top N instead "
                                                "of a full search."),
           state: Optional[Path] = typer.Option(None, "--state", help="Session file of online adaptation: loaded "
                                                "if it exists, saved (atomically) after the call."),
           shards: Optional[int] = typer.Option(None, help="Rank through a sharded index on Ray (N actors)."),
           address: Optional[str] = typer.Option(None, help="Ray cluster for --shards (default: a local instance)."),
           as_json: bool = JsonOpt) -> None:
    """Top-k search with text or image queries through the query pipeline.

    Example: `qshift search runs/coco-index -e st:all-MiniLM-L6-v2 -t "a dog on a skateboard" -k 5`;
    online TTA carried across calls: `… --adapt rest --state runs/session.pt`
    """
    from qshift.directions import direction_of
    from qshift.encoders import create_encoder
    from qshift.errors import InputError
    from qshift.index import load_index
    from qshift.pipeline import Pipeline, PipelineContext

    if not text and not image:
        raise InputError("give at least one query: --text '...' or --image PATH")
    entries = pipeline_entries(pipeline, method, adapt, quari, rerank, refine)
    idx = load_index(index_dir)
    enc = create_encoder(encoder)
    idx.check_fingerprint(enc.fingerprint())
    if shards:  # the same index, split over Ray actors
        from qshift.index import index_vectors
        from qshift.scale.search import ShardedIndex

        sharded = ShardedIndex(idx.dim, shards, idx.factory, address)
        sharded.meta = dict(idx.meta)
        sharded.add(index_vectors(idx), idx.ids)
        idx = sharded
    groups = [(m, list(q)) for m, q in (("text", text), ("image", [str(i) for i in image or []])) if q]
    if state is not None and len(groups) > 1:
        raise InputError("--state keeps one online session: give text or image queries, not both")
    results = []
    for modality, queries in groups:
        gallery = idx.meta.get("modality") or ("image" if modality == "text" else "text")
        ctx = PipelineContext(enc, direction_of(modality, gallery), index=idx)
        with Pipeline.from_config(entries, ctx) as pipe:
            if state is not None and state.is_file():
                pipe.load_state(state)
            results += [r.to_dict() for r in pipe.search(queries, min(k, len(idx)))]
            if state is not None:
                pipe.save_state(state)
    if as_json:
        _print_json(results)
        return
    for res in results:
        title = f"query: {res['query']}" + "".join(f" → {v}" for key, v in res["meta"].items() if key == "repaired")
        table = Table(title=title)
        table.add_column("rank", justify="right")
        table.add_column("id")
        table.add_column("score", justify="right")
        for r in res["results"]:
            table.add_row(str(r["rank"]), r["id"], f"{r['score']:.4f}")
        out.print(table)
        out.print("stages: " + ", ".join(f"{name} {1e3 * sec:.1f} ms" for name, sec in res["timings"].items()))


@app.command("eval")
@_handle_errors
def eval_(collection: Path = typer.Argument(..., help="Collection file or folder."),
          encoder: str = EncoderOpt,
          direction: str = typer.Option("t2i,i2t", help="Comma-separated: t2i, i2t, t2t; i2i for world-ilias "
                                        "collections."),
          store: Optional[Path] = StoreOpt, fmt: str = FormatOpt, limit: Optional[int] = LimitOpt,
          captions_per_item: int = CaptionsPerItemOpt,
          image_root: Optional[Path] = ImageRootOpt,
          split: str = SplitOpt,
          factory: str = typer.Option("Exact", help="Index factory used for ranking."),
          k_map: int = typer.Option(10, help="Cut-off k of mAP@k and nDCG@k."),
          on_error: str = OnErrorOpt,
          as_json: bool = JsonOpt) -> None:
    """Recall table (R@1/5/10, MRR, mAP@k, nDCG@k, MedR) for a collection and an encoder.

    Example: `qshift eval ../shared/data/flickr8k-1k -e openclip:ViT-B-32@ckpt.pt --direction t2i,i2t`
    """
    from qshift.encoders import create_encoder
    from qshift.retrieval import build_task, evaluate

    coll = _collection(collection, fmt, limit, captions_per_item, image_root, split)
    enc = create_encoder(encoder)
    st = _store(store)
    rows = {}
    for d in [d.strip() for d in direction.split(",") if d.strip()]:
        task = build_task(coll, enc, d, st, progress=not as_json, on_error=on_error)
        rows[d] = evaluate(task, k_map=k_map, factory=factory)
    if as_json:
        _print_json({"collection": coll.name, "encoder": enc.fingerprint(), "metrics": rows})
    else:
        out.print(metrics_table(rows, f"{coll.name} · {enc.spec}"))


@app.command()
@_handle_errors
def corrupt(collection: Path = typer.Argument(..., help="Collection file or folder."),
            corruption: str = typer.Option(..., "--corruption", "-c",
                                           help="Name(s) or group(s), comma-separated: keyboard, ocr, formal, "
                                                "gaussian_noise, … or text, image, character, word, sentence."),
            severity: str = typer.Option("3", "--severity", "-s", help="1–5, comma-separated."),
            seed: int = typer.Option(0),
            min_similarity: Optional[float] = typer.Option(
                None, help="Re-draw word/sentence corruptions until MiniLM cosine ≥ this (e.g. 0.9)."),
            generator: str = typer.Option("rule", help="Sentence level: rule (rule-based) or llm (local LLM)."),
            fmt: str = FormatOpt, limit: Optional[int] = LimitOpt,
            captions_per_item: int = CaptionsPerItemOpt, image_root: Optional[Path] = ImageRootOpt,
            split: str = SplitOpt, as_json: bool = JsonOpt) -> None:
    """Write shifted query sets next to a collection (manifest: corruption, severity, seed, generator).

    Example: `qshift corrupt runs/world/test.csv -c keyboard,gaussian_noise -s 1,5`
    """
    from qshift.data.corruptions import expand
    from qshift.data.shifts import ShiftSpec, write_shift
    from qshift.errors import InputError

    coll = _collection(collection, fmt, limit, captions_per_item, image_root, split)
    try:
        severities = [int(x) for x in severity.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--severity must be integers 1–5, got {severity!r}") from None
    encoder = None
    if min_similarity is not None:
        from qshift.encoders import create_encoder

        encoder = create_encoder("st:all-MiniLM-L6-v2")
    written = []
    for name in expand(corruption):
        for sev in severities:
            spec = ShiftSpec(name, sev, seed, min_similarity, generator)
            path = write_shift(collection, coll, spec, encoder=encoder, progress=not as_json)
            written.append({"corruption": name, "severity": sev, "collection": str(path),
                            "manifest": str(path.with_suffix(".json"))})
            if not as_json:
                out.print(f"{name} s{sev} → {path}")
    if as_json:
        _print_json(written)


@app.command()
@_handle_errors
def bench(config: Path = typer.Argument(..., help="Benchmark config (.yaml/.yml/.toml)."),
          out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default: the config's "
                                                 "`out`, else runs/bench/NAME)."),
          store: Optional[Path] = StoreOpt,
          report: bool = typer.Option(True, help="Write the report into the results folder afterwards."),
          severities: Optional[str] = typer.Option(None, help="Override the config's severities, e.g. `5`."),
          max_queries: Optional[int] = typer.Option(None, help="Override: use a random subset of N queries."),
          methods: Optional[str] = typer.Option(None, help="Override: comma-separated method names "
                                                "(`qshift methods` lists them)."),
          as_json: bool = JsonOpt) -> None:
    """Run a grid of methods × shifts × severities × seeds; resumes where it stopped.

    Example: `qshift bench bench/configs/world-t2i.yaml --severities 5`
    """
    import dataclasses

    from qshift.benchmark import BenchConfig, load_config, run_benchmark
    from qshift.report import write_report

    cfg = load_config(config)
    overrides: dict = {}
    if severities:
        overrides["severities"] = [int(x) for x in severities.split(",")]
        overrides["stream_severities"] = overrides["severities"][-1:]
    if max_queries:
        overrides["max_queries"] = max_queries
    if methods:
        overrides["methods"] = [m.strip() for m in methods.split(",") if m.strip()]
    if overrides:
        cfg = BenchConfig.from_dict({**dataclasses.asdict(cfg), **overrides}, str(config))
    out_path = run_benchmark(cfg, out_dir, _store(store) if store else None, progress=not as_json,
                             console=None if as_json else out)
    info = {"results": str(out_path / "results.csv"), "parquet": str(out_path / "results.parquet")}
    if report:
        info["report"] = write_report([out_path], out_path)
    if as_json:
        _print_json(info)
    else:
        out.print(f"results → {info['results']}" + (f"; report → {out_path / 'report.md'}" if report else ""))


@app.command()
@_handle_errors
def adapt(collection: str = typer.Argument(..., help="Collection: a path, `world:test` or `shared:REL/PATH`."),
          encoder: str = EncoderOpt,
          method: str = typer.Option("rest", "--method", "-m", help="A TTA method (`qshift methods` lists them)."),
          direction: str = typer.Option("t2i", help="t2i / t2t (the text tower adapts) or i2t (the image tower)."),
          shift: str = typer.Option("clean", "--shift", "-s", help="Corruption name(s), comma-separated, or "
                                    "`text`/`image` (all); clean queries always run too."),
          severity: int = typer.Option(5, help="Corruption severity 1–5."),
          stream: Optional[str] = typer.Option(None, help="Also run a stream: mixed or source_share."),
          batch_size: int = typer.Option(64), steps: int = typer.Option(3), lr: float = typer.Option(3e-4),
          params: str = typer.Option("norm", help="Parameters to adapt: norm, last-k or lora."),
          episodic: bool = typer.Option(False, help="Reset to the frozen model after every batch."),
          max_queries: Optional[int] = typer.Option(None, help="A random subset of N queries."),
          out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default: "
                                                 "runs/adapt/METHOD)."),
          store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Adapt the query encoder online on shifted queries and compare with the frozen encoder.

    Runs zero-shot and METHOD over the same query stream (batches of `--batch-size`, `--steps`
    updates each); the gallery stays fixed. Example:
    `qshift adapt world:test -e world:mini-clip -m rest -s keyboard,ocr --severity 5`
    """
    from qshift.benchmark import BenchConfig, run_benchmark

    shifts = ["clean", *[s.strip() for s in shift.split(",") if s.strip() and s.strip() != "clean"]]
    cfg = BenchConfig(name=f"adapt-{method}", encoder=encoder, collection=collection, direction=direction,
                      shifts=shifts, severities=[severity], stream_severities=[severity],
                      streams=[stream] if stream else [], max_queries=max_queries, batch_size=batch_size,
                      methods=["zero-shot", {"name": method, "steps": steps, "lr": lr, "params": params,
                                             "episodic": episodic}])
    res = run_benchmark(cfg, out_dir or Path("runs") / "adapt" / method, _store(store) if store else None,
                        progress=not as_json)
    import json as _json

    cells = [_json.loads(line) for line in (res / "cells.jsonl").read_text().splitlines()]
    rows: dict[str, dict[str, float]] = {}
    for c in cells:
        key = c["shift"] if c["severity"] == 0 else f"{c['shift']} s{c['severity']}"
        rows.setdefault(key, {})[c["method"]] = c["metrics"]["R@1"]
    if as_json:
        _print_json({"results": str(res / "results.csv"), "r1": rows})
        return
    table = Table(title=f"R@1 · {collection} · {encoder} · {direction.upper()} · {method}")
    for col in ("queries", "zero-shot", method, "Δ"):
        table.add_column(col, justify="left" if col == "queries" else "right")
    for key, r in rows.items():
        table.add_row(key, f"{r['zero-shot']:.2f}", f"{r[method]:.2f}", f"{r[method] - r['zero-shot']:+.2f}")
    out.print(table)
    out.print(f"results → {res / 'results.csv'}")


@app.command()
@_handle_errors
def serve(galleries: list[str] = typer.Argument(..., help="What to serve, each `[NAME=]SPEC`: an index directory "
                                                "or a collection (`world:test`, a path, `shared:…`)."),
          encoder: str = EncoderOpt,
          pipeline: Optional[Path] = typer.Option(None, "--pipeline", "-p", help="Pipeline config: the stages "
                                                  "requests run (each may be switched off per request)."),
          host: str = typer.Option("127.0.0.1", help="Address to listen on."),
          port: int = typer.Option(8000, help="Port."),
          token: Optional[str] = typer.Option(None, help="Bearer token the API requires (or $QSHIFT_API_TOKEN)."),
          state_dir: Optional[Path] = typer.Option(None, help="Adaptation states: loaded on start, saved on exit."),
          max_batch: int = typer.Option(64, help="Micro-batch: most queries per pipeline call."),
          window_ms: float = typer.Option(3.0, help="Micro-batch: how long the first query waits for company."),
          max_k: int = typer.Option(1000, help="Limit: results per query."),
          max_text_chars: int = typer.Option(2000, help="Limit: characters of a text query."),
          max_image_pixels: int = typer.Option(4096 * 4096, help="Limit: width × height of an image query."),
          max_body_mb: int = typer.Option(20, help="Limit: request body (MB)."),
          cors: Optional[list[str]] = typer.Option(None, help="Allow cross-origin calls from this origin "
                                                   "(repeatable; off by default)."),
          allow_image_url: bool = typer.Option(False, help="Let clients name an http(s) image to fetch."),
          store: Optional[Path] = StoreOpt) -> None:
    """Serve the query pipeline over HTTP, with a search page at `/` (FastAPI + uvicorn).

    Example: `qshift serve world:test -e world:mini-clip --pipeline bench/configs/serve-world.yaml`
    """
    import uvicorn

    from qshift.errors import InputError
    from qshift.service import Limits, ServiceConfig, create_app

    named: dict[str, str] = {}
    for g in galleries:
        name, sep, spec = g.partition("=")
        if not sep:
            name, spec = Path(g).name.replace(":", "-") or "gallery", g
        if name in named:
            raise InputError(f"serve: two galleries named {name!r}; name them NAME=SPEC")
        named[name] = spec
    cfg = ServiceConfig(named, encoder, None if pipeline is None else str(pipeline),
                        Limits(max_body_mb * 2**20, max_image_pixels, max_text_chars, max_k), token, list(cors or []),
                        allow_image_url, max_batch, window_ms, None if state_dir is None else str(state_dir),
                        None if store is None else str(store), progress=True)
    application = create_app(cfg)
    out.print(f"qshift serving {', '.join(named)} on http://{host}:{port}/ (API docs: /docs)")
    uvicorn.run(application, host=host, port=port, log_level="warning", access_log=False)


@app.command("report")
@_handle_errors
def report_(results: list[Path] = typer.Argument(..., help="Results folder(s) written by `qshift bench`."),
            out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Report folder (default: the first "
                                                   "results folder)."),
            metric: str = typer.Option("R@1", help="Metric of the tables and plots."),
            as_json: bool = JsonOpt) -> None:
    """Markdown + standalone HTML report with PNG plots from benchmark results."""
    from qshift.report import write_report

    info = write_report(list(results), out_dir or results[0], metric)
    _print_json(info) if as_json else out.print(f"report → {info['markdown']}, {info['html']}")


@app.command()
@_handle_errors
def demo(out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Where the report goes."),
         store: Optional[Path] = StoreOpt,
         limit: Optional[int] = LimitOpt) -> None:
    """The main job end to end on the embedded default: encode, index, retrieve, report."""
    from qshift.demo import run_demo

    run_demo(out_dir, _store(store), limit=limit, console=out)


@app.command("methods")
def methods_(as_json: bool = JsonOpt) -> None:
    """List the named methods and the pipeline stages of each kind (from their registries)."""
    from qshift.methods import list_methods
    from qshift.pipeline import list_stages

    info = {"methods": list_methods(), "stages": list_stages()}
    if as_json:
        _print_json(info)
        return
    out.print("methods: " + ", ".join(info["methods"]))
    for kind, names in info["stages"].items():
        out.print(f"{kind} stages: " + (", ".join(names) or "none"))


@app.command()
def models() -> None:
    """List encoder backends and the open_clip architectures known here."""
    from qshift.encoders import BACKENDS
    from qshift.encoders.openclip import list_architectures

    out.print("backends: " + ", ".join(f"{b}:" for b in BACKENDS))
    out.print("open_clip architectures: " + ", ".join(list_architectures()))


def main() -> None:
    warnings.filterwarnings("ignore", message=".*QuickGELU.*")
    warnings.formatwarning = lambda message, *_a, **_k: f"warning: {message}\n"  # one line, no source echo
    app()


if __name__ == "__main__":
    main()
