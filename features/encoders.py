"""Patch encoders behind one entry point, ``create_encoder(cfg)`` (like timm's ``create_model``).

An encoder spec names a timm model (``vit_base_patch16_224``, ``hf-hub:MahmoodLab/UNI`` with
``pretrained: true`` for users with hub access), a preset (``uni``, ``resnet50_trunc``, ...), and
optionally a local weights file (safetensors, or a ``torch.load(weights_only=True)`` checkpoint;
plain pickles are refused). It returns the model in eval mode, its preprocessing and its output
dimension. Nothing is downloaded unless ``pretrained: true``.

An encoder with neither pretrained nor local weights is a deliberate choice (demos, tests, a
student before distillation): its random weights come from an explicit ``seed``, drawn in a
private RNG stream, so every worker process and every run builds the same model. Its label says
``random`` and its weights' sha256 is recorded beside the features it makes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from features.precision import autocast_dtype, resolve_precision

# Presets: name → timm model + kwargs + pooling. Hub presets need `pretrained: true` and access.
PRESETS: dict[str, dict[str, Any]] = {
    "resnet50_trunc": {"model": "resnet50", "truncate_resnet": True, "pool": "avg"},  # CLAM's 1024-d encoder
    "resnet18": {"model": "resnet18", "pool": "avg"},
    "vit_tiny": {"model": "vit_tiny_patch16_224", "pool": "cls"},
    "vit_small": {"model": "vit_small_patch16_224", "pool": "cls"},
    "vit_base": {"model": "vit_base_patch16_224", "pool": "cls"},
    "uni": {"model": "hf-hub:MahmoodLab/uni", "pool": "cls", "model_kwargs": {"init_values": 1e-5, "dynamic_img_size": True}},
    "hoptimus0": {"model": "hf-hub:bioptimus/H-optimus-0", "pool": "cls",
                  "model_kwargs": {"init_values": 1e-5, "dynamic_img_size": False}},
    "gigapath": {"model": "hf-hub:prov-gigapath/prov-gigapath", "pool": "cls"},
}


class EncoderConfig(BaseModel):
    """One patch encoder: model, weights, pooling, input size, precision and device."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("vit_tiny", description="a preset (resnet50_trunc, resnet18, vit_tiny, vit_small, vit_base, uni, "
                                                "hoptimus0, gigapath) or any timm model name, incl. hf-hub:ORG/NAME")
    pretrained: bool = Field(False, description="load the model's pretrained weights from timm / the Hugging Face hub "
                                                "(needs network access or a filled cache)")
    weights: Path | None = Field(None, description="local weights: .safetensors, or a PyTorch checkpoint loadable with "
                                                   "weights_only=True (plain pickles are refused)")
    pool: Literal["cls", "mean", "avg"] | None = Field(
        None, description="ViT: cls token or mean of patch tokens; CNN: avg (global average pool); null: the preset's or the model's own")
    input_size: int | None = Field(None, ge=16, description="tiles are resized to this before the model (null: the model's default)")
    mean: tuple[float, float, float] | None = Field(None, description="normalisation mean (null: the model's)")
    std: tuple[float, float, float] | None = Field(None, description="normalisation std (null: the model's)")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for timm.create_model")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="inference precision (autocast). auto: on CUDA bf16 where supported, else fp16; on a CPU bf16 "
                            "only with native bf16 (AMX / AVX512-BF16), else fp32 (bf16 is ~5x slower there)")
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    seed: int | None = Field(None, description="with no pretrained or local weights: the seed of the random weights; "
                                               "setting it opts into random weights, whose features mean nothing "
                                               "clinically (demos, tests). A teacher without weights and without a "
                                               "seed stops the run; a student without one starts from distill.seed")

    @property
    def random_weights(self) -> bool:
        """Neither hub weights nor a local file: the weights are a seeded random initialisation."""
        return not self.pretrained and self.weights is None

    @property
    def label(self) -> str:
        """A folder-safe name for this encoder's feature stores; random weights say so, with their seed."""
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model.removeprefix("hf-hub:")).strip("_")
        return f"{name}-random-seed{self.seed}" if self.random_weights and self.seed is not None else name

    def weights_source(self, default_seed: int | None = None) -> str:
        """Where the weights come from, in words (model cards, reports, store attributes)."""
        if self.weights is not None:
            return f"local file {self.weights}"
        if self.pretrained:
            return f"pretrained ({self.model}, timm / Hugging Face hub)"
        seed = self.seed if self.seed is not None else default_seed
        return f"random (seed {seed})"


@dataclass
class Encoder:
    """A ready-to-run encoder: ``model(batch) -> (B, dim)`` on normalised float tensors."""

    model: Any  # torch.nn.Module
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: Any  # torch.device
    dtype: Any  # autocast dtype or None
    config: EncoderConfig
    precision: str = "fp32"  # resolved for the device: fp32, bf16 or fp16
    _digest: str | None = None
    # read its tiles at its input resolution (wsi.tiling.plan_for_input) rather than as the tiling delivers them:
    # a distilled student, trained on tiles read that way (distill.read_at_input)
    read_at_input: bool = False

    @property
    def digest(self) -> str:
        """sha256 of the model's weights (computed once): which model made a store's features."""
        if self._digest is None:
            self._digest = weights_digest(self.model)
        return self._digest

    def preprocess(self, tiles):
        """uint8 (B, H, W, 3) tensor → normalised float (B, 3, S, S) on the device."""
        return to_model_input(tiles, self.input_size, self.mean, self.std, self.device)

    def __call__(self, tiles):
        """Features (B, dim) float32 for a uint8 (B, H, W, 3) batch of tiles."""
        import torch

        with torch.inference_mode():
            x = self.preprocess(tiles)
            if self.dtype is not None:
                with torch.autocast(device_type=self.device.type, dtype=self.dtype):
                    out = self.model(x)
            else:
                out = self.model(x)
            return out.float()


def to_model_input(tiles, size: int, mean, std, device):
    """uint8 (B, H, W, 3) tiles → float (B, 3, size, size), antialiased resize, normalised, on ``device``."""
    import torch
    import torch.nn.functional as F

    x = tiles.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


class WeightsError(ValueError):
    """A weights file that cannot be loaded safely or does not fit the model."""


class NoWeightsError(ValueError):
    """An encoder with no pretrained or local weights and no seed for random ones."""


def no_weights_message(cfg: EncoderConfig, field: str) -> str:
    return (f"{field}: {cfg.model!r} has no weights. Give `{field}.weights: /path/to/weights.safetensors` (or a "
            f"checkpoint torch.load(weights_only=True) reads), or `{field}.pretrained: true` for the hub weights "
            f"(network access or a filled cache), or opt into random weights with `{field}.pretrained: false` and "
            f"`{field}.seed: 0` (their features mean nothing clinically: demos and tests only)")


def weights_digest(model) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes), independent of its device."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def load_state_dict(path: Path) -> dict:
    """Tensors from a .safetensors file or a weights-only PyTorch checkpoint. Never unpickles code."""
    import torch

    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: refused: not loadable with torch.load(weights_only=True) ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0]}). Plain pickles can run code; convert the checkpoint to "
                           "safetensors or save only tensors (model.state_dict()).") from None
    for key in ("state_dict", "model", "teacher", "student"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return {re.sub(r"^(module\.|backbone\.|encoder\.)", "", k): v for k, v in state.items()}


class _TruncatedResNet:
    """CLAM's ResNet-50 truncated after stage 3 (layer3), average-pooled: 1024-d."""

    @staticmethod
    def build(model):
        import torch.nn as nn

        return nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool, model.layer1, model.layer2, model.layer3,
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _pooled(model, pool: str | None):
    """Make ``model(x)`` return one vector per image with the requested pooling."""
    if pool is None:
        return model
    if hasattr(model, "global_pool") and hasattr(model, "forward_features") and hasattr(model, "cls_token"):
        model.global_pool = {"cls": "token", "mean": "avg"}.get(pool, "avg")  # timm ViT / DeiT
        return model
    if pool in ("cls", "mean") and not hasattr(model, "cls_token"):
        raise ValueError(f"pool={pool!r} needs a ViT-style model with a cls token; use 'avg' for CNNs")
    return model  # CNNs built with num_classes=0 already average-pool


def resolve(cfg: EncoderConfig) -> dict[str, Any]:
    """The preset (if any) merged under the explicit config values."""
    preset = dict(PRESETS.get(cfg.model, {"model": cfg.model}))
    if cfg.pool is not None:
        preset["pool"] = cfg.pool
    preset["model_kwargs"] = {**preset.get("model_kwargs", {}), **cfg.model_kwargs}
    return preset


def pick_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _timm_model(cfg: EncoderConfig, spec: dict, pretrained: bool):
    import timm

    try:
        return timm.create_model(spec["model"], pretrained=pretrained, num_classes=0, **spec["model_kwargs"])
    except RuntimeError as exc:
        raise ValueError(f"encoder {cfg.model!r}: timm cannot build {spec['model']!r}: {exc}") from None


def build_backbone(cfg: EncoderConfig, *, default_seed: int | None = None, field: str = "encoder"):
    """The timm model a config names, with its weights (pretrained, local, or seeded random), and timm's data config.

    Random weights are drawn from ``cfg.seed`` (else ``default_seed``) in a private, portable stream
    (``features.portable_random``), so they depend on the seed alone: not on what the process did
    before, nor on the CPU's instruction set. With neither a seed nor weights, it refuses.
    """
    import timm

    spec = resolve(cfg)
    if cfg.random_weights:
        seed = cfg.seed if cfg.seed is not None else default_seed
        if seed is None:
            raise NoWeightsError(no_weights_message(cfg, field))
        from features.portable_random import seeded

        with seeded(seed):
            model = _timm_model(cfg, spec, pretrained=False)
    else:
        model = _timm_model(cfg, spec, pretrained=cfg.pretrained)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    if cfg.weights is not None:  # into the full timm model, so checkpoints of the whole network fit
        state = load_state_dict(cfg.weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.startswith(("head.", "fc.", "classifier."))]
        if missing or unexpected:
            raise WeightsError(f"{cfg.weights}: does not fit {cfg.model}: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                               f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}")
    return model, data_cfg, spec


def wrap_encoder(model, cfg: EncoderConfig, data_cfg: dict, device=None) -> Encoder:
    """Freeze ``model`` (returning one vector per image), measure its dimension, attach preprocessing."""
    import torch

    device = device or pick_device(cfg.device)
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    input_size = cfg.input_size or int(data_cfg["input_size"][-1])
    with torch.inference_mode():
        dim = int(model(torch.zeros(1, 3, input_size, input_size, device=device)).shape[-1])
    precision = resolve_precision(cfg.precision, device)
    mean = tuple(cfg.mean or data_cfg["mean"])
    std = tuple(cfg.std or data_cfg["std"])
    return Encoder(model, dim, input_size, mean, std, device, autocast_dtype(precision), cfg, precision)


def _headless(model, spec: dict):
    """The backbone as a one-vector-per-image model: CLAM's truncated ResNet, or the requested pooling."""
    if spec.get("truncate_resnet"):
        return _TruncatedResNet.build(model)
    return _pooled(model, spec.get("pool"))


def create_encoder(cfg: EncoderConfig, *, default_seed: int | None = None, field: str = "encoder") -> Encoder:
    """Build the encoder a config describes, in eval mode on its device."""
    model, data_cfg, spec = build_backbone(cfg, default_seed=default_seed, field=field)
    return wrap_encoder(_headless(model, spec), cfg, data_cfg)


def count_parameters(cfg: EncoderConfig) -> int:
    """Parameters of the encoder a config describes, built on the meta device: no weights, no memory, no init."""
    import torch

    spec = resolve(cfg)
    with torch.device("meta"):
        model = _headless(_timm_model(cfg, spec, pretrained=False), spec)
    return int(sum(p.numel() for p in model.parameters()))
