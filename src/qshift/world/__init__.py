"""The benchmark world: procedural scenes, captions, visual domains and trained models.

``world_collection("test")`` / ``("test-pixel")`` returns the path of a collection of
the default world (``$QSHIFT_CACHE/world``, seed 0), generating the split on first use.
"""

from __future__ import annotations

from pathlib import Path

from qshift.errors import InputError


def default_world_dir() -> Path:
    from qshift.paths import cache_dir

    return cache_dir() / "world"


def world_collection(name: str, root: Path | None = None, progress: bool = False) -> Path:
    """``SPLIT`` or ``SPLIT-STYLE`` of the default world, generated if missing."""
    from qshift.world.generate import generate_world, open_world

    split, _, style = name.partition("-")
    if split not in ("train", "val", "test"):
        raise InputError(f"world:{name}: expected SPLIT or SPLIT-STYLE with SPLIT in train, val, test")
    root = root or default_world_dir()
    world = open_world(root) if (root / "world.json").is_file() else None
    needs = world is None or not world.parts.get(f"scenes/{split}", {}).get("complete")
    if world is not None and not needs:
        styles = world.config.styles if split == "train" else (*world.config.styles, *world.config.heldout)
        needs = not all(world.parts.get(f"{s}/{split}", {}).get("complete") for s in styles)
    if needs:
        world = generate_world(root, splits=[split], workers=2, progress=progress)
    return world.collection(split, style or None)


def world_captions(name: str, root: Path | None = None) -> list[list[str]]:
    """The captions of ``SPLIT`` or ``SPLIT-STYLE`` of the default world, per scene, in the
    order of :func:`world_collection` — from the scene files alone, so texts (a repair
    vocabulary, adaptation anchors) never wait for images to be rendered."""
    from qshift.world.generate import World, WorldConfig, _save_manifest, _write_scenes, open_world

    split, _, style = name.partition("-")
    if split not in ("train", "val", "test"):
        raise InputError(f"world:{name}: expected SPLIT or SPLIT-STYLE with SPLIT in train, val, test")
    root = root or default_world_dir()
    if (root / "world.json").is_file():
        world = open_world(root)
    else:
        root.mkdir(parents=True, exist_ok=True)
        world = World(root, WorldConfig())
        _save_manifest(world)
    _write_scenes(world, split)
    return [list(d["captions"]) for d in world.scenes(split) if not style or split != "train" or d["style"] == style]
