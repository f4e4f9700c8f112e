from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qshift.encoders import Encoder, create_encoder
from qshift.errors import CheckpointMismatchError, EncoderSpecError, InputError

TEXTS = ["a red square", "a small blue circle next to a green square", "two cats", "x"]


def _images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.random((30 + 5 * i, 40, 3)) * 255).astype(np.uint8) for i in range(n)]


def test_openclip_protocol_and_normalisation(tiny_clip):
    assert isinstance(tiny_clip, Encoder)
    t = tiny_clip.encode_text(TEXTS)
    im = tiny_clip.encode_images(_images())
    assert t.shape == (4, tiny_clip.dim) and im.shape == (3, tiny_clip.dim)
    assert t.dtype == np.float32 and im.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(im, axis=1), 1, atol=1e-5)


def test_batching_does_not_change_results(tiny_clip):
    a = tiny_clip.encode_text(TEXTS, batch_size=1)
    b = tiny_clip.encode_text(TEXTS, batch_size=64)
    np.testing.assert_allclose(a, b, atol=1e-5)
    # results come back in input order although batches are sorted by length
    np.testing.assert_allclose(tiny_clip.encode_text(TEXTS[::-1]), a[::-1], atol=1e-5)


def test_towers_expose_only_their_parameters(tiny_clip):
    text_params = {id(p) for p in tiny_clip.text_tower.parameters()}
    visual_params = {id(p) for p in tiny_clip.model.visual.parameters()}
    assert text_params and not (text_params & visual_params)
    assert {id(p) for p in tiny_clip.image_tower.parameters()} == visual_params
    emb = tiny_clip.encode_text_torch(TEXTS[:2])
    assert emb.requires_grad
    emb.sum().backward()
    assert tiny_clip.model.ln_final.weight.grad is not None
    tiny_clip.model.zero_grad(set_to_none=True)


def test_checkpoint_roundtrip_and_fingerprint(tiny_clip, tmp_path):
    ckpt = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()}, str(ckpt))
    loaded = create_encoder(f"openclip:qshift-tiny-vit@{ckpt}", seed=123)  # seed must not matter
    np.testing.assert_allclose(loaded.encode_text(TEXTS), tiny_clip.encode_text(TEXTS), atol=1e-6)
    np.testing.assert_allclose(loaded.encode_images(_images()), tiny_clip.encode_images(_images()), atol=1e-6)
    assert loaded.fingerprint() != tiny_clip.fingerprint()  # spec differs (checkpoint path)
    other = create_encoder("openclip:qshift-tiny-vit", seed=1)
    assert other.fingerprint() != tiny_clip.fingerprint()  # different weights


def test_checkpoint_that_does_not_match_architecture(tiny_clip, tmp_path):
    sd = {k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()}
    sd["ln_final.weight"] = torch.ones(7)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(CheckpointMismatchError, match="bad.safetensors.*qshift-tiny-vit"):
        create_encoder(f"openclip:qshift-tiny-vit@{bad}")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="junk.pt"):
        create_encoder(f"openclip:qshift-tiny-vit@{junk}")


@pytest.mark.parametrize("spec, message", [
    ("openclip:ViT-B-3", "ViT-B-32"),                    # suggestion for a typo
    ("openclip:qshift-tiny-vit@/nope/ckpt.pt", "/nope/ckpt.pt"),
    ("clip:ViT-B-32", "unknown backend 'clip'"),
    ("ViT-B-32", "no backend prefix"),
    ("hf:/no/such/dir", "/no/such/dir"),
    ("onnx:/no/such/dir", "/no/such/dir"),
    ("st:no-such-model", "no-such-model"),
    ("st:", "nothing after"),
])
def test_bad_encoder_specs(spec, message):
    with pytest.raises(EncoderSpecError, match=message):
        create_encoder(spec)


def test_empty_caption_and_bad_images_are_named(tiny_clip, tmp_path):
    with pytest.raises(InputError, match="text #1: empty"):
        tiny_clip.encode_text(["ok", "   "])
    with pytest.raises(InputError, match="missing.png"):
        tiny_clip.encode_images([tmp_path / "missing.png"])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(InputError, match="corrupt.jpg"):
        tiny_clip.encode_images([corrupt])


def test_grayscale_rgba_and_tiny_images_are_accepted(tiny_clip):
    gray = np.full((5, 7), 128, np.uint8)
    rgba = np.zeros((20, 20, 4), np.uint8)
    assert tiny_clip.encode_images([gray, rgba]).shape == (2, tiny_clip.dim)


def _tiny_hf(tmp_path, kind="clip"):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer, SiglipConfig, SiglipModel

    from qshift.encoders.hf import write_clip_tokenizer_files

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=32, vocab_size=49408)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    d = tmp_path / kind
    model.save_pretrained(d)
    write_clip_tokenizer_files(tmp_path / "tok")
    tok = CLIPTokenizer(str(tmp_path / "tok" / "vocab.json"), str(tmp_path / "tok" / "merges.txt"),
                        model_max_length=32)
    tok.save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


def test_transformers_clip_backend(tmp_path):
    d = _tiny_hf(tmp_path)
    enc = create_encoder(f"hf:{d}")
    t, im = enc.encode_text(TEXTS), enc.encode_images(_images())
    assert t.shape == (4, 16) and im.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    # agrees with the model's own normalised embeddings
    from transformers import CLIPModel

    ref = CLIPModel.from_pretrained(d).eval()
    tok = enc.tokenize(TEXTS)
    with torch.no_grad():
        out = ref(**tok, pixel_values=enc.preprocess([__import__("PIL.Image").Image.fromarray(i) for i in _images()]))
    np.testing.assert_allclose(t, out.text_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(im, out.image_embeds.numpy(), atol=1e-5)


def test_transformers_siglip_backend(tmp_path):
    enc = create_encoder(f"hf:{_tiny_hf(tmp_path, 'siglip')}")
    assert enc.model_type == "siglip"
    assert enc.tokenize(["a"])["input_ids"].shape[1] == 32  # max-length padding
    assert enc.encode_text(TEXTS).shape == (4, enc.dim)
    assert enc.encode_images(_images()).shape == (3, enc.dim)


def test_clip_tokenizer_files_match_open_clip_tokenizer(tmp_path):
    import open_clip
    from transformers import CLIPTokenizer

    from qshift.encoders.hf import write_clip_tokenizer_files

    write_clip_tokenizer_files(tmp_path)
    hf = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    oc = open_clip.get_tokenizer("ViT-B-32")
    for text in ["a photo of a cat", "Two dogs, running on the beach!", "zebra crossing 42"]:
        ids = hf(text)["input_ids"]
        assert oc([text])[0][: len(ids)].tolist() == ids


def test_onnx_backend_agrees_with_open_clip(tiny_clip, tmp_path):
    from qshift.encoders.onnx import export_onnx

    export_onnx(tiny_clip, tmp_path / "onnx")
    enc = create_encoder(f"onnx:{tmp_path / 'onnx'}")
    assert enc.dim == tiny_clip.dim and enc.text_tower is None
    np.testing.assert_allclose(enc.encode_text(TEXTS), tiny_clip.encode_text(TEXTS), atol=1e-5)
    np.testing.assert_allclose(enc.encode_images(_images()), tiny_clip.encode_images(_images()), atol=1e-5)
    # an inference-only encoder serves zero-shot pipelines and refuses an adapt stage, saying why
    from qshift.errors import InputError
    from qshift.pipeline import Pipeline, PipelineContext

    ctx = PipelineContext(enc, "t2t", gallery=enc.encode_text(TEXTS))
    assert len(Pipeline.from_config(None, ctx).search(TEXTS[:1], k=2)[0].hits) == 2
    with pytest.raises(InputError, match="ONNX encoders are inference-only"):
        Pipeline.from_config([{"adapt": "tent"}], ctx)


def test_onnx_backend_agrees_with_transformers(tmp_path):
    from qshift.encoders.onnx import export_onnx

    hf = create_encoder(f"hf:{_tiny_hf(tmp_path)}")
    export_onnx(hf, tmp_path / "onnx")
    enc = create_encoder(f"onnx:{tmp_path / 'onnx'}")
    np.testing.assert_allclose(enc.encode_text(TEXTS), hf.encode_text(TEXTS), atol=1e-5)
    np.testing.assert_allclose(enc.encode_images(_images()), hf.encode_images(_images()), atol=1e-5)


def test_onnx_directory_with_missing_graph(tiny_clip, tmp_path):
    from qshift.encoders.onnx import export_onnx

    d = export_onnx(tiny_clip, tmp_path / "onnx")
    (d / "image.onnx").unlink()
    with pytest.raises(EncoderSpecError, match="image.onnx"):
        create_encoder(f"onnx:{d}")
    cfg = json.loads((d / "qshift_onnx.json").read_text())
    assert cfg["dim"] == tiny_clip.dim


def test_minilm_is_the_real_pretrained_model(minilm):
    e = minilm.encode_text(["a dog runs on the grass", "a puppy playing in a field", "stock market report"])
    assert e.shape == (3, 384)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2
    ref = minilm.model.encode(["a dog runs on the grass"], normalize_embeddings=True)
    np.testing.assert_allclose(e[:1], ref, atol=1e-5)
    with pytest.raises(InputError, match="no image tower"):
        minilm.encode_images(_images(1))
