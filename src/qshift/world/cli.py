"""``qshift world``: generate the benchmark world, train its models, describe it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qshift.clikit import JsonOpt, _handle_errors, _print_json, out

app = typer.Typer(no_args_is_help=True, rich_markup_mode="markdown",
                  help="The benchmark world: procedural image–caption scenes in several visual domains.")


def _csv(value: Optional[str]) -> Optional[tuple[str, ...]]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


@app.command()
@_handle_errors
def generate(root: Path = typer.Argument(..., help="World directory (created, or completed if half-written)."),
             seed: int = typer.Option(0, help="Everything follows from this seed."),
             n_train: int = typer.Option(20000, "--train", help="Training scenes."),
             n_val: int = typer.Option(1000, "--val", help="Validation scenes."),
             n_test: int = typer.Option(1000, "--test", help="Test scenes."),
             splits: str = typer.Option("train,val,test", help="Which splits to write now."),
             image_size: int = typer.Option(64, help="Image side in pixels."),
             min_objects: int = typer.Option(1), max_objects: int = typer.Option(4),
             styles: Optional[str] = typer.Option(None, help="Training styles (default: flat,photo,sketch,dark,cartoon)."),
             heldout: Optional[str] = typer.Option(None, help="Held-out styles (default: pixel)."),
             workers: int = typer.Option(1, help="Processes rendering in parallel."),
             as_json: bool = JsonOpt) -> None:
    """Generate (or resume) a world: images, 5 captions each, per-style collections.

    Example: `qshift world generate runs/world --splits test`
    """
    from qshift.world.generate import WorldConfig, generate_world
    from qshift.world.render import HELDOUT_STYLES, TRAIN_STYLES

    cfg = WorldConfig(seed=seed, image_size=image_size, n_train=n_train, n_val=n_val, n_test=n_test,
                      min_objects=min_objects, max_objects=max_objects,
                      styles=_csv(styles) or TRAIN_STYLES,
                      heldout=_csv(heldout) if heldout is not None else HELDOUT_STYLES)
    world = generate_world(root, cfg, splits=_csv(splits) or (), workers=workers, progress=not as_json)
    info = {"root": str(root), "parts": world.parts, "collections": sorted(p.name for p in root.glob("*.csv"))}
    if as_json:
        _print_json(info)
        return
    rendered = sum(p.get("rendered", 0) for k, p in world.parts.items() if not k.startswith("scenes/"))
    out.print(f"world {root}: {len(info['collections'])} collections; "
              f"last run rendered up to {rendered} images (the rest were already there)")
    out.print("collections: " + ", ".join(info["collections"]))


@app.command()
@_handle_errors
def train(root: Path = typer.Argument(..., help="World directory (needs the train and val splits)."),
          model: str = typer.Option("mini-clip", help="mini-clip or lit-minilm."),
          out_dir: Path = typer.Option(..., "--out", "-o", help="Run folder (checkpoints, log; resumes)."),
          epochs: int = typer.Option(30), batch_size: int = typer.Option(128), lr: float = typer.Option(2e-3),
          seed: int = typer.Option(0),
          styles: Optional[str] = typer.Option(None, help="Train on these styles only (default: all)."),
          max_images: Optional[int] = typer.Option(None, help="Use only the first N training scenes."),
          bf16: bool = typer.Option(True, help="bfloat16 autocast where the CPU supports it."),
          device: str = typer.Option("cpu", help="cpu, cuda or auto (not part of the run's config)."),
          as_json: bool = JsonOpt) -> None:
    """Train a world model contrastively; re-running the same command resumes.

    Example: `qshift world train runs/world --model mini-clip -o runs/mini-clip`
    """
    from qshift.world.train import TrainConfig
    from qshift.world.train import train as run_train

    cfg = TrainConfig(model=model, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                      styles=_csv(styles), max_images=max_images, bf16=bf16)
    show = (lambda r: None) if as_json else (lambda r: out.print(
        f"epoch {r['epoch']}: loss {r['loss']:.3f}, val T2I R@1 {r['val_t2i_R@1']:.1f}, "
        f"I2T R@1 {r['val_i2t_R@1']:.1f} ({r['seconds']:.0f}s)"))
    summary = run_train(root, out_dir, cfg, progress=not as_json, on_epoch=show, device=device)
    if as_json:
        _print_json(summary)
    else:
        out.print(f"checkpoint → {out_dir / 'model.safetensors'}  (use it as world:{model}@{out_dir / 'model.safetensors'})")


@app.command()
@_handle_errors
def info(root: Path = typer.Argument(..., help="World directory."), as_json: bool = JsonOpt) -> None:
    """What a world directory holds and which parts are complete."""
    from qshift.world.generate import open_world

    world = open_world(root)
    data = {"config": world.config.to_dict(), "parts": world.parts}
    if as_json:
        _print_json(data)
        return
    out.print(f"world {root}: {data['config']}")
    for key, part in sorted(world.parts.items()):
        out.print(f"  {key:16s} {'complete' if part.get('complete') else 'INCOMPLETE'}  {part.get('count', 0)} items")
