"""Contrastive training of the world's dual encoders (``qshift world train``).

Two models:

* ``mini-clip`` — the open_clip architecture ``qshift-mini-clip`` (a small ModifiedResNet
  image tower, CLIP-BPE text transformer) trained from scratch with the symmetric InfoNCE loss
  (open_clip's ``ClipLoss``, learnable temperature clamped at 100).
* ``lit-minilm`` — a LiT-style model: the pretrained MiniLM is frozen; the ResNet image
  tower and a linear text head are trained. MiniLM's sentence embeddings of the
  training captions are computed once through the embedding store.

Each epoch visits every training image once with one of its captions drawn at random.
AdamW, linear warm-up then cosine decay, bf16 autocast on CPUs that have it. After each
epoch the full state (weights, optimiser, scheduler position, RNG) goes to
``state.pt`` and a line to ``log.jsonl``; a re-run resumes from there. The shipped
checkpoint (``model.safetensors``) holds the trained tensors in float16.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from qshift.errors import InputError
from qshift.io import atomic_path, read_json, write_json, write_text
from qshift.metrics import Qrels, first_positive_rank, retrieval_metrics
from qshift.progress import progress_bar
from qshift.world.generate import open_world

MODELS = {"mini-clip": "qshift-mini-clip", "lit-minilm": "qshift-lit-minilm"}
MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)  # open_clip's OpenAI stats
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)


@dataclass(frozen=True)
class TrainConfig:
    model: str = "mini-clip"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 200
    seed: int = 0
    bf16: bool = True
    styles: tuple[str, ...] | None = None  # None: the mixed train split (every training style)
    max_images: int | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise InputError(f"train: unknown model {self.model!r}; known: {', '.join(MODELS)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"train: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise InputError(f"train: lr must be in (0, 1), got {self.lr}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["styles"] = list(self.styles) if self.styles else None
        return d

    @staticmethod
    def from_dict(d: dict) -> "TrainConfig":
        known = {f.name for f in fields(TrainConfig)}
        if set(d) - known:
            raise InputError(f"train config: unknown keys {sorted(set(d) - known)}; known: {sorted(known)}")
        d = dict(d)
        if d.get("styles"):
            d["styles"] = tuple(d["styles"])
        return TrainConfig(**d)


def load_pixels(paths: list[Path], progress: bool = False) -> torch.Tensor:
    """Images as one uint8 tensor N×3×H×W (all the same size)."""
    first = np.asarray(Image.open(paths[0]).convert("RGB"))
    out = torch.empty((len(paths), 3, *first.shape[:2]), dtype=torch.uint8)
    with progress_bar("load images", len(paths), progress) as bar:
        for i, p in enumerate(paths):
            arr = np.array(Image.open(p).convert("RGB"))
            if arr.shape != first.shape:
                raise InputError(f"{p}: size {arr.shape[:2]} differs from {first.shape[:2]}")
            out[i] = torch.from_numpy(arr).permute(2, 0, 1)
            bar.advance(1)
    return out


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.float() / 255.0 - MEAN.to(pixels.device)) / STD.to(pixels.device)


class _Model:
    """What the loop needs from either model: image/text features and the parameters."""

    def __init__(self, cfg: TrainConfig, store_root: Path | None, device: str = "cpu") -> None:
        import open_clip

        import qshift.encoders.openclip  # noqa: F401 - registers qshift's model configs

        self.kind = cfg.model
        torch.manual_seed(cfg.seed)
        if cfg.model == "mini-clip":
            self.net = open_clip.create_model(MODELS[cfg.model])
            self.tokenizer = open_clip.get_tokenizer(MODELS[cfg.model])
            self.text_encoder = None
        else:
            from qshift.encoders.lit import LiTModel, load_lit_config
            from qshift.encoders.st import SentenceTransformerEncoder

            lit_cfg = load_lit_config(MODELS[cfg.model])
            self.text_encoder = SentenceTransformerEncoder(lit_cfg["text_st"]["model"])
            self.net = LiTModel(lit_cfg, self.text_encoder.model)
        self.store_root = store_root
        self.device = torch.device(device)
        self.net.to(self.device)

    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def text_inputs(self, captions: list[str], name: str, progress: bool) -> torch.Tensor:
        """Token ids (mini-clip) or frozen MiniLM sentence embeddings (LiT), one row per caption."""
        if self.text_encoder is None:
            return self.tokenizer(captions)
        from qshift.data.collection import Collection
        from qshift.paths import cache_dir
        from qshift.store import EmbeddingStore

        coll = Collection(name, [f"c{i}" for i in range(len(captions))], [[c] for c in captions])
        store = EmbeddingStore(self.store_root or cache_dir() / "store")
        return torch.from_numpy(store.encode(self.text_encoder, coll, "text", progress=progress).vectors)

    def encode_text(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.to(self.device, non_blocking=True)
        if self.text_encoder is None:
            return self.net.encode_text(inputs)
        return self.net.project_text(inputs)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.encode_image(normalize(pixels.to(self.device, non_blocking=True)))

    def trained_state(self) -> dict[str, torch.Tensor]:
        sd = self.net.trained_state_dict() if hasattr(self.net, "trained_state_dict") else self.net.state_dict()
        return {k: v.detach().cpu() for k, v in sd.items()}


def _split_data(world_dir: Path, split: str, cfg: TrainConfig, limit: int | None,
                progress: bool) -> tuple[torch.Tensor, list[list[str]]]:
    world = open_world(world_dir)
    styles = cfg.styles if split == "train" else None
    scenes = world.scenes(split)
    if split == "train" and styles:
        unknown = set(styles) - set(world.config.styles)
        if unknown:
            raise InputError(f"train: styles {sorted(unknown)} are not training styles of {world_dir} "
                             f"({', '.join(world.config.styles)})")
        scenes = [d for d in scenes if d["style"] in styles]
    if limit:
        scenes = scenes[:limit]
    if not scenes:
        raise InputError(f"{world_dir}: no {split} scenes to train on")
    paths = [world.image_path(d["style"], d["id"]) for d in scenes]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"{world_dir}: {len(missing)} {split} images missing (e.g. {missing[0]}); "
                         f"run `qshift world generate {world_dir} --splits {split}`")
    return load_pixels(paths, progress), [d["captions"] for d in scenes]


@torch.inference_mode()
def evaluate_pair(model: _Model, pixels: torch.Tensor, text_in: torch.Tensor,
                  caption_item: np.ndarray, batch: int = 512) -> dict[str, float]:
    """Clean T2I and I2T R@1/5/10 of the model on one split (float32)."""
    model.net.eval()
    img = torch.cat([model.encode_image(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])
    txt = torch.cat([model.encode_text(text_in[i:i + batch]) for i in range(0, len(text_in), batch)])
    img = torch.nn.functional.normalize(img.float(), dim=-1).cpu().numpy()
    txt = torch.nn.functional.normalize(txt.float(), dim=-1).cpu().numpy()
    s = txt @ img.T
    k = min(10, len(img))
    item_caps = [np.flatnonzero(caption_item == i) for i in range(len(img))]
    out = {}
    for name, scores, qrels in (("t2i", s, Qrels.from_labels(caption_item)), ("i2t", s.T, Qrels.from_lists(item_caps))):
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        out[name] = retrieval_metrics(top, qrels, ks=(1, 5, 10), k_map=k, full_ranks=first_positive_rank(scores, qrels))
    m_t2i, m_i2t = out["t2i"], out["i2t"]
    return {**{f"t2i_{m}": m_t2i[m] for m in ("R@1", "R@5", "R@10")},
            **{f"i2t_{m}": m_i2t[m] for m in ("R@1", "R@5", "R@10")}}


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def train(world_dir: str | Path, out_dir: str | Path, cfg: TrainConfig = TrainConfig(), *,
          progress: bool = True, store_root: Path | None = None,
          on_epoch: Callable[[dict], None] | None = None, device: str = "cpu") -> dict:
    """Train (or resume training) a world model; returns the final log record.

    ``device`` ("cpu", "cuda", "auto") only changes where the arithmetic runs; it is not
    part of the run's config, so a run may be resumed on another device.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / "train_config.json"
    if cfg_path.is_file():
        old = read_json(cfg_path)
        if old["train"] != cfg.to_dict() or old["world"] != str(world_dir.resolve()):
            raise InputError(f"{out_dir}: holds a run with another config ({old['train']}); "
                             "use another output folder")
    write_json(cfg_path, {"train": cfg.to_dict(), "world": str(world_dir.resolve())})
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    model = _Model(cfg, store_root, device)
    pixels, captions = _split_data(world_dir, "train", cfg, cfg.max_images, progress)
    flat = [c for caps in captions for c in caps]
    offsets = np.cumsum([0] + [len(c) for c in captions])
    text_in = model.text_inputs(flat, f"world-train-captions-{len(flat)}", progress)
    val_pixels, val_caps = _split_data(world_dir, "val", cfg, None, progress)
    val_flat = [c for caps in val_caps for c in caps]
    val_text = model.text_inputs(val_flat, f"world-val-captions-{len(val_flat)}", progress)
    val_item = np.repeat(np.arange(len(val_caps)), [len(c) for c in val_caps])

    params = model.params()
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    from open_clip.loss import ClipLoss

    loss_fn = ClipLoss()
    steps_per_epoch = math.ceil(len(pixels) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    start_epoch, log = 0, []
    state_path = out_dir / "state.pt"
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False, map_location=model.device)
        model.net.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["optimizer"])
        start_epoch, log = state["epoch"], state["log"]
        torch.set_rng_state(state["torch_rng"].cpu())
    amp = cfg.bf16 and (model.device.type == "cuda" or _has_bf16())

    for epoch in range(start_epoch, cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch])  # per epoch: a resumed run draws the same batches
        model.net.train()
        t0 = time.perf_counter()
        order = rng.permutation(len(pixels))
        pick = offsets[order] + rng.integers(0, np.diff(offsets)[order])
        losses = []
        with progress_bar(f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch, progress) as bar:
            for b in range(steps_per_epoch):
                step = epoch * steps_per_epoch + b
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, total, cfg)
                idx = torch.from_numpy(order[b * cfg.batch_size:(b + 1) * cfg.batch_size])
                cap = torch.from_numpy(pick[b * cfg.batch_size:(b + 1) * cfg.batch_size])
                with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=amp):
                    fi = model.encode_image(pixels[idx])
                    ft = model.encode_text(text_in[cap])
                fi = torch.nn.functional.normalize(fi.float(), dim=-1)
                ft = torch.nn.functional.normalize(ft.float(), dim=-1)
                loss = loss_fn(fi, ft, model.net.logit_scale.exp())
                if not torch.isfinite(loss):
                    raise RuntimeError(f"train: loss became {loss.item()} at epoch {epoch + 1} step {b}; "
                                       f"lower lr (now {cfg.lr}) or disable bf16")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    model.net.logit_scale.clamp_(0, math.log(100))
                losses.append(loss.item())
                bar.advance(1)
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": time.perf_counter() - t0,
                  "lr_end": _lr_at((epoch + 1) * steps_per_epoch - 1, total, cfg),
                  "temperature": float(1 / model.net.logit_scale.detach().exp()),
                  **{f"val_{k}": v for k, v in evaluate_pair(model, val_pixels, val_text, val_item).items()}}
        log.append(record)
        with atomic_path(state_path) as tmp:
            torch.save({"model": model.net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                        "log": log, "torch_rng": torch.get_rng_state()}, tmp)
        write_text(out_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
        if on_epoch:
            on_epoch(record)
    save_checkpoint(model.trained_state(), out_dir / "model.safetensors",
                    {"model": cfg.model, "config": MODELS[cfg.model]})
    summary = {"model": cfg.model, "epochs": cfg.epochs, "images": len(pixels),
               "train_seconds": float(sum(r["seconds"] for r in log)), "final": log[-1], "log": log}
    write_json(out_dir / "summary.json", summary)
    return summary


def save_checkpoint(state: dict[str, torch.Tensor], path: Path, meta: dict) -> None:
    """Trained tensors as float16 safetensors (written atomically)."""
    from safetensors.torch import save_file

    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(half, str(tmp), metadata={k: str(v) for k, v in meta.items()})


def _has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags or os.uname().machine == "arm64"
    except OSError:
        return False
