"""Query shifts: text and image corruptions behind one registry.

``corrupt_text``/``corrupt_texts`` (:mod:`.text`) and ``corrupt_image`` (:mod:`.image`);
``modality_of(name)`` tells which one a corruption name belongs to.
"""

from __future__ import annotations

from qshift.data.corruptions.text import LEVEL, SEVERITIES, TEXT_CORRUPTIONS, check_corruption
from qshift.errors import InputError

IMAGE_NAMES = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression", "speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL = TEXT_CORRUPTIONS + IMAGE_NAMES
GROUPS = {"text": TEXT_CORRUPTIONS, "image": IMAGE_NAMES[:15], "image-extra": IMAGE_NAMES[15:],
          "character": tuple(c for c in TEXT_CORRUPTIONS if LEVEL[c] == "character"),
          "word": tuple(c for c in TEXT_CORRUPTIONS if LEVEL[c] == "word"),
          "sentence": tuple(c for c in TEXT_CORRUPTIONS if LEVEL[c] == "sentence")}


def modality_of(name: str) -> str:
    if name in TEXT_CORRUPTIONS:
        return "text"
    if name in IMAGE_NAMES:
        return "image"
    check_corruption(name, 1, ALL)  # raises with suggestions
    raise InputError(name)


def expand(names: list[str] | tuple[str, ...] | str) -> list[str]:
    """Corruption names with group names (``text``, ``image``, ``word``, …) expanded."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[str] = []
    for n in names:
        for m in GROUPS.get(n, (n,)):
            if m != "clean":
                modality_of(m)
            if m not in out:
                out.append(m)
    return out


__all__ = ["ALL", "GROUPS", "IMAGE_NAMES", "SEVERITIES", "TEXT_CORRUPTIONS", "expand", "modality_of"]
