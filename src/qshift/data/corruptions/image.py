"""Image query corruptions: the 15 ImageNet-C types (Hendrycks & Dietterich 2019) at
severities 1–5, plus its 4 extra types, through ``imagecorruptions`` (the
``imagecorruptions-imaug`` build, which runs on NumPy 2 / current scikit-image).

Inputs of any mode (grayscale, RGBA, palette) become RGB; images under 32 px on a side
are upsampled to 32 for the corruption (several kernels assume that much) and resized
back. The library draws from NumPy's global generator (impulse noise and glass blur from
their own), so each call seeds both from (seed, corruption, severity, index) and
restores the global state afterwards.
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np
from PIL import Image

from qshift.data.corruptions.text import SEVERITIES, check_corruption

NOISE = ("gaussian_noise", "shot_noise", "impulse_noise")
BLUR = ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur")
WEATHER = ("snow", "frost", "fog", "brightness")
DIGITAL = ("contrast", "elastic_transform", "pixelate", "jpeg_compression")
IMAGE_CORRUPTIONS = NOISE + BLUR + WEATHER + DIGITAL
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
GROUP = {**{c: "noise" for c in NOISE + ("speckle_noise",)}, **{c: "blur" for c in BLUR + ("gaussian_blur",)},
         **{c: "weather" for c in WEATHER + ("spatter",)}, **{c: "digital" for c in DIGITAL + ("saturate",)}}
MIN_SIDE = 32


def corrupt_image(image: Image.Image | np.ndarray, name: str, severity: int, seed: int = 0,
                  index: int = 0) -> Image.Image:
    """A corrupted RGB copy of ``image`` (deterministic in seed and index)."""
    check_corruption(name, severity, IMAGE_CORRUPTIONS + EXTRA)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    rgb = image.convert("RGB")
    w, h = rgb.size
    work = rgb
    if min(w, h) < MIN_SIDE:
        scale = MIN_SIDE / min(w, h)
        work = rgb.resize((max(MIN_SIDE, round(w * scale)), max(MIN_SIDE, round(h * scale))), Image.BICUBIC)
    from imagecorruptions import corrupt

    state = np.random.get_state()
    draw_seed = zlib.crc32(f"{seed}/{name}/{severity}/{index}".encode())
    np.random.seed(draw_seed)
    # these two draw from their own generators unless given a seed
    kwargs = {"seed": draw_seed} if name in ("impulse_noise", "glass_blur") else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = corrupt(np.asarray(work), corruption_name=name, severity=severity, **kwargs)
    finally:
        np.random.set_state(state)
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)[..., :3])
    if out.size != (w, h):
        out = out.resize((w, h), Image.BICUBIC)
    return out


__all__ = ["corrupt_image", "IMAGE_CORRUPTIONS", "EXTRA", "GROUP", "SEVERITIES"]
