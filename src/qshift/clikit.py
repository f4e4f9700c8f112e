"""Shared pieces of the command line: consoles, error handling, common options."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console

from qshift.errors import QShiftError

out = Console()
err = Console(stderr=True)

EncoderOpt = typer.Option(..., "--encoder", "-e", help="Encoder spec, e.g. `st:all-MiniLM-L6-v2`, "
                          "`openclip:ViT-B-32@/path/ckpt.pt`, `hf:/path/dir`, `onnx:/path/dir`.")
StoreOpt = typer.Option(None, "--store", help="Embedding cache directory (default: $QSHIFT_CACHE/store).")
FormatOpt = typer.Option("auto", "--format", help="Collection format: auto, csv, jsonl, lines, karpathy, coco.")
LimitOpt = typer.Option(None, "--limit", help="Use only the first N items.")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")
CaptionsPerItemOpt = typer.Option(5, help="For line-per-caption files.")
ImageRootOpt = typer.Option(None, help="Folder the image names are relative to.")
SplitOpt = typer.Option("test", help="Split of a Karpathy JSON.")
OnErrorOpt = typer.Option("raise", help="Unreadable images: raise (stop, naming the file) or skip (count them).")


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except QShiftError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None
        except FileNotFoundError as exc:
            err.print(f"[bold red]error:[/] {exc.filename}: file not found", highlight=False)
            raise typer.Exit(2) from None
    return wrapper


def _store(store: Optional[Path]) -> Any:
    from qshift.paths import cache_dir
    from qshift.store import EmbeddingStore

    return EmbeddingStore(store or cache_dir() / "store")


def _collection(path: Path, fmt: str, limit: Optional[int], captions_per_item: int = 5,
                image_root: Optional[Path] = None, split: str = "test") -> Any:
    from qshift.data.collection import load_collection

    if not Path(path).exists() and str(path).startswith(("world:", "world-ilias:", "world-inquire:", "shared:")):
        from qshift.benchmark import resolve_collection

        coll = resolve_collection(str(path), fmt)[1]
        return coll.subset(limit) if limit else coll
    coll = load_collection(path, fmt, captions_per_item=captions_per_item, image_root=image_root, split=split)
    return coll.subset(limit) if limit else coll


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


