"""Captions for world scenes: several phrasings, partial descriptions, synonyms.

Five captions of one scene differ the way COCO's do: some list every object, some
name a relation or a position, some mention only the most salient object or the
count, and attribute words come from small synonym sets. Every caption is true of
its scene (it may leave things out, never invent them).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from qshift.world.scene import CELLS, SIZES, Obj, Scene, relation, scene_rng

SHAPE_WORDS = {
    "circle": ("circle", "circle", "disc", "round shape"), "square": ("square", "square", "block"),
    "triangle": ("triangle",), "star": ("star", "star", "five-pointed star"),
    "cross": ("cross", "cross", "plus sign"), "hexagon": ("hexagon", "hexagon", "six-sided shape"),
    "diamond": ("diamond", "diamond", "rhombus"), "ring": ("ring", "ring", "hollow circle", "donut"),
}
PLURAL = {"cross": "crosses", "plus sign": "plus signs", "rhombus": "rhombi", "block": "blocks"}
COLOR_WORDS = {"red": ("red",), "orange": ("orange",), "yellow": ("yellow",), "green": ("green",),
               "cyan": ("cyan", "turquoise"), "blue": ("blue",), "purple": ("purple", "violet"),
               "pink": ("pink",)}
SIZE_WORDS = {"small": ("small", "tiny", "little"), "medium": ("medium-sized", "mid-sized"),
              "large": ("large", "big", "huge")}
TEXTURE_WORDS = {"striped": ("striped", "stripy"), "dotted": ("dotted", "spotted", "polka-dot"),
                 "checkered": ("checkered", "checked")}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
REL_WORDS = {"left": ("to the left of", "left of", "on the left of"),
             "right": ("to the right of", "right of", "on the right of"),
             "above": ("above", "over", "higher than"), "below": ("below", "under", "beneath")}
CELL_WORDS = {"top left": ("in the top left corner", "at the upper left"),
              "top": ("at the top", "in the upper middle"),
              "top right": ("in the top right corner", "at the upper right"),
              "left": ("on the left", "at the middle left"),
              "centre": ("in the centre", "in the center", "in the middle"),
              "right": ("on the right", "at the middle right"),
              "bottom left": ("in the bottom left corner", "at the lower left"),
              "bottom": ("at the bottom", "in the lower middle"),
              "bottom right": ("in the bottom right corner", "at the lower right")}
INTROS = ("", "", "a picture of ", "an image of ", "there is ", "a scene with ", "this shows ",
          "a drawing of ", "we see ")


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(o: Obj, rng: np.random.Generator, count: int = 1, detail: float = 0.6) -> str:
    """'a small striped red star' / 'two red stars'; size and texture appear with prob ``detail``."""
    words = []
    if count == 1 and rng.random() < detail:
        words.append(_pick(rng, SIZE_WORDS[o.size]))
    if count == 1 and o.texture != "plain" and rng.random() < detail + 0.2:
        words.append(_pick(rng, TEXTURE_WORDS[o.texture]))
    words.append(_pick(rng, COLOR_WORDS[o.color]))
    shape = _pick(rng, SHAPE_WORDS[o.shape])
    if count > 1:
        shape = PLURAL.get(shape, shape + "s")
        return f"{NUMBERS[count]} {' '.join(words)} {shape}"
    words.append(shape)
    return f"{_article(words[0])} {' '.join(words)}"


def _join(parts: list[str], rng: np.random.Generator) -> str:
    if len(parts) == 1:
        return parts[0]
    last = " and " if rng.random() < 0.8 else ", and "
    return ", ".join(parts[:-1]) + last + parts[-1]


def _listing(scene: Scene, rng: np.random.Generator) -> str:
    groups = Counter(o.kind for o in scene.objects)
    firsts = {}
    for o in scene.objects:
        firsts.setdefault(o.kind, o)
    order = list(firsts)
    rng.shuffle(order)
    parts = [noun_phrase(firsts[k], rng, groups[k]) for k in order]
    return _pick(rng, INTROS) + _join(parts, rng)


def _relational(scene: Scene, rng: np.random.Generator) -> str:
    i, j = rng.choice(len(scene.objects), size=2, replace=False)
    a, b = scene.objects[int(i)], scene.objects[int(j)]
    text = f"{noun_phrase(a, rng)} {_pick(rng, REL_WORDS[relation(a, b)])} {noun_phrase(b, rng)}"
    rest = [o for k, o in enumerate(scene.objects) if k not in (i, j)]
    if rest and rng.random() < 0.8:
        text += _pick(rng, (", with ", " and ", ", next to ")) + _join([noun_phrase(o, rng, detail=0.2) for o in rest], rng)
    return text


def _positional(scene: Scene, rng: np.random.Generator) -> str:
    objs = list(scene.objects)
    rng.shuffle(objs)
    objs = objs[:2]
    parts = [f"{noun_phrase(o, rng)} {_pick(rng, CELL_WORDS[CELLS[o.cell]])}"
             for o in objs]
    return _join(parts, rng)


def _salient(scene: Scene, rng: np.random.Generator) -> str:
    big = max(scene.objects, key=lambda o: (SIZES[o.size], -o.cell))
    n = len(scene.objects)
    phrase = noun_phrase(big, rng, detail=0.8)
    if n == 1:
        where = " " + _pick(rng, CELL_WORDS[CELLS[big.cell]])
        return _pick(rng, ("", "a picture of ", "just ", "a lone shape: ")) + phrase + where
    where = _pick(rng, CELL_WORDS[CELLS[big.cell]])
    more = f"{NUMBERS[n - 1]} more {'shape' if n == 2 else 'shapes'}"
    tail = _pick(rng, (f" {where} and {more}", f" {where}, among {more}", f" with {more} around it",
                       f" {where} with {more}"))
    return phrase + tail


def _count(scene: Scene, rng: np.random.Generator) -> str:
    n = len(scene.objects)
    noun = "shape" if n == 1 else "shapes"
    head = _pick(rng, (f"{NUMBERS[n]} {noun}", f"{NUMBERS[n]} {'object' if n == 1 else 'objects'}",
                       f"a group of {NUMBERS[n]} {noun}" if n > 1 else f"one {noun}"))
    groups = Counter(o.kind for o in scene.objects)
    firsts = {o.kind: o for o in reversed(scene.objects)}
    return head + ": " + _join([noun_phrase(firsts[k], rng, groups[k], detail=0.3) for k in groups], rng)


def captions_for(scene: Scene, seed: int, split: str, index: int, n: int = 5) -> list[str]:
    """``n`` distinct captions (phrasing kinds drawn without replacement where possible)."""
    rng = scene_rng(seed, split, index, 1)
    kinds = [_listing, _positional, _salient, _count, _listing]
    if len(scene.objects) >= 2:
        kinds += [_relational, _relational]
    caps: list[str] = []
    order = list(rng.permutation(len(kinds)))
    tries = 0
    while len(caps) < n and tries < 50:
        kind = kinds[order[tries]] if tries < len(order) else kinds[int(rng.integers(len(kinds)))]
        text = kind(scene, rng).strip()
        text = text[0].upper() + text[1:] if rng.random() < 0.5 else text
        if rng.random() < 0.4:
            text += "."
        if text not in caps:
            caps.append(text)
        tries += 1
    while len(caps) < n:  # tiny scenes can run out of distinct phrasings
        caps.append(caps[len(caps) % max(1, len(caps))])
    return caps
