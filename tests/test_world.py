import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qshift.data.collection import load_collection
from qshift.errors import CheckpointMismatchError, EncoderSpecError, InputError
from qshift.world.captions import COLOR_WORDS, SHAPE_WORDS, captions_for
from qshift.world.generate import WorldConfig, generate_world, open_world
from qshift.world.render import STYLES, render
from qshift.world.scene import COLORS, SHAPES, relation, sample_scene, scene_rng

SMALL = WorldConfig(n_train=30, n_val=6, n_test=8)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    generate_world(root, SMALL)
    return root


def test_scenes_are_deterministic_and_valid():
    a = [sample_scene(3, "test", i, ("flat", "photo")) for i in range(50)]
    b = [sample_scene(3, "test", i, ("flat", "photo")) for i in range(50)]
    assert a == b
    assert a != [sample_scene(4, "test", i, ("flat", "photo")) for i in range(50)]
    for s in a:
        assert 1 <= len(s.objects) <= 4
        assert len({o.cell for o in s.objects}) == len(s.objects)  # one object per cell
        assert all(o.shape in SHAPES and o.color in COLORS for o in s.objects)


def test_relations():
    s = sample_scene(0, "train", 0, ("flat",))
    o = s.objects[0]
    left = o.__class__(**{**o.__dict__, "x": 0.1, "y": 0.5})
    right = o.__class__(**{**o.__dict__, "x": 0.9, "y": 0.5})
    top = o.__class__(**{**o.__dict__, "x": 0.5, "y": 0.1})
    assert relation(left, right) == "left" and relation(right, left) == "right"
    assert relation(top, right) == "above" or relation(top, right) == "left"
    assert relation(top, o.__class__(**{**o.__dict__, "x": 0.5, "y": 0.9})) == "above"


def test_captions_are_varied_and_true():
    """Five distinct captions, and every colour/shape word names an object in the scene."""
    colour_of = {w: c for c, ws in COLOR_WORDS.items() for w in ws}
    shape_of = {w: s for s, ws in SHAPE_WORDS.items() for w in ws}
    lengths = set()
    for i in range(200):
        scene = sample_scene(0, "val", i, ("flat",))
        caps = captions_for(scene, 0, "val", i)
        assert len(caps) == 5
        if len(scene.objects) > 1:
            assert len(set(caps)) == 5
        present_c = {o.color for o in scene.objects}
        present_s = {o.shape for o in scene.objects}
        for c in caps:
            lengths.add(len(c.split()))
            low = c.lower()
            for w, col in colour_of.items():
                if re.search(rf"\b{w}\b", low):
                    assert col in present_c, (c, scene)
            for w, shp in sorted(shape_of.items(), key=lambda kv: -len(kv[0])):
                if re.search(rf"\b{w}s?\b", low) and not (w == "circle" and "hollow circle" in low):
                    assert shp in present_s or (shp == "circle" and "ring" in present_s), (c, scene)
    assert len(lengths) > 10  # not one template


@pytest.mark.parametrize("style", list(STYLES))
def test_every_style_renders(style):
    scene = sample_scene(0, "test", 1, ("flat",))
    img = render(scene, style, scene_rng(0, "test", 1, 2), 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert img.std() > 5  # not blank
    again = render(scene, style, scene_rng(0, "test", 1, 2), 64)
    assert np.array_equal(img, again)


def test_styles_differ():
    scene = sample_scene(0, "test", 2, ("flat",))
    imgs = {s: render(scene, s, scene_rng(0, "test", 2, 2), 64).astype(float) for s in STYLES}
    for a in STYLES:
        for b in STYLES:
            if a < b:
                assert np.abs(imgs[a] - imgs[b]).mean() > 5, (a, b)


def test_world_layout(world):
    w = open_world(world)
    assert w.config == SMALL
    assert all(p["complete"] for p in w.parts.values())
    test = load_collection(world / "test.csv")
    assert len(test) == 8 and all(len(c) == 5 for c in test.captions)
    assert all(p.is_file() for p in test.image_paths)
    assert Image.open(test.image_paths[0]).size == (64, 64)
    for style in (*SMALL.styles, *SMALL.heldout):  # every test scene in every style
        coll = load_collection(world / f"test-{style}.csv")
        assert coll.captions == test.captions
    train_sizes = [len(load_collection(world / f"train-{s}.csv")) for s in SMALL.styles]
    assert sum(train_sizes) == 30  # train scenes are split over the styles
    assert not (world / "train-pixel.csv").exists()  # held-out never in training


def test_resume_rerenders_only_missing(world, tmp_path):
    root = tmp_path / "w"
    generate_world(root, SMALL, splits=["test"])
    victim = root / "images" / "photo" / "test" / "test-00003.png"
    before = victim.read_bytes()
    victim.unlink()
    other = root / "images" / "flat" / "test" / "test-00001.png"
    mtime = other.stat().st_mtime_ns
    m = json.loads((root / "world.json").read_text())
    m["parts"]["photo/test"]["complete"] = False  # as if interrupted mid-part
    (root / "world.json").write_text(json.dumps(m))
    w = generate_world(root, splits=["test"])
    assert victim.read_bytes() == before  # identical re-render
    assert other.stat().st_mtime_ns == mtime  # untouched
    assert w.parts["photo/test"] == {**w.parts["photo/test"], "complete": True, "rendered": 1}
    assert (root / "images" / "flat" / "test" / "test-00001.png").read_bytes() == \
        (world / "images" / "flat" / "test" / "test-00001.png").read_bytes()


def test_world_rejects_other_params(world):
    with pytest.raises(InputError, match="other parameters"):
        generate_world(world, WorldConfig(n_train=31, n_val=6, n_test=8))


@pytest.mark.parametrize("kw, msg", [
    ({"min_objects": 0}, "min_objects"), ({"max_objects": 12}, "max_objects"),
    ({"n_test": -1}, "n_test"), ({"styles": ("flat", "oil-paint")}, "unknown style 'oil-paint'"),
    ({"image_size": 30}, "image_size"), ({"heldout": ("flat",)}, "both"),
])
def test_bad_world_params(kw, msg):
    with pytest.raises(InputError, match=msg):
        WorldConfig(**kw)


def test_unknown_split(tmp_path):
    with pytest.raises(InputError, match="unknown split 'tset'"):
        generate_world(tmp_path / "w", SMALL, splits=["tset"])


def test_train_resume_and_world_encoder(world, tmp_path):
    """Two tiny epochs, an interrupted third resumed; the checkpoint loads as world:mini-clip@PATH."""
    from qshift.encoders import create_encoder
    from qshift.world.train import TrainConfig, train

    out = tmp_path / "run"
    cfg = dict(model="mini-clip", batch_size=16, warmup_steps=1, bf16=False)
    s2 = train(world, out, TrainConfig(epochs=2, **cfg), progress=False)
    assert len(s2["log"]) == 2 and np.isfinite(s2["final"]["loss"])
    with pytest.raises(InputError, match="another config"):
        train(world, out, TrainConfig(epochs=3, **cfg), progress=False)
    ckpt = out / "model.safetensors"
    enc = create_encoder(f"world:mini-clip@{ckpt}")
    assert enc.dim == 128
    v = enc.encode_text(["a red circle"])
    assert v.shape == (1, 128) and abs(np.linalg.norm(v) - 1) < 1e-5
    img = enc.encode_images([world / "images" / "flat" / "test" / "test-00000.png"])
    assert img.shape == (1, 128)
    assert enc.fingerprint().startswith(f"world:mini-clip@{ckpt}#")


def test_checkpoint_mismatch(tmp_path):
    from safetensors.torch import save_file
    import torch

    bad = tmp_path / "bad.safetensors"
    save_file({"visual.conv1.weight": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(CheckpointMismatchError, match="bad.safetensors"):
        from qshift.encoders import create_encoder

        create_encoder(f"world:mini-clip@{bad}")
    with pytest.raises(CheckpointMismatchError, match="does not match"):
        create_encoder(f"world:lit-minilm@{bad}")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(64))
    with pytest.raises(CheckpointMismatchError, match="junk.safetensors"):
        create_encoder(f"world:lit-minilm@{junk}")


def test_unknown_world_model():
    from qshift.encoders import create_encoder

    with pytest.raises(EncoderSpecError, match="unknown world model.*mini-clip"):
        create_encoder("world:maxi-clip")


def test_lit_text_tower_is_minilm(world, minilm):
    """An untrained LiT model: text tower = frozen MiniLM + linear head; its LayerNorms are adaptable."""
    from qshift.encoders.lit import LiTEncoder

    enc = LiTEncoder("qshift-lit-minilm")
    names = [n for n, _ in enc.text_tower.named_parameters()]
    assert any("LayerNorm" in n for n in names) and "text_proj.weight" in names
    emb = enc.model.text(enc.tokenize(["a red circle"]))["sentence_embedding"].detach().numpy()
    assert np.allclose(emb, minilm.encode_text(["a red circle"]), atol=1e-5)
    assert enc.encode_images([world / "images" / "dark" / "test" / "test-00000.png"]).shape == (1, 256)


@pytest.mark.parametrize("name,dim", [("mini-clip", 128), ("lit-minilm", 256)])
def test_shipped_world_models_load_and_retrieve(name, dim):
    """The checkpoints in the package load by name, and their cards hold what they claim."""

    from qshift.encoders import create_encoder
    from qshift.world.models import WORLD_ASSETS
    from qshift.world.render import render
    from qshift.world.scene import sample_scene, scene_rng

    card = json.loads((WORLD_ASSETS / f"{name}.json").read_text())
    assert card["model"] == name and card["command"].startswith(f"qshift world train WORLD --model {name}")
    assert card["checkpoint_mb"] <= 20 and 30 <= card["test"]["t2i"]["R@1"] <= 80
    enc = create_encoder(f"world:{name}")
    scenes = [sample_scene(0, "test", i, ("flat",)) for i in range(8)]
    images = [render(s, "flat", scene_rng(0, "test", i, 2), 64) for i, s in enumerate(scenes)]
    texts = [captions_for(s, 0, "test", i)[0] for i, s in enumerate(scenes)]
    img, txt = enc.encode_images(images), enc.encode_text(texts)
    assert img.shape == txt.shape == (8, dim)
    assert ((txt @ img.T).argmax(1) == np.arange(8)).mean() >= 0.5  # trained: well above chance (1/8)


def test_world_texts_come_from_the_scene_files_without_rendering(tmp_path, monkeypatch):
    from qshift.data.texts import spec_texts
    from qshift.world.generate import WorldConfig, generate_world

    monkeypatch.setenv("QSHIFT_CACHE", str(tmp_path))
    generate_world(tmp_path / "world", WorldConfig(n_train=30, n_val=0, n_test=10), splits=["test"])
    texts = spec_texts("world:train")
    assert len(texts) == 30 * 5 and all(isinstance(t, str) and t for t in texts)
    assert not (tmp_path / "world" / "images" / "flat" / "train").exists()  # nothing rendered for texts
    flat = spec_texts("world:train-flat")
    assert 0 < len(flat) < len(texts) and set(flat) <= set(texts)
    from qshift.benchmark import resolve_collection

    assert spec_texts("world:test") == [t for c in resolve_collection("world:test")[1].captions for t in c]
