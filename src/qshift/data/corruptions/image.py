"""Image query corruptions: the 15 ImageNet-C types (Hendrycks & Dietterich 2019) at
severities 1–5, plus its 4 extra types, through ``imagecorruptions`` (the
``imagecorruptions-imaug`` build, which runs on NumPy 2 / current scikit-image).

Inputs of any mode (grayscale, RGBA, palette) become RGB. ImageNet-C's parameters are in
pixels of 224-px images (blur radii, noise per pixel, pixelation and JPEG block sizes), so
an image whose shorter side is under ``reference_side`` (default 224) is upsampled to it
(bicubic), corrupted there and resized back: a 64-px image then gets the corruption a
224-px photo of the same scene would get, seen at 64 px — at its own size severity 5 of
most types leaves nothing (defocus blur with a 10-px radius on a 64-px image). Pass
``reference_side=0`` to corrupt at the native size (never under 32 px, which several
kernels assume). The library draws from NumPy's global generator (impulse noise and
glass blur from their own), so each call seeds both from (seed, corruption, severity,
index) and restores the global state afterwards.
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np
from PIL import Image

from qshift.data.corruptions.text import SEVERITIES, check_corruption
from qshift.errors import InputError

NOISE = ("gaussian_noise", "shot_noise", "impulse_noise")
BLUR = ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur")
WEATHER = ("snow", "frost", "fog", "brightness")
DIGITAL = ("contrast", "elastic_transform", "pixelate", "jpeg_compression")
IMAGE_CORRUPTIONS = NOISE + BLUR + WEATHER + DIGITAL
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
GROUP = {**{c: "noise" for c in NOISE + ("speckle_noise",)}, **{c: "blur" for c in BLUR + ("gaussian_blur",)},
         **{c: "weather" for c in WEATHER + ("spatter",)}, **{c: "digital" for c in DIGITAL + ("saturate",)}}
MIN_SIDE = 32
REFERENCE_SIDE = 224


def corrupt_image(image: Image.Image | np.ndarray, name: str, severity: int, seed: int = 0,
                  index: int = 0, reference_side: int = REFERENCE_SIDE) -> Image.Image:
    """A corrupted RGB copy of ``image``, same size (deterministic in seed and index)."""
    check_corruption(name, severity, IMAGE_CORRUPTIONS + EXTRA)
    if reference_side < 0:
        raise InputError(f"reference_side must be >= 0, got {reference_side}")
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    rgb = image.convert("RGB")
    w, h = rgb.size
    work = rgb
    side = max(MIN_SIDE, reference_side)
    if min(w, h) < side:
        scale = side / min(w, h)
        work = rgb.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.BICUBIC)
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


__all__ = ["corrupt_image", "REFERENCE_SIDE", "IMAGE_CORRUPTIONS", "EXTRA", "GROUP", "SEVERITIES"]
