"""``qshift continual``: the continual multi-domain retrieval protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qshift.clikit import JsonOpt, StoreOpt, _handle_errors, _print_json, _store, out

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Continual domains: learn visual domains in sequence (DAR and baselines).")


@app.command()
@_handle_errors
def run(config: Path = typer.Argument(..., help="Continual config (.yaml/.toml)."),
        out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default: the config's "
                                               "`out`, else runs/continual/NAME)."),
        store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Run (or resume) every method over the domain orders; results JSON + Markdown + PNG.

    Example: `qshift continual run bench/configs/continual-world.yaml`
    """
    from qshift.continual.protocol import ContinualConfig, run_continual
    from qshift.continual.report import write_markdown

    cfg = ContinualConfig.load(config)
    res = run_continual(cfg, out_dir, _store(store) if store else None, progress=not as_json,
                        console=None if as_json else out)
    md = write_markdown(res)
    if as_json:
        _print_json({"results": str(res / "results.json"), "report": str(md)})
    else:
        out.print(f"results → {res / 'results.json'}; report → {md}")
