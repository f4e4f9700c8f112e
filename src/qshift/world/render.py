"""Rendering styles (visual domains) for world scenes.

Every style draws the same scene grammar — the same objects, colours, sizes,
textures and positions — so captions stay true across styles while the pixels
change. Shape masks are drawn at 2× and box-filtered down (anti-aliasing);
compositing is numpy on float32 RGB in [0, 1].

Training styles: ``flat``, ``photo``, ``sketch``, ``dark``, ``cartoon``.
Held-out style: ``pixel`` (16-colour pixel art), never seen in training.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from qshift.io import write_bytes
from qshift.world.scene import COLORS, SIZES, Obj, Scene

RGB = np.ndarray


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return xx, yy


def _polygon(o: Obj, size: int) -> list[tuple[float, float]] | None:
    """Vertices of a polygon shape (None for circle/ring) in pixel coordinates."""
    r = SIZES[o.size] * size
    cx, cy = o.x * size, o.y * size
    if o.shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif o.shape == "triangle":
        pts = [(math.cos(a), math.sin(a) + 0.15) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif o.shape == "diamond":
        pts = [(0, -1), (0.68, 0), (0, 1), (-0.68, 0)]
    elif o.shape == "hexagon":
        pts = [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]
    elif o.shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (1.0 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    elif o.shape == "cross":
        w = 0.34
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
               (-1, -w), (-w, -w)]
    else:
        return None
    a = math.radians(o.angle)
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def shape_mask(o: Obj, size: int, outline: float = 0.0) -> np.ndarray:
    """Coverage in [0, 1] of the object (or of its outline, ``outline`` px wide)."""
    big = 2 * size
    im = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(im)
    width = max(1, round(2 * outline)) if outline else 0
    pts = _polygon(o, big)
    if pts is not None:
        if width:
            d.polygon(pts, outline=255, width=width)
        else:
            d.polygon(pts, fill=255)
    else:
        r = SIZES[o.size] * big * 0.95
        cx, cy = o.x * big, o.y * big
        box = (cx - r, cy - r, cx + r, cy + r)
        if o.shape == "ring":
            if width:
                d.ellipse(box, outline=255, width=width)
                ri = r * 0.55
                d.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), outline=255, width=width)
            else:
                d.ellipse(box, fill=255)
                ri = r * 0.55
                d.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
        elif width:
            d.ellipse(box, outline=255, width=width)
        else:
            d.ellipse(box, fill=255)
    return np.asarray(im.reduce(2), dtype=np.float32) / 255.0


def texture_fill(o: Obj, size: int, color: RGB, rng: np.random.Generator,
                 box: tuple[slice, slice] | None = None) -> np.ndarray:
    """The object's paint: flat colour, or colour alternating with a light tint (only the
    pixels of ``box`` when given; the random draws are the same either way)."""
    xx, yy = _grid(size)
    if box is not None:
        xx, yy = xx[box], yy[box]
    if o.texture == "plain":
        return np.broadcast_to(color, (*xx.shape, 3))
    s = size / 64.0
    if o.texture == "striped":
        pat = ((xx + yy * rng.uniform(-0.6, 0.6)) / (4 * s) + rng.random()) % 1.0 < 0.5
    elif o.texture == "dotted":
        p = 5 * s
        pat = ((xx % p - p / 2) ** 2 + (yy % p - p / 2) ** 2) > (1.3 * s) ** 2
    else:  # checkered
        c = 3 * s
        pat = ((xx // c + yy // c) % 2) == 0
    light = 0.45 * color + 0.55
    return np.where(pat[..., None], color, light)


def _paint(img: RGB, mask: np.ndarray, fill: np.ndarray | RGB) -> RGB:
    m = mask[..., None]
    return img * (1.0 - m) + fill * m


def _color(o: Obj) -> RGB:
    return np.asarray(COLORS[o.color], dtype=np.float32)


def _lowfreq(rng: np.random.Generator, size: int, cells: int = 4) -> np.ndarray:
    """Smooth noise in [0, 1]: a few random values upsampled bicubically."""
    small = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8), "L")
    return np.asarray(small.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0


def render_flat(scene: Scene, rng: np.random.Generator, size: int) -> RGB:
    img = np.empty((size, size, 3), np.float32)
    img[:] = 0.82 + 0.15 * rng.random(3)
    for o in scene.objects:
        img = _paint(img, shape_mask(o, size), texture_fill(o, size, _color(o), rng))
    return img


def _box(mask: np.ndarray) -> tuple[slice, slice] | None:
    """Row and column slices of the non-zero part of ``mask`` (None when empty)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def render_photo(scene: Scene, rng: np.random.Generator, size: int) -> RGB:
    """Vertical gradient × smooth light, soft drop shadows, radially shaded objects, sensor noise.

    The per-object work runs only inside the box where the shadow or the mask is non-zero
    (outside it both leave the image unchanged), in float32.
    """
    xx, yy = _grid(size)
    c0 = (0.35 + 0.45 * rng.random(3)).astype(np.float32)
    c1 = (0.35 + 0.45 * rng.random(3)).astype(np.float32)
    t = (yy[:, :1] / size)[..., None]  # size × 1 × 1: the gradient runs top to bottom
    img = (c0 * (1 - t) + c1 * t) * (0.8 + 0.35 * _lowfreq(rng, size)[..., None])
    blur = ImageFilter.GaussianBlur(1.5 * size / 64)
    shift = (round(size / 32), round(size / 40))
    for o in scene.objects:
        mask = shape_mask(o, size)
        shadow = np.asarray(Image.fromarray((mask * 255).astype(np.uint8), "L").filter(blur), np.float32)
        shadow = np.roll(shadow, shift, axis=(0, 1)) * np.float32(0.45 / 255.0)
        box = _box(shadow)
        if box is not None:
            img[box] *= (1 - shadow[box])[..., None]
        box = _box(mask)
        if box is None:  # off-image: nothing to paint, but keep the object's random draws
            texture_fill(o, size, _color(o), rng, (slice(0, 1), slice(0, 1)))
            continue
        r = SIZES[o.size] * size
        d = np.hypot(xx[box] - (o.x * size - 0.35 * r), yy[box] - (o.y * size - 0.35 * r)) / (2 * r)
        shade = np.clip(1.25 - 0.7 * d, 0.55, 1.25)[..., None]
        fill = texture_fill(o, size, _color(o), rng, box) * shade
        img[box] = _paint(img[box], mask[box], fill)
    img += rng.normal(0, 0.025, img.shape).astype(np.float32)
    return img


def render_sketch(scene: Scene, rng: np.random.Generator, size: int) -> RGB:
    xx, yy = _grid(size)
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.array([0.96, 0.95, 0.91]) + rng.normal(0, 0.015, (size, size, 1))
    s = size / 64.0
    for o in scene.objects:
        ink = _color(o) * 0.85
        angle = rng.uniform(0.3, 1.2)
        hatch = ((xx * math.cos(angle) + yy * math.sin(angle)) / (3.5 * s) + rng.random()) % 1.0 < 0.35
        if o.texture != "plain":  # textures show as denser, crossed hatching
            hatch |= ((xx * math.cos(-angle) + yy * math.sin(-angle)) / (3.5 * s)) % 1.0 < 0.35
        img = _paint(img, shape_mask(o, size) * hatch * 0.55, ink)
        img = _paint(img, shape_mask(o, size, outline=1.2 * s), ink)
    return img


def render_dark(scene: Scene, rng: np.random.Generator, size: int) -> RGB:
    img = np.empty((size, size, 3), np.float32)
    img[:] = 0.03 + 0.07 * rng.random(3)
    gain = rng.uniform(0.3, 0.45)
    for o in scene.objects:
        img = _paint(img, shape_mask(o, size), texture_fill(o, size, _color(o), rng) * gain)
    img = img + rng.normal(0, 0.05, img.shape).astype(np.float32)  # low-light sensor noise
    return img


def render_cartoon(scene: Scene, rng: np.random.Generator, size: int) -> RGB:
    xx, yy = _grid(size)
    hue = rng.random()
    base = np.array([0.5 + 0.5 * math.cos(2 * math.pi * (hue + k / 3)) for k in range(3)], np.float32)
    img = np.empty((size, size, 3), np.float32)
    img[:] = 0.55 + 0.4 * base
    vignette = np.hypot(xx - size / 2, yy - size / 2) / size
    img = img * (1.05 - 0.5 * vignette[..., None])
    s = size / 64.0
    for o in scene.objects:
        img = _paint(img, shape_mask(o, size), texture_fill(o, size, _color(o), rng))
        img = _paint(img, shape_mask(o, size, outline=2.2 * s), np.zeros(3, np.float32))
        r = SIZES[o.size] * size
        spot = np.hypot(xx - (o.x * size - 0.35 * r), yy - (o.y * size - 0.4 * r)) < 0.22 * r
        img = _paint(img, spot.astype(np.float32) * 0.7, np.ones(3, np.float32))
    return img


PICO8 = np.array([(0, 0, 0), (29, 43, 83), (126, 37, 83), (0, 135, 81), (171, 82, 54), (95, 87, 79),
                  (194, 195, 199), (255, 241, 232), (255, 0, 77), (255, 163, 0), (255, 236, 39),
                  (0, 228, 54), (41, 173, 255), (131, 118, 156), (255, 119, 168), (255, 204, 170)], np.float32)


def render_pixel(scene: Scene, rng: np.random.Generator, size: int) -> RGB:
    """Held-out: flat scene, 4× box-downsampled, snapped to the PICO-8 palette, upsampled."""
    img = render_flat(scene, rng, size)
    f = 4
    small = img.reshape(size // f, f, size // f, f, 3).mean(axis=(1, 3)) * 255.0
    idx = ((small[:, :, None, :] - PICO8[None, None]) ** 2).sum(-1).argmin(-1)
    return np.repeat(np.repeat(PICO8[idx] / 255.0, f, axis=0), f, axis=1)


STYLES: dict[str, Callable[[Scene, np.random.Generator, int], RGB]] = {
    "flat": render_flat, "photo": render_photo, "sketch": render_sketch, "dark": render_dark,
    "cartoon": render_cartoon, "pixel": render_pixel,
}
TRAIN_STYLES = ("flat", "photo", "sketch", "dark", "cartoon")
HELDOUT_STYLES = ("pixel",)


def render(scene: Scene, style: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """The scene as a ``size``×``size`` RGB uint8 array in ``style``."""
    img = STYLES[style](scene, rng, size)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(path: Path, arr: RGB) -> None:
    """Write a rendered image as PNG, atomically (a temporary file of its own, so two
    processes rendering the same set do not rename each other's files away); not fsync'ed:
    a lost image is rendered again."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    write_bytes(path, buf.getvalue(), fsync=False)
