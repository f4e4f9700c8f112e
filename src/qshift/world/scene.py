"""The scene grammar of the benchmark world: 1–4 objects on a 3×3 layout.

Each object has a shape, colour, size, texture and grid cell; relations (left of,
above, …) and counts follow from the layout. A scene is a pure function of
``(seed, split, index)``, so any part of a world can be regenerated identically.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "diamond", "ring")
COLORS = {  # name -> RGB in [0, 1]
    "red": (0.86, 0.12, 0.12), "orange": (0.97, 0.52, 0.05), "yellow": (0.96, 0.86, 0.10),
    "green": (0.13, 0.66, 0.18), "cyan": (0.10, 0.78, 0.85), "blue": (0.12, 0.25, 0.88),
    "purple": (0.55, 0.18, 0.75), "pink": (0.98, 0.45, 0.70),
}
SIZES = {"small": 0.11, "medium": 0.155, "large": 0.21}  # radius as a share of the image side
TEXTURES = ("plain", "striped", "dotted", "checkered")
TEXTURE_P = (0.55, 0.15, 0.15, 0.15)
CELLS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
COUNT_P = (0.1, 0.3, 0.3, 0.3)  # P(1..4 objects) with the default max of 4
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    texture: str
    cell: int          # 0..8, row-major over the 3×3 grid
    x: float           # centre, in [0, 1] image coordinates
    y: float
    angle: float       # rotation of polygon shapes, degrees

    @property
    def kind(self) -> tuple[str, str]:
        return (self.color, self.shape)


@dataclass(frozen=True)
class Scene:
    id: str
    objects: tuple[Obj, ...]
    style: str         # the rendering style this scene is assigned to in the mixed split

    def to_dict(self) -> dict:
        return {"id": self.id, "style": self.style, "objects": [asdict(o) for o in self.objects]}

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        return Scene(d["id"], tuple(Obj(**o) for o in d["objects"]), d["style"])


def relation(a: Obj, b: Obj) -> str:
    """Where ``a`` is relative to ``b``: 'left', 'right', 'above' or 'below'."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def scene_rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    """Independent random streams per scene: 0 = layout, 1 = captions, 2+ = rendering."""
    return np.random.default_rng([seed, SPLIT_CODES[split], index, stream])


def sample_scene(seed: int, split: str, index: int, styles: tuple[str, ...],
                 min_objects: int = 1, max_objects: int = 4) -> Scene:
    rng = scene_rng(seed, split, index, 0)
    counts = np.arange(min_objects, max_objects + 1)
    p = np.array([COUNT_P[c - 1] if c <= len(COUNT_P) else COUNT_P[-1] for c in counts])
    n = int(rng.choice(counts, p=p / p.sum()))
    cells = rng.choice(9, size=n, replace=False)
    same = n >= 2 and rng.random() < 0.25  # a group of identical objects ("two red stars")
    base = (SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))])
    objs = []
    for c in sorted(int(c) for c in cells):
        shape, color = base if same else (SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))])
        size = list(SIZES)[rng.integers(len(SIZES))]
        texture = TEXTURES[rng.choice(len(TEXTURES), p=TEXTURE_P)]
        row, col = divmod(c, 3)
        jx, jy = rng.uniform(-0.05, 0.05, size=2)
        objs.append(Obj(shape, color, size, texture, c, (col + 0.5) / 3 + jx, (row + 0.5) / 3 + jy,
                        float(rng.uniform(-20, 20))))
    style = styles[int(rng.integers(len(styles)))]
    return Scene(f"{split}-{index:05d}", tuple(objs), style)
