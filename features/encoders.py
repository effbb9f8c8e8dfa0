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

import logging
from dataclasses import dataclass
from typing import Any

from features.encoder_config import PRESET_FIELDS, EncoderConfig
from features.loading import NoWeightsError, WeightsError, load_state_dict, weights_digest
from features.precision import autocast_dtype, resolve_precision

__all__ = ["Encoder", "EncoderConfig", "NoWeightsError", "WeightsError", "create_encoder", "load_state_dict",
           "weights_digest", "count_parameters", "build_backbone", "wrap_encoder", "to_model_input", "pick_device"]
log = logging.getLogger(__name__)

# Plain timm architectures under short names (demos, tests, students); the foundation models live in features.zoo.
GENERIC: dict[str, dict[str, Any]] = {
    "resnet18": {"model": "resnet18", "pool": "avg"},
    "vit_tiny": {"model": "vit_tiny_patch16_224", "pool": "cls"},
    "vit_small": {"model": "vit_small_patch16_224", "pool": "cls"},
    "vit_base": {"model": "vit_base_patch16_224", "pool": "cls"},
}
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
    resize: int | None = None  # resize to this side, then centre-crop input_size (None: resize to input_size)
    interpolation: str = "bilinear"
    zoo: Any = None  # the features.zoo.ZooModel it was built from, if any

    @property
    def digest(self) -> str:
        """sha256 of the model's weights (computed once): which model made a store's features."""
        if self._digest is None:
            self._digest = weights_digest(self.model)
        return self._digest

    def preprocess(self, tiles):
        """uint8 (B, H, W, 3) tensor → normalised float (B, 3, S, S) on the device."""
        return to_model_input(tiles, self.input_size, self.mean, self.std, self.device, resize=self.resize,
                              interpolation=self.interpolation)

    def __call__(self, tiles):
        """Features (B, dim) float32 for a uint8 (B, H, W, 3) batch of tiles. Non-finite features (an overflow at
        reduced precision) raise NonFiniteFeatures rather than reach a store."""
        import torch

        with torch.inference_mode():
            x = self.preprocess(tiles)
            if self.dtype is not None:
                with torch.autocast(device_type=self.device.type, dtype=self.dtype):
                    out = self.model(x)
            else:
                out = self.model(x)
            out = out.float()
            if not bool(torch.isfinite(out).all()):
                bad = int((~torch.isfinite(out)).any(dim=1).sum())
                hint = ("its weights hold non-finite values or overflow" if self.precision == "fp32" else
                        f"{self.precision} overflowed: run it at `precision: fp32` (or bf16)")
                raise NonFiniteFeatures(f"encoder {self.config.model!r} at {self.precision} gave non-finite features for "
                                        f"{bad} of {len(out)} tiles, nothing was stored: {hint}")
            return out


PREPROCESSING = ("input_size", "resize", "interpolation", "mean", "std")


def preprocessing(encoder: Encoder) -> dict[str, Any]:
    """How an encoder turns tiles into its input, as plain data (stores and bundles record it)."""
    return {"input_size": encoder.input_size, "resize": encoder.resize, "interpolation": encoder.interpolation,
            "mean": list(encoder.mean), "std": list(encoder.std)}


def preprocessing_mismatch(encoder: Encoder, recorded: dict[str, Any]) -> str | None:
    """What differs between ``encoder``'s preprocessing and a recorded one (keys it lacks are not compared:
    stores and bundles written before they were recorded), or None."""
    now = preprocessing(encoder)
    diffs = [f"{k} {recorded[k]} → {now[k]}" for k in PREPROCESSING
             if recorded.get(k) is not None and tuple_or(recorded[k]) != tuple_or(now[k])]
    return "; ".join(diffs) or None


def to_model_input(tiles, size: int, mean, std, device, *, resize: int | None = None, interpolation: str = "bilinear"):
    """uint8 (B, H, W, 3) tiles → float (B, 3, size, size) on ``device``: antialiased resize to ``resize`` (default
    ``size``) back to 8-bit values, centre crop to ``size``, normalised: torchvision's Resize → CenterCrop →
    ToTensor → Normalize on uint8 tiles, which the models' authors use. Square tiles, as the tiling delivers them."""
    import torch
    import torch.nn.functional as F

    x = tiles.permute(0, 3, 1, 2)
    side = resize or size
    if x.shape[-1] != side or x.shape[-2] != side:
        if x.dtype == torch.uint8 and x.device.type == "cpu" and torch.device(device).type == "cpu":
            # torchvision's own uint8 kernels: PIL-like and exact (a GPU resizes in float below: ±1-5 levels apart)
            x = F.interpolate(x, size=(side, side), mode=interpolation, antialias=True, align_corners=False)  # NHWC: fastest
        else:  # elsewhere in float, rounded back to 8-bit values
            x = F.interpolate(x.to(device).float(), size=(side, side), mode=interpolation, antialias=True,
                              align_corners=False).round_().clamp_(0.0, 255.0)
    x = x.to(device, non_blocking=True).float().div_(255.0)
    if side != size:
        top = int(round((side - size) / 2.0))
        x = x[..., top:top + size, top:top + size]
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def no_weights_message(cfg: EncoderConfig, field: str) -> str:
    return (f"{field}: {cfg.model!r} has no weights. Give `{field}.weights: /path/to/weights.safetensors` (or a "
            f"checkpoint torch.load(weights_only=True) reads), or `{field}.pretrained: true` for the hub weights "
            f"(network access or a filled cache), or opt into random weights with `{field}.pretrained: false` and "
            f"`{field}.seed: 0` (their features mean nothing clinically: demos and tests only)")


class NonFiniteFeatures(ValueError):
    """An encoder produced NaN or infinite features."""


def pick_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Spec:
    """What to build: a zoo model's values under the config's explicit ones, or a plain timm model."""

    model: str  # architecture
    kwargs: dict[str, Any]
    layout: str
    pool: str | None
    input_size: int | None
    resize: int | None
    interpolation: str | None
    mean: tuple | None
    std: tuple | None
    zoo: Any = None  # ZooModel
    truncate_resnet: bool = False


def resolve(cfg: EncoderConfig, field: str = "encoder") -> Spec:
    """The zoo model (or short name) a config names, with the config's explicit values on top. Overriding a zoo
    model's preprocessing, pooling or architecture is allowed but warned about: its features then differ from
    the authors'."""
    from features.zoo import zoo_model

    entry = zoo_model(cfg.model)
    if entry is None:
        base = GENERIC.get(cfg.model, {"model": cfg.model})
        check_crop(cfg.resize, cfg.input_size, field)
        return Spec(base["model"], dict(cfg.model_kwargs), "timm", cfg.pool or base.get("pool"), cfg.input_size,
                    cfg.resize, cfg.interpolation, cfg.mean, cfg.std)
    preset = {"pool": entry.pool, "input_size": entry.input_size, "resize": entry.resize,
              "interpolation": entry.interpolation, "mean": entry.mean, "std": entry.std}
    values = {k: getattr(cfg, k) if getattr(cfg, k) is not None else preset[k] for k in PRESET_FIELDS}
    changed = [f"{k} {preset[k]} → {values[k]}" for k in PRESET_FIELDS if tuple_or(values[k]) != tuple_or(preset[k])]
    changed += [f"model_kwargs.{k} {entry.kwargs.get(k)} → {v}" for k, v in cfg.model_kwargs.items()
                if entry.kwargs.get(k) != v]
    if changed:
        log.warning("%s: overrides %s's published setup (%s): its features will differ from its authors'", field,
                    entry.name, "; ".join(changed))
    kwargs = {**entry.kwargs, **cfg.model_kwargs}
    if values["input_size"] != preset["input_size"]:
        if cfg.resize is None:
            values["resize"] = values["input_size"] * entry.resize // entry.input_size  # keep the crop ratio
        if "img_size" in entry.kwargs and entry.arch not in ("conch_v1", "conch_v1_5", "ctranspath"):
            # the position table interpolated to the other size on each forward pass, unless the user says otherwise
            kwargs["dynamic_img_size"] = cfg.model_kwargs.get("dynamic_img_size", True)
    check_crop(values["resize"], values["input_size"], field)
    return Spec(entry.arch, kwargs, entry.layout, values["pool"], values["input_size"],
                values["resize"], values["interpolation"], values["mean"], values["std"], zoo=entry,
                truncate_resnet=entry.name == "resnet50_trunc")


def check_crop(resize: int | None, input_size: int | None, field: str) -> None:
    """A centre crop takes ``input_size`` out of a ``resize``-sided image: it cannot be the larger."""
    if resize is not None and input_size is not None and resize < input_size:
        raise ValueError(f"{field}: resize {resize} is smaller than input_size {input_size}: tiles are resized to "
                         "`resize`, then centre-cropped to `input_size`")


def tuple_or(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def build_backbone(cfg: EncoderConfig, *, default_seed: int | None = None, field: str = "encoder"):
    """The model a config names, with its weights (pretrained, local, or seeded random), and its data config.

    Random weights are drawn from ``cfg.seed`` (else ``default_seed``) in a private, portable stream
    (``features.portable_random``), so they depend on the seed alone: not on what the process did
    before, nor on the CPU's instruction set. With neither a seed nor weights, it refuses. Nothing touches
    the network unless ``pretrained: true``.
    """
    from features.loading import build_architecture, load_exact, load_state_dict, pretrained_file

    spec = resolve(cfg, field)
    if cfg.random_weights:
        seed = cfg.seed if cfg.seed is not None else default_seed
        if seed is None:
            raise NoWeightsError(no_weights_message(cfg, field))
        from features.portable_random import seeded

        with seeded(seed):
            model = build_architecture(spec, cfg.model)
    elif cfg.weights is None and cfg.pretrained and (spec.zoo is None or spec.zoo.timm_pretrained):
        model = build_architecture(spec, cfg.model, timm_pretrained=True)  # timm's own pretrained weights
    else:
        path = cfg.weights if cfg.weights is not None else pretrained_file(spec.zoo)  # before a ViT-H is built for nothing
        model = build_architecture(spec, cfg.model)
        if spec.zoo is None and (cfg.mean is None or cfg.std is None):
            log.warning("%s: %s is not a zoo model: its normalisation is timm's default for the architecture, not "
                        "necessarily the one its weights were trained with; give `mean` and `std`, or use the zoo's "
                        "name if these are a foundation model's weights (`wsi-pipeline encoders`)", field, cfg.model)
        load_exact(model, load_state_dict(path), spec, path, cfg.model)
    return model, data_config(spec, model), spec


def data_config(spec: Spec, model) -> dict:
    """Input size, resize, interpolation, mean and std: the spec's, else (plain timm models) timm's for the model."""
    import timm

    timm_cfg = timm.data.resolve_data_config({}, model=model) if spec.zoo is None else {}
    size = spec.input_size or int(timm_cfg["input_size"][-1])
    return {"input_size": (3, size, size), "resize": spec.resize or size, "interpolation": spec.interpolation or "bilinear",
            "mean": tuple(spec.mean or timm_cfg["mean"]), "std": tuple(spec.std or timm_cfg["std"])}


def wrap_encoder(model, cfg: EncoderConfig, data_cfg: dict, device=None, zoo=None) -> Encoder:
    """Freeze ``model`` (returning one vector per image), measure its dimension, attach preprocessing."""
    import torch

    device = device or pick_device(cfg.device)
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    input_size = cfg.input_size or int(data_cfg["input_size"][-1])
    with torch.inference_mode():
        dim = int(model(torch.zeros(1, 3, input_size, input_size, device=device)).shape[-1])
    precision = model_precision(cfg, device, zoo)
    mean = tuple(cfg.mean or data_cfg["mean"])
    std = tuple(cfg.std or data_cfg["std"])
    data_size = int(data_cfg["input_size"][-1])
    resize = cfg.resize or (data_cfg.get("resize") or data_size) * input_size // data_size  # the data config's crop ratio
    interpolation = cfg.interpolation or data_cfg.get("interpolation") or "bilinear"
    return Encoder(model, dim, input_size, mean, std, device, autocast_dtype(precision), cfg, precision,
                   resize=resize, interpolation=interpolation, zoo=zoo)


def model_precision(cfg: EncoderConfig, device, zoo=None) -> str:
    """``precision`` resolved for the device, except that a zoo model known to overflow in fp16 never runs there:
    bf16 where the device has it, else fp32."""
    precision = resolve_precision(cfg.precision, device)
    if precision == "fp16" and zoo is not None and not zoo.fp16_safe:
        import torch

        safe = "bf16" if (device.type == "cuda" and torch.cuda.is_bf16_supported()) else "fp32"
        log.warning("%s overflows in fp16 (its authors run it in %s): running it at %s instead", zoo.name, zoo.precision,
                    safe)
        return safe
    return precision


def create_encoder(cfg: EncoderConfig, *, default_seed: int | None = None, field: str = "encoder") -> Encoder:
    """Build the encoder a config describes, in eval mode on its device."""
    from features.loading import headless

    model, data_cfg, spec = build_backbone(cfg, default_seed=default_seed, field=field)
    return wrap_encoder(headless(model, spec), cfg, data_cfg, zoo=spec.zoo)


def meta_model(cfg: EncoderConfig):
    """The encoder a config describes, built on the meta device (no weights, no memory, no network for a zoo
    model or a plain timm name), with its resolved spec."""
    import torch

    from features.loading import build_architecture, headless

    spec = resolve(cfg)
    with torch.device("meta"):
        return headless(build_architecture(spec, cfg.model), spec), spec


def count_parameters(cfg: EncoderConfig) -> int:
    """Parameters of the encoder a config describes, counted on the meta device."""
    return int(sum(p.numel() for p in meta_model(cfg)[0].parameters()))
