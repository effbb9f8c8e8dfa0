"""Weights in, exactly: reading checkpoint files safely, building a zoo model's architecture, converting its
official key layout and loading it strictly, so a wrong or partial checkpoint is refused with its keys named."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any

HF_FALLBACK_FILES = ("model.safetensors", "pytorch_model.bin")
WRAPPER_KEYS = ("state_dict", "model", "teacher", "student")


class WeightsError(ValueError):
    """A weights file that cannot be loaded safely or does not fit the model."""


class NoWeightsError(ValueError):
    """An encoder with no pretrained or local weights and no seed for random ones."""


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
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return {re.sub(r"^module\.", "", k): v for k, v in state.items()}


def timm_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The zoo's plain-data constructor arguments as timm takes them (classes by name, LayerNorm epsilon)."""
    import torch.nn as nn
    from timm.layers import SwiGLUPacked

    out = dict(kwargs)
    layers = {"swiglu_packed": SwiGLUPacked, "silu": nn.SiLU, "gelu": nn.GELU}
    for key in ("mlp_layer", "act_layer"):
        if isinstance(out.get(key), str):
            out[key] = layers[out[key]]
    if "norm_eps" in out:
        out["norm_layer"] = partial(nn.LayerNorm, eps=out.pop("norm_eps"))
    return out


def build_architecture(spec, name: str, *, timm_pretrained: bool = False):
    """The bare architecture a ``features.encoders.Spec`` names (random weights, or timm's own pretrained ones)."""
    import timm

    from features.arch import build_conch, build_ctranspath

    kwargs = timm_kwargs(spec.kwargs)
    try:
        if spec.model in ("conch_v1", "conch_v1_5"):
            size = spec.input_size or kwargs.pop("img_size")
            kwargs.pop("img_size", None)
            return build_conch("v1" if spec.model == "conch_v1" else "v1_5", img_size=size, **kwargs)
        if spec.model == "ctranspath":
            return build_ctranspath(**kwargs)
        arch = spec.zoo.timm_pretrained if (timm_pretrained and spec.zoo is not None) else spec.model
        return timm.create_model(arch, pretrained=timm_pretrained, num_classes=0, **kwargs)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"encoder {name!r}: cannot build {spec.model!r} with {spec.kwargs}: {exc}") from None


def pretrained_file(entry) -> Path:
    """A zoo model's official weights file from the Hugging Face hub (huggingface_hub's cache first)."""
    if entry is None or not entry.hub:
        where = entry.weights_from if entry is not None else "its authors"
        raise WeightsError(f"{entry.name if entry else 'this model'}: no hub copy of its weights is known: download "
                           f"{entry.weights_file if entry else 'them'} from {where} and give `weights: /path/to/it`")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    errors, offline = [], False
    for filename in dict.fromkeys((entry.weights_file, *HF_FALLBACK_FILES)):
        try:
            return Path(hf_hub_download(entry.hub, filename))
        except EntryNotFoundError as exc:  # LocalEntryNotFoundError: offline and not in the cache under this name
            errors.append(f"{filename}: {type(exc).__name__}")
            offline = isinstance(exc, LocalEntryNotFoundError)
        except Exception as exc:  # gated, no token, network errors: say what to do instead
            raise WeightsError(f"{entry.name}: `pretrained: true` could not fetch {entry.hub}/{filename} "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Without hub access, download "
                               f"{entry.weights_file} from {entry.weights_from} and give `weights: /path/to/it`") from None
    if offline:
        raise WeightsError(f"{entry.name}: `pretrained: true` could not fetch {entry.hub} ({', '.join(errors)}): no hub "
                           f"access and not in the Hugging Face cache. Without hub access, download "
                           f"{entry.weights_file} from {entry.weights_from} and give `weights: /path/to/it`")
    raise WeightsError(f"{entry.name}: {entry.hub} has none of {', '.join(errors)}")


def load_exact(model, state: dict, spec, path: Path, name: str) -> None:
    """Load ``state`` (the official layout of ``spec``'s model) into ``model`` strictly: every parameter and
    buffer present, nothing left over, every shape right; else WeightsError naming the keys and the preset."""
    from features.layouts import convert

    try:
        converted = convert(spec.layout, state, model)
    except KeyError as exc:
        raise WeightsError(f"{path}: does not fit {name!r}: {exc.args[0]}") from None
    expected = model.state_dict()
    optional = ("num_batches_tracked", "layer4.") if spec.truncate_resnet else ("num_batches_tracked",)
    missing = [k for k in expected if k not in converted and not any(o in k for o in optional)]
    unexpected = [k for k in converted if k not in expected]
    shapes = [f"{k} {tuple(converted[k].shape)} (model: {tuple(expected[k].shape)})" for k in expected
              if k in converted and tuple(converted[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        show = lambda keys: f"{len(keys)} {keys[:6]}{' …' if len(keys) > 6 else ''}"  # noqa: E731
        raise WeightsError(f"{path}: does not fit {name!r} ({spec.layout} layout, {spec.model}): missing {show(missing)}, "
                           f"unexpected {show(unexpected)}, mis-shaped {show(shapes)}")
    model.load_state_dict(converted, strict=False)


def cls_mean(model):
    """CLS ‖ mean of the patch tokens (prefix tokens, registers included, skipped): Virchow's embedding."""
    import torch
    import torch.nn as nn

    class ClsMean(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner
            self.prefix = int(getattr(inner, "num_prefix_tokens", 1))

        def forward(self, x):
            tokens = self.model.forward_features(x)
            return torch.cat([tokens[:, 0], tokens[:, self.prefix:].mean(dim=1)], dim=-1)

    return ClsMean(model)


def truncated_resnet(model):
    """CLAM's ResNet-50 truncated after stage 3 (layer3), average-pooled: 1024-d."""
    import torch.nn as nn

    return nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool, model.layer1, model.layer2, model.layer3,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def headless(model, spec):
    """The backbone as a one-vector-per-image model with the spec's pooling."""
    pool = spec.pool
    if spec.truncate_resnet:
        return truncated_resnet(model)
    if spec.model in ("conch_v1", "conch_v1_5"):
        if pool not in (None, "attn"):
            raise ValueError(f"CONCH's embedding is its attention pooler's (pool: attn), not {pool!r}")
        return model
    if pool == "attn":
        raise ValueError("pool: attn is CONCH's attention pooler; this model has none")
    is_vit = hasattr(model, "cls_token") and hasattr(model, "forward_features")
    if pool == "avg" and is_vit:
        pool = "mean"  # a ViT's average is the mean of its patch tokens
    if pool == "cls_mean":
        if not is_vit:
            raise ValueError("pool='cls_mean' needs a ViT-style model with a cls token")
        return cls_mean(model)
    if pool in ("cls", "mean"):
        if not is_vit:
            raise ValueError(f"pool={pool!r} needs a ViT-style model with a cls token; use 'avg' for CNNs")
        model.global_pool = {"cls": "token", "mean": "avg"}[pool]
    return model  # CNNs and Swin built with num_classes=0 already average-pool
