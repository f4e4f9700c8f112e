"""Write a world to disk as ordinary qshift collections, resumably.

Layout of a world directory::

    world.json                     manifest: config, parts and their state, collections
    scenes/<split>.jsonl           scene specs (objects, assigned style) + captions
    images/<style>/<split>/<id>.png
    <split>.csv                    mixed collection: each scene in its assigned style
    <split>-<style>.csv            one style (train: the scenes assigned to it;
                                   val/test: every scene, so domains are comparable)

The work is split into *parts* (one style × one split). A part is marked complete in
the manifest only after all its images exist; a re-run skips complete parts and, in
an incomplete one, renders only the missing images. Images are written to a
temporary name and renamed (no per-file fsync: a lost image is re-rendered from its
seed); the manifest and collection files are written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable

from qshift.errors import InputError
from qshift.io import read_json, write_json, write_text
from qshift.progress import progress_bar
from qshift.world.captions import captions_for
from qshift.world.render import HELDOUT_STYLES, STYLES, TRAIN_STYLES, render, save_png
from qshift.world.scene import SPLIT_CODES, Scene, sample_scene, scene_rng

MANIFEST = "world.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    image_size: int = 64
    n_train: int = 20000
    n_val: int = 1000
    n_test: int = 1000
    min_objects: int = 1
    max_objects: int = 4
    captions_per_image: int = 5
    styles: tuple[str, ...] = TRAIN_STYLES
    heldout: tuple[str, ...] = HELDOUT_STYLES

    def __post_init__(self) -> None:
        if self.min_objects < 1:
            raise InputError(f"world: min_objects must be >= 1, got {self.min_objects}")
        if not self.min_objects <= self.max_objects <= 9:
            raise InputError(f"world: max_objects must be in [min_objects={self.min_objects}, 9] "
                             f"(a 3×3 layout), got {self.max_objects}")
        if self.image_size < 32 or self.image_size % 4:
            raise InputError(f"world: image_size must be a multiple of 4 and >= 32, got {self.image_size}")
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) < 0:
                raise InputError(f"world: {name} must be >= 0, got {getattr(self, name)}")
        if self.captions_per_image < 1:
            raise InputError(f"world: captions_per_image must be >= 1, got {self.captions_per_image}")
        if not self.styles:
            raise InputError("world: at least one training style is needed")
        for s in (*self.styles, *self.heldout):
            if s not in STYLES:
                raise InputError(f"world: unknown style {s!r}; known: {', '.join(STYLES)}")
        if set(self.styles) & set(self.heldout):
            raise InputError(f"world: styles {sorted(set(self.styles) & set(self.heldout))} are both "
                             "training and held-out")

    def split_size(self, split: str) -> int:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["styles"], d["heldout"] = list(self.styles), list(self.heldout)
        return d

    @staticmethod
    def from_dict(d: dict) -> "WorldConfig":
        known = {f.name for f in fields(WorldConfig)}
        unknown = set(d) - known
        if unknown:
            raise InputError(f"world config: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        for k in ("styles", "heldout"):
            if k in d:
                d[k] = tuple(d[k])
        return WorldConfig(**d)


@dataclass
class World:
    """A world directory and its manifest."""

    root: Path
    config: WorldConfig
    parts: dict[str, dict] = field(default_factory=dict)

    def collection(self, split: str = "test", style: str | None = None) -> Path:
        """Path of a collection file: the mixed split, or one style's."""
        path = self.root / (f"{split}.csv" if style is None else f"{split}-{style}.csv")
        if not path.is_file():
            what = f"split {split!r}" + (f" in style {style!r}" if style else "")
            raise InputError(f"{self.root}: {what} has not been generated "
                             f"(run `qshift world generate {self.root} --splits {split}`)")
        return path

    def scenes(self, split: str) -> list[dict]:
        path = self.root / "scenes" / f"{split}.jsonl"
        if not path.is_file():
            raise InputError(f"{path}: not generated")
        return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]

    def image_path(self, style: str, scene_id: str) -> Path:
        split = scene_id.split("-", 1)[0]
        return self.root / "images" / style / split / f"{scene_id}.png"


def open_world(root: str | Path) -> World:
    root = Path(root)
    m = read_json(root / MANIFEST)
    if m.get("format") != FORMAT_VERSION:
        raise InputError(f"{root / MANIFEST}: world format {m.get('format')!r}, expected {FORMAT_VERSION}")
    return World(root, WorldConfig.from_dict(m["config"]), m.get("parts", {}))


def _styles_for(cfg: WorldConfig, split: str) -> tuple[str, ...]:
    # train: each scene only in its assigned style; val/test: in every style (incl. held-out)
    return cfg.styles if split == "train" else (*cfg.styles, *cfg.heldout)


def _scene(cfg: WorldConfig, split: str, i: int) -> Scene:
    return sample_scene(cfg.seed, split, i, cfg.styles, cfg.min_objects, cfg.max_objects)


def _render_chunk(args: tuple[dict, str, str, list[int], str]) -> int:
    """Render and write the given scene indices of one part; returns how many were written."""
    cfg_d, split, style, indices, root = args
    cfg = WorldConfig.from_dict(cfg_d)
    out = Path(root) / "images" / style / split
    code = 2 + list(STYLES).index(style)
    for i in indices:
        scene = _scene(cfg, split, i)
        arr = render(scene, style, scene_rng(cfg.seed, split, i, code), cfg.image_size)
        save_png(out / f"{scene.id}.png", arr)
    return len(indices)


def _missing(cfg: WorldConfig, root: Path, split: str, style: str) -> list[int]:
    out = root / "images" / style / split
    out.mkdir(parents=True, exist_ok=True)
    have = {e.name for e in os.scandir(out) if e.is_file() and e.stat().st_size > 0 and e.name.endswith(".png")}
    indices = range(cfg.split_size(split))
    if split == "train":  # only the scenes assigned to this style
        indices = (i for i in indices if _scene(cfg, split, i).style == style)
    return [i for i in indices if f"{split}-{i:05d}.png" not in have]


def generate_world(root: str | Path, config: WorldConfig | None = None, *,
                   splits: Iterable[str] = ("train", "val", "test"), workers: int = 1,
                   progress: bool = False) -> World:
    """Create or complete a world directory; returns it. Idempotent and resumable."""
    root = Path(root)
    splits = list(splits)
    for s in splits:
        if s not in SPLIT_CODES:
            raise InputError(f"world: unknown split {s!r}; known: {', '.join(SPLIT_CODES)}")
    if (root / MANIFEST).is_file():
        world = open_world(root)
        if config is not None and config != world.config:
            diff = {k: (v, config.to_dict()[k]) for k, v in world.config.to_dict().items() if config.to_dict()[k] != v}
            raise InputError(f"{root}: already holds a world generated with other parameters "
                             f"(existing vs requested: {diff}); use another directory")
    else:
        world = World(root, config or WorldConfig())
    cfg = world.config
    root.mkdir(parents=True, exist_ok=True)
    _save_manifest(world)
    for split in splits:
        _write_scenes(world, split)
        for style in _styles_for(cfg, split):
            key = f"{style}/{split}"
            part = world.parts.get(key, {})
            todo = _missing(cfg, root, split, style)
            if part.get("complete") and not todo:
                continue
            t0 = time.perf_counter()
            _render(cfg, root, split, style, todo, workers, progress)
            world.parts[key] = {"complete": True, "rendered": len(todo), "count": _count_images(root, split, style),
                                "seconds": round(time.perf_counter() - t0, 3)}
            _save_manifest(world)
        _write_collections(world, split)
    return world


def _count_images(root: Path, split: str, style: str) -> int:
    return sum(1 for e in os.scandir(root / "images" / style / split) if e.name.endswith(".png"))


def _render(cfg: WorldConfig, root: Path, split: str, style: str, todo: list[int], workers: int,
            progress: bool) -> None:
    chunk = 256
    jobs = [(cfg.to_dict(), split, style, todo[i:i + chunk], str(root)) for i in range(0, len(todo), chunk)]
    with progress_bar(f"render {style}/{split}", len(todo), progress and bool(todo)) as bar:
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(workers) as pool:
                for n in pool.map(_render_chunk, jobs):
                    bar.advance(n)
        else:
            for job in jobs:
                bar.advance(_render_chunk(job))


def _write_scenes(world: World, split: str) -> None:
    cfg = world.config
    path = world.root / "scenes" / f"{split}.jsonl"
    if path.is_file() and world.parts.get(f"scenes/{split}", {}).get("complete"):
        return
    lines = []
    for i in range(cfg.split_size(split)):
        scene = _scene(cfg, split, i)
        d = scene.to_dict()
        d["captions"] = captions_for(scene, cfg.seed, split, i, cfg.captions_per_image)
        lines.append(json.dumps(d, separators=(",", ":")))
    write_text(path, "\n".join(lines) + "\n")
    world.parts[f"scenes/{split}"] = {"complete": True, "count": len(lines)}
    _save_manifest(world)


def _csv_text(rows: list[tuple[str, str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "caption"])
    w.writerows(rows)
    return buf.getvalue()


def _write_collections(world: World, split: str) -> None:
    root = world.root
    scenes = world.scenes(split)
    mixed = [(f"images/{d['style']}/{split}/{d['id']}.png", c) for d in scenes for c in d["captions"]]
    write_text(root / f"{split}.csv", _csv_text(mixed))
    for style in _styles_for(world.config, split):
        rows = [(f"images/{style}/{split}/{d['id']}.png", c) for d in scenes
                if split != "train" or d["style"] == style for c in d["captions"]]
        write_text(root / f"{split}-{style}.csv", _csv_text(rows))


def _save_manifest(world: World) -> None:
    write_json(world.root / MANIFEST, {
        "format": FORMAT_VERSION, "config": world.config.to_dict(), "parts": world.parts,
        "styles": {"train": list(world.config.styles), "heldout": list(world.config.heldout)},
        "collections": sorted(p.name for p in world.root.glob("*.csv")),
    })
