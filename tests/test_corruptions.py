import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from qshift.data.collection import load_collection
from qshift.data.corruptions import GROUPS, expand, modality_of
from qshift.data.corruptions.image import EXTRA, IMAGE_CORRUPTIONS, corrupt_image
from qshift.data.corruptions.text import (CHAR, SENTENCE, TEXT_CORRUPTIONS, WORD, corrupt_text, corrupt_texts,
                                          passive)
from qshift.data.shifts import ShiftSpec, write_shift
from qshift.data.streams import CLEAN, mixed_stream, source_share_stream
from qshift.errors import InputError

CAPS = ["A man riding a horse on the beach.", "Two dogs are playing with a frisbee in the park",
        "a large red circle to the left of a small blue square", "A woman is holding an umbrella.",
        "A pizza being eaten by a young boy", "an orange cat sleeping on a wooden bench near the window"] * 5


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


@pytest.mark.parametrize("name", TEXT_CORRUPTIONS)
def test_text_corruption_deterministic_and_effective(name):
    a = corrupt_texts(CAPS, name, 5, seed=1)
    b = corrupt_texts(CAPS, name, 5, seed=1)
    assert a.texts == b.texts and len(a.texts) == len(CAPS)
    assert all(t.strip() for t in a.texts)
    changed = sum(t != c for t, c in zip(a.texts, CAPS))
    assert changed >= (len(CAPS) // 2 if name in CHAR + WORD else len(CAPS) // 3), a.texts
    if name in CHAR + WORD:
        assert a.texts != corrupt_texts(CAPS, name, 5, seed=2).texts


@pytest.mark.parametrize("name", CHAR + ("word_delete", "word_swap", "synonym_replace"))
def test_severity_scales_the_damage(name):
    caps = CAPS * 2
    low = corrupt_texts(caps, name, 1).texts
    high = corrupt_texts(caps, name, 5).texts
    d_low = np.mean([_edit_distance(a, b) for a, b in zip(low, caps)])
    d_high = np.mean([_edit_distance(a, b) for a, b in zip(high, caps)])
    assert d_high > 1.5 * d_low, (d_low, d_high)


def test_voice_rules():
    assert passive("A man riding a horse on the beach.", 3, __import__("random").Random(0)) == \
        "A horse being ridden by a man on the beach."
    assert corrupt_text("A woman is holding an umbrella.", "active", 5) == "A woman holds an umbrella."
    assert corrupt_text("A pizza being eaten by a young boy", "active", 1) == "A young boy eats a pizza"


def test_bad_names_and_severities():
    with pytest.raises(InputError, match="did you mean keyboard"):
        corrupt_text("a dog", "keybord", 3)
    for bad in (0, 6, 2.5, "3"):
        with pytest.raises(InputError, match="severity"):
            corrupt_text("a dog", "ocr", bad)
    with pytest.raises(InputError, match="unknown corruption"):
        expand("text,fgo")
    assert expand("sentence") == list(SENTENCE) and modality_of("fog") == "image"
    assert len(GROUPS["image"]) == 15 and len(TEXT_CORRUPTIONS) == 16


def test_empty_results_keep_the_original(monkeypatch):
    from qshift.data.corruptions import text as T

    monkeypatch.setitem(T._FUNCS, "word_delete", lambda t, s, r: "" if "dog" in t else t.upper())
    res = corrupt_texts(["a dog", "a cat"], "word_delete", 3)
    assert res.texts == ["a dog", "A CAT"] and res.stats["empty_kept_original"] == 1


def test_similarity_filter(minilm):
    plain = corrupt_texts(CAPS, "synonym_replace", 5, seed=3)
    filt = corrupt_texts(CAPS, "synonym_replace", 5, seed=3, min_similarity=0.9, encoder=minilm, max_tries=4)
    sims_plain = np.einsum("ij,ij->i", minilm.encode_text(CAPS), minilm.encode_text(plain.texts))
    sims_filt = np.einsum("ij,ij->i", minilm.encode_text(CAPS), minilm.encode_text(filt.texts))
    assert np.all(sims_filt >= sims_plain - 1e-6) and sims_filt.mean() > sims_plain.mean()
    assert filt.stats["redrawn"] > 0 and abs(filt.stats["mean_similarity"] - sims_filt.mean()) < 1e-4
    with pytest.raises(InputError, match="needs a text encoder"):
        corrupt_texts(CAPS, "formal", 2, min_similarity=0.9)


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    base = np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1) + rng.normal(0, 10, (64, 64, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("name", IMAGE_CORRUPTIONS + EXTRA)
def test_image_corruptions(photo, name):
    out = corrupt_image(photo, name, 3, seed=0, index=4)
    assert out.mode == "RGB" and out.size == photo.size
    again = corrupt_image(photo, name, 3, seed=0, index=4)
    assert np.array_equal(np.asarray(out), np.asarray(again))
    diff1 = np.abs(np.asarray(corrupt_image(photo, name, 1), float) - np.asarray(photo, float)).mean()
    diff5 = np.abs(np.asarray(corrupt_image(photo, name, 5), float) - np.asarray(photo, float)).mean()
    assert diff5 > 0.5 and diff5 >= diff1 * 0.9, (diff1, diff5)


def test_gaussian_noise_matches_imagenet_c_reference(photo):
    """ImageNet-C gaussian_noise, severity 2: x/255 + N(0, 0.12), clipped, ×255."""
    import zlib

    x = np.asarray(photo)
    np.random.seed(zlib.crc32(b"7/gaussian_noise/2/0"))
    ref = np.uint8(np.clip(x / 255.0 + np.random.normal(size=x.shape, scale=0.12), 0, 1) * 255)
    assert np.array_equal(np.asarray(corrupt_image(photo, "gaussian_noise", 2, seed=7, reference_side=0)), ref)


@pytest.mark.parametrize("name", ["defocus_blur", "gaussian_noise"])
def test_small_images_are_corrupted_at_the_reference_side(photo, name):
    """A 64-px image gets the corruption of a 224-px image, resized back: milder than at 64 px."""
    x = np.asarray(photo, float)
    at_ref = corrupt_image(photo, name, 5)
    native = corrupt_image(photo, name, 5, reference_side=0)
    assert at_ref.size == native.size == photo.size
    assert 0.5 < np.abs(np.asarray(at_ref, float) - x).mean() < np.abs(np.asarray(native, float) - x).mean()
    big = photo.resize((256, 256))  # already over the reference side: corrupted as is
    same = corrupt_image(big, name, 5), corrupt_image(big, name, 5, reference_side=0)
    assert np.array_equal(*map(np.asarray, same))
    with pytest.raises(InputError, match="reference_side"):
        corrupt_image(photo, name, 5, reference_side=-1)


@pytest.mark.parametrize("mode, size", [("L", (64, 64)), ("RGBA", (64, 48)), ("P", (40, 40)), ("RGB", (9, 7))])
def test_image_modes_and_tiny_images(photo, mode, size):
    img = photo.resize(size).convert(mode)
    out = corrupt_image(img, "motion_blur", 4)
    assert out.mode == "RGB" and out.size == size


def test_streams():
    shifts = ["keyboard", "ocr", "formal"]
    mixed = mixed_stream(300, shifts, [1, 3, 5], seed=0)
    assert sorted(i.query for i in mixed) == list(range(300))
    assert {i.shift for i in mixed} == set(shifts) and {i.severity for i in mixed} == {1, 3, 5}
    assert mixed == mixed_stream(300, shifts, [1, 3, 5], seed=0)
    share = source_share_stream(2000, shifts, [5], seed=0)
    clean = np.array([i.shift == CLEAN for i in share])
    assert 0.35 < clean[:200].mean() < 0.6 and clean[-200:].mean() < 0.08
    assert sorted(i.query for i in share) == list(range(2000))
    with pytest.raises(InputError):
        mixed_stream(0, shifts, [1])
    with pytest.raises(InputError):
        mixed_stream(5, shifts, [9])


def test_write_shift_text_and_image(image_collection):
    coll = load_collection(image_collection)
    path = write_shift(image_collection, coll, ShiftSpec("char_swap", 5, seed=2), progress=False)
    shifted = load_collection(path)
    assert shifted.ids == coll.ids and shifted.captions != coll.captions
    man = json.loads(path.with_suffix(".json").read_text())
    assert man["corruption"] == "char_swap" and man["generator"] == "nlpaug" and man["source_key"] == coll.key()

    ipath = write_shift(image_collection, coll, ShiftSpec("fog", 4), progress=False)
    icoll = load_collection(ipath)
    assert icoll.captions == coll.captions and all(p.is_file() for p in icoll.image_paths)
    victim = icoll.image_paths[3]
    victim.unlink()
    write_shift(image_collection, coll, ShiftSpec("fog", 4), progress=False)
    assert json.loads(ipath.with_suffix(".json").read_text())["stats"]["rendered"] == 1 and victim.is_file()


def test_cli_corrupt(image_collection):
    from qshift.cli import app

    res = CliRunner().invoke(app, ["corrupt", str(image_collection), "-c", "ocr,contrast", "-s", "1,2", "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)) == 4
    bad = CliRunner().invoke(app, ["corrupt", str(image_collection), "-c", "ocr", "-s", "x"])
    assert bad.exit_code == 2 and "severity" in bad.output
