"""Image loading with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from qshift.errors import InputError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


def load_image(image: ImageLike) -> Image.Image:
    """Return an RGB PIL image from a path, a PIL image or an HxW[xC] uint8 array."""
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.size and np.nanmax(arr) <= 1.0:
                arr = arr * 255.0
            arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            raise InputError(f"image array of shape {image.shape}: expected HxW, HxWx3 or HxWx4")
        img = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    else:
        path = Path(image)
        if not path.is_file():
            raise InputError(f"{path}: image file not found")
        try:
            with Image.open(path) as fh:
                fh.load()
                img = fh.copy()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise InputError(f"{path}: not a readable image ({exc})") from exc
    if img.width < 1 or img.height < 1:
        raise InputError(f"{image!s:.200}: empty image")
    return img if img.mode == "RGB" else img.convert("RGB")
