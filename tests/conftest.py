from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from qshift.paths import shared_data_dir

warnings.filterwarnings("ignore", message=".*has no checkpoint.*")

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220)}
SHAPES = ("square", "circle")


def make_image_collection(root: Path, n_per: int = 2) -> Path:
    """A folder of small rendered images + captions.csv (2 captions per image)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for color, rgb in COLORS.items():
        for shape in SHAPES:
            for i in range(n_per):
                img = Image.new("RGB", (40 + 4 * i, 36), (250, 250, 250))
                d = ImageDraw.Draw(img)
                box = (6 + i, 6, 30 + i, 30)
                (d.rectangle if shape == "square" else d.ellipse)(box, fill=rgb)
                name = f"{color}_{shape}_{i}.png"
                img.save(root / "images" / name)
                rows += [(name, f"a {color} {shape}"), (name, f"one {shape} that is {color}, picture {i}")]
    with open(root / "captions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    return root


@pytest.fixture(scope="session")
def tiny_clip():
    from qshift.encoders import create_encoder

    return create_encoder("openclip:qshift-tiny-vit")


@pytest.fixture(scope="session")
def minilm():
    from qshift.encoders import create_encoder

    return create_encoder("st:all-MiniLM-L6-v2")


@pytest.fixture()
def image_collection(tmp_path: Path) -> Path:
    return make_image_collection(tmp_path / "shapes")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("../shared/data is not present (set QSHIFT_SHARED_DATA to run this test)")
    return d


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
