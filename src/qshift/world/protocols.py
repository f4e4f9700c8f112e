"""QuARI's two evaluation settings, built from the benchmark world's scene graphs.

**World-ILIAS** (instance retrieval, image→image). An *instance* is one scene rendered
``renderings`` times with nuisance changes: a different training style each time,
object positions and angles jittered, lighting (brightness, contrast, gamma) varied and,
in half of them, a small distractor object added in an empty cell. Rendering 0 is the
query; the other renderings are its positives in the gallery. Distractors are other
scenes, including ``hard`` near-duplicates of every instance (one object's colour or
shape changed: same layout, not the same thing), filled up with random scenes to
``gallery`` images. Scored by mAP@1k and R@1/10.

**World-INQUIRE** (many-positive text queries, text→image). Short queries from eight
templates ("a red triangle", "three squares", "a red star left of a circle", …) whose
relevant sets come from the scene graphs of a ``gallery`` of new scenes, so the ground
truth is exact. Templates are split into train / val / test, so a method trained on the
train queries is tested on kinds of query it never saw. Scored by mAP@50, nDCG@50, MRR.

Each set is written like any collection (``NAME.csv``: image, caption — one caption per
image, from the world's captioner) plus ``NAME.protocol.json`` (role and instance of
every image, or the queries with their relevant images), in ``$QSHIFT_CACHE/world-
protocols/`` by default; building resumes (images are skipped when present).
Specs: ``world-ilias:SPLIT[-SIZE][-iN]`` and ``world-inquire:SPLIT[-SIZE]``, e.g.
``world-ilias:test-10k``, ``world-inquire:train``, ``world-ilias:train-i20000`` (20,000
training instances instead of 2,000; instance k is the same scene in every size, so a
smaller set is a subset of a larger one).
"""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from qshift.errors import InputError
from qshift.io import read_json, write_json, write_text
from qshift.world.captions import CELL_WORDS, COLOR_WORDS, NUMBERS, SHAPE_WORDS, captions_for
from qshift.world.render import TRAIN_STYLES, render, save_png
from qshift.world.scene import CELLS, COLORS, SHAPES, SIZES, TEXTURES, Obj, Scene, relation, sample_scene, scene_rng

# scene index ranges of the protocols, far from the world's own splits (< 10⁶)
OFFSETS = {"ilias": 1_000_000, "ilias-hard": 3_000_000, "distractor": 5_000_000, "inquire": 7_000_000}
SPLIT_SIZES = {"ilias": {"train": 2000, "val": 300, "test": 1000},
               "inquire": {"train": 10_000, "val": 4000, "test": 10_000}}


def _size(token: str) -> int:
    token = token.lower()
    return int(float(token[:-1]) * 1000) if token.endswith("k") else int(token)


class Spec(NamedTuple):
    kind: str                   # "ilias" or "inquire"
    split: str                  # train, val or test
    gallery: int | None         # images (None: the split's default)
    instances: int | None = None  # World-ILIAS instances (None: the split's default)


def parse_spec(spec: str) -> Spec:
    """``world-ilias:test-10k`` → Spec("ilias", "test", 10000); ``world-ilias:train-i20000``
    (ILIAS only) sets the number of instances, e.g. a larger training set."""
    kind, _, rest = spec.partition(":")
    kind = kind.removeprefix("world-")
    if kind not in SPLIT_SIZES:
        raise InputError(f"{spec}: expected world-ilias:SPLIT[-SIZE][-iN] or world-inquire:SPLIT[-SIZE]")
    split, *tokens = rest.split("-")
    if split not in ("train", "val", "test"):
        raise InputError(f"{spec}: split must be train, val or test, got {split!r}")
    gallery = instances = None
    for token in tokens:
        try:
            if token[:1] == "i" and kind == "ilias" and instances is None:
                instances = int(token[1:])
                if instances < 1:
                    raise ValueError
            elif gallery is None and instances is None:
                gallery = _size(token)
            else:
                raise ValueError
        except ValueError:
            raise InputError(f"{spec}: expected SPLIT[-SIZE][-iN] with SIZE a number like 10k and N a positive "
                             f"number of instances (world-ilias only), got {token!r}") from None
    return Spec(kind, split, gallery, instances)


def _lighting(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = arr.astype(np.float32) / 255.0
    x = (x - 0.5) * rng.uniform(0.75, 1.25) + 0.5 + rng.uniform(-0.12, 0.12)   # contrast, brightness
    x = np.clip(x, 0, 1) ** rng.uniform(0.8, 1.25)                              # gamma
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def _jitter(scene: Scene, rng: np.random.Generator, distractor: bool) -> Scene:
    objs = [replace(o, x=float(np.clip(o.x + rng.uniform(-0.04, 0.04), 0.08, 0.92)),
                    y=float(np.clip(o.y + rng.uniform(-0.04, 0.04), 0.08, 0.92)),
                    angle=float(o.angle + rng.uniform(-15, 15))) for o in scene.objects]
    free = [c for c in range(9) if c not in {o.cell for o in scene.objects}]
    if distractor and free:
        c = int(rng.choice(free))
        row, col = divmod(c, 3)
        objs.append(Obj(SHAPES[int(rng.integers(len(SHAPES)))], list(COLORS)[int(rng.integers(len(COLORS)))],
                        "small", "plain", c, (col + 0.5) / 3, (row + 0.5) / 3, 0.0))
    return Scene(scene.id, tuple(objs), scene.style)


def _near_duplicate(scene: Scene, rng: np.random.Generator, sid: str) -> Scene:
    """The same layout with one object's colour or shape changed."""
    objs = list(scene.objects)
    i = int(rng.integers(len(objs)))
    o = objs[i]
    if rng.random() < 0.5:
        color = [c for c in COLORS if c != o.color][int(rng.integers(len(COLORS) - 1))]
        objs[i] = replace(o, color=color)
    else:
        shape = [s for s in SHAPES if s != o.shape][int(rng.integers(len(SHAPES) - 1))]
        objs[i] = replace(o, shape=shape)
    return Scene(sid, tuple(objs), scene.style)


def _entry(root: Path, rel: str, scene: Scene, style: str, rng: np.random.Generator, seed: int, split: str,
           index: int, size: int, post: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[str, str]:
    path = root / rel
    if not path.is_file():
        arr = render(scene, style, rng, size)
        save_png(path, post(arr) if post else arr)
    return rel, captions_for(scene, seed, split, index % 1_000_000, 1)[0]


def build_ilias(root: Path, split: str, gallery: int | None = None, *, seed: int = 0, renderings: int = 4,
                hard: int = 2, size: int = 64, instances: int | None = None, progress: bool = False) -> Path:
    from qshift.progress import progress_bar

    if renderings < 2:
        raise InputError(f"world-ilias: an instance needs >= 2 renderings (a query and a positive), got {renderings}")
    n_inst = instances or SPLIT_SIZES["ilias"][split]
    gallery = gallery or n_inst * (renderings - 1 + hard)
    base = n_inst * (renderings - 1 + hard)
    if gallery < base:
        raise InputError(f"world-ilias {split}: a gallery of {gallery} cannot hold the {base} renderings and near-"
                         f"duplicates of its {n_inst} instances")
    name = f"ilias-{split}-{gallery}" + (f"-i{n_inst}" if instances else "")
    (root / "images" / name).mkdir(parents=True, exist_ok=True)
    rows, role, instance = [], [], []
    with progress_bar(f"world-ilias {split} ({gallery} gallery)", n_inst + gallery - base, progress) as bar:
        for k in range(n_inst):
            idx = OFFSETS["ilias"] + k
            scene = sample_scene(seed, split, idx, TRAIN_STYLES)
            styles = scene_rng(seed, split, idx, 90).permutation(len(TRAIN_STYLES))
            for r in range(renderings):
                rng = scene_rng(seed, split, idx, 100 + r)
                view = _jitter(scene, rng, distractor=r > 0 and rng.random() < 0.5)
                rows.append(_entry(root, f"images/{name}/i{k:06d}-r{r}.png", view,
                                   TRAIN_STYLES[styles[r % len(styles)]], rng, seed, split, idx, size,
                                   lambda a, g=rng: _lighting(a, g)))
                role.append("query" if r == 0 else "gallery")
                instance.append(k)
            for h in range(hard):
                rng = scene_rng(seed, split, OFFSETS["ilias-hard"] + k, 100 + h)
                dup = _near_duplicate(scene, rng, f"h{k}-{h}")
                rows.append(_entry(root, f"images/{name}/h{k:06d}-{h}.png", _jitter(dup, rng, False),
                                   TRAIN_STYLES[int(rng.integers(len(TRAIN_STYLES)))], rng, seed, split, idx, size,
                                   lambda a, g=rng: _lighting(a, g)))
                role.append("gallery")
                instance.append(-1)
            bar.advance(1)
        for d in range(gallery - base):
            idx = OFFSETS["distractor"] + d
            scene = sample_scene(seed, split, idx, TRAIN_STYLES)
            rng = scene_rng(seed, split, idx, 100)
            rows.append(_entry(root, f"images/{name}/d{d:07d}.png", scene, scene.style, rng, seed, split, idx, size))
            role.append("gallery")
            instance.append(-1)
            bar.advance(1)
    return _save(root, name, rows, {"kind": "ilias", "split": split, "role": role, "instance": instance,
                                    "renderings": renderings, "hard": hard, "seed": seed})


# -- World-INQUIRE ----------------------------------------------------------------------------
def _word(table: dict, key: str) -> str:
    return table[key][0]


def _plural(shape: str) -> str:
    w = _word(SHAPE_WORDS, shape)
    return "crosses" if w == "cross" else w + "s"


TEMPLATES: dict[str, tuple[str, Callable[[], list], Callable[..., str], Callable[..., bool]]] = {
    # name: (split, slot values, text, relevance)
    "color_shape": ("train", lambda: [(c, s) for c in COLORS for s in SHAPES],
                    lambda c, s: f"a {_word(COLOR_WORDS, c)} {_word(SHAPE_WORDS, s)}",
                    lambda sc, c, s: any(o.color == c and o.shape == s for o in sc.objects)),
    "relation": ("train", lambda: [(c, s, r, s2) for c in COLORS for s in SHAPES for r in ("left", "above")
                                   for s2 in SHAPES if s2 != s],
                 lambda c, s, r, s2: f"a {_word(COLOR_WORDS, c)} {_word(SHAPE_WORDS, s)} "
                                     f"{'left of' if r == 'left' else 'above'} a {_word(SHAPE_WORDS, s2)}",
                 lambda sc, c, s, r, s2: any(a.color == c and a.shape == s and b.shape == s2 and a is not b
                                             and relation(a, b) == r for a in sc.objects for b in sc.objects)),
    "texture_shape": ("train", lambda: [(t, s) for t in TEXTURES if t != "plain" for s in SHAPES],
                      lambda t, s: f"a {t} {_word(SHAPE_WORDS, s)}",
                      lambda sc, t, s: any(o.texture == t and o.shape == s for o in sc.objects)),
    "two_kinds": ("train", lambda: [(s, s2) for i, s in enumerate(SHAPES) for s2 in SHAPES[i + 1:]],
                  lambda s, s2: f"a {_word(SHAPE_WORDS, s)} and a {_word(SHAPE_WORDS, s2)}",
                  lambda sc, s, s2: {s, s2} <= {o.shape for o in sc.objects}),
    "size_shape": ("val", lambda: [(z, s) for z in SIZES for s in SHAPES],
                   lambda z, s: f"a {'medium-sized' if z == 'medium' else z} {_word(SHAPE_WORDS, s)}",
                   lambda sc, z, s: any(o.size == z and o.shape == s for o in sc.objects)),
    "size_color": ("val", lambda: [(z, c) for z in SIZES for c in COLORS],
                   lambda z, c: f"a {'medium-sized' if z == 'medium' else z} {_word(COLOR_WORDS, c)} object",
                   lambda sc, z, c: any(o.size == z and o.color == c for o in sc.objects)),
    "color_position": ("val", lambda: [(c, cell) for c in COLORS for cell in range(9)],
                       lambda c, cell: f"a {_word(COLOR_WORDS, c)} object {CELL_WORDS[CELLS[cell]][0]}",
                       lambda sc, c, cell: any(o.color == c and o.cell == cell for o in sc.objects)),
    "count_shape": ("test", lambda: [(n, s) for n in (2, 3, 4) for s in SHAPES],
                    lambda n, s: f"{NUMBERS[n]} {_plural(s)}",
                    lambda sc, n, s: sum(o.shape == s for o in sc.objects) == n),
    "count_color": ("test", lambda: [(n, c) for n in (2, 3) for c in COLORS],
                    lambda n, c: f"{NUMBERS[n]} {_word(COLOR_WORDS, c)} objects",
                    lambda sc, n, c: sum(o.color == c for o in sc.objects) == n),
    "position": ("test", lambda: [(s, cell) for s in SHAPES for cell in range(9)],
                 lambda s, cell: f"a {_word(SHAPE_WORDS, s)} {CELL_WORDS[CELLS[cell]][0]}",
                 lambda sc, s, cell: any(o.shape == s and o.cell == cell for o in sc.objects)),
}


def inquire_scenes(split: str, gallery: int, seed: int = 0) -> list[Scene]:
    """The scene graphs of a World-INQUIRE gallery, image by image."""
    return [sample_scene(seed, split, OFFSETS["inquire"] + d, TRAIN_STYLES) for d in range(gallery)]


def template_relevance(name: str, scenes: list[Scene], min_relevant: int = 5) -> list[tuple[str, list[int]]]:
    """(query text, relevant scene indices) of every query of template ``name`` over
    ``scenes`` with at least ``min_relevant`` (and at most half of them) relevant."""
    _, slots, text, rel = TEMPLATES[name]
    out = []
    for args in slots():
        pos = [j for j, sc in enumerate(scenes) if rel(sc, *args)]
        if min_relevant <= len(pos) <= len(scenes) // 2:
            out.append((text(*args), pos))
    return out


def build_inquire(root: Path, split: str, gallery: int | None = None, *, seed: int = 0, size: int = 64,
                  min_relevant: int = 5, progress: bool = False) -> Path:
    """A gallery of new scenes and every query of this split's templates with at least
    ``min_relevant`` (and at most half the gallery) relevant images."""
    from qshift.progress import progress_bar

    gallery = gallery or SPLIT_SIZES["inquire"][split]
    name = f"inquire-{split}-{gallery}"
    (root / "images" / name).mkdir(parents=True, exist_ok=True)
    rows, scenes = [], inquire_scenes(split, gallery, seed)
    with progress_bar(f"world-inquire {split} ({gallery} gallery)", gallery, progress) as bar:
        for d, scene in enumerate(scenes):
            idx = OFFSETS["inquire"] + d
            rows.append(_entry(root, f"images/{name}/g{d:07d}.png", scene, scene.style,
                               scene_rng(seed, split, idx, 100), seed, split, idx, size))
            bar.advance(1)
    queries = [{"text": text, "template": tname, "positives": pos} for tname in TEMPLATES
               if TEMPLATES[tname][0] == split for text, pos in template_relevance(tname, scenes, min_relevant)]
    if not queries:
        raise InputError(f"world-inquire {split}: no query has {min_relevant}+ relevant images in {gallery}")
    return _save(root, name, rows, {"kind": "inquire", "split": split, "queries": queries, "seed": seed,
                                    "templates": sorted({q["template"] for q in queries}),
                                    "template_set": split_templates(split)})


def split_templates(split: str) -> list[str]:
    """The names of the World-INQUIRE templates of ``split`` (a protocol file records them, so
    that a set built before a template was added is rebuilt, not read with the old queries)."""
    return sorted(n for n, t in TEMPLATES.items() if t[0] == split)


# the direction each protocol is searched (and trained) in
DIRECTION = {"ilias": "i2i", "inquire": "t2i"}


def checked_protocol(collection: Any) -> dict:
    """The protocol of a world-ilias / world-inquire collection, refused when it belongs to
    other renderings (another world seed or build)."""
    p = collection.meta.get("protocol")
    if not p or p.get("kind") not in DIRECTION:
        raise InputError(f"{collection.name}: not a world-ilias / world-inquire collection")
    if collection.image_paths is None or p.get("images") != images_hash([str(x) for x in collection.image_paths],
                                                                        p.get("seed", 0)):
        raise InputError(f"{collection.source}: its protocol file was written for other renderings (another world "
                         "seed or build); rebuild the protocol set")
    return p


def images_hash(names: list[str], seed: int) -> str:
    """What a protocol file belongs to: its images (by file name) and the world seed."""
    from qshift.io import stable_hash

    return stable_hash([seed, [Path(n).name for n in names]])[:16]


def _save(root: Path, name: str, rows: list[tuple[str, str]], protocol: dict) -> Path:
    protocol = {**protocol, "images": images_hash([r[0] for r in rows], protocol["seed"])}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "caption"])
    w.writerows(rows)
    write_text(root / f"{name}.csv", buf.getvalue())
    write_json(root / f"{name}.protocol.json", protocol)
    return root / f"{name}.csv"


def protocol_root() -> Path:
    from qshift.paths import cache_dir

    return cache_dir() / "world-protocols"


def protocol_collection(spec: str, root: Path | None = None, progress: bool = False) -> Any:
    """The collection of a protocol spec (built on first use), with its ``meta['protocol']``."""
    from qshift.data.collection import load_collection

    kind, split, gallery, instances = parse_spec(spec)
    root = Path(root or protocol_root())
    size = gallery or ((instances or SPLIT_SIZES[kind][split]) * (5 if kind == "ilias" else 1))
    name = f"{kind}-{split}-{size}" + (f"-i{instances}" if instances else "")
    csv_path, meta_path = root / f"{name}.csv", root / f"{name}.protocol.json"
    stale = (kind == "inquire" and meta_path.is_file()
             and read_json(meta_path).get("template_set") != split_templates(split))
    if stale or not (csv_path.is_file() and meta_path.is_file()):
        if kind == "ilias":
            csv_path = build_ilias(root, split, size, instances=instances, progress=progress)
        else:
            csv_path = build_inquire(root, split, size, progress=progress)
    coll = load_collection(csv_path)
    coll.meta["protocol"] = read_json(meta_path)
    return coll
