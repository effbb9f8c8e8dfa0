"""LoRA for timm ViTs as in MeLo (Zhu et al. 2023): low-rank adapters on the query and value projections.

timm's ViT attention has one fused ``qkv`` Linear; ``LoRAQKV`` replaces it with the same Linear (same
parameter names, so the base weights load as before) plus ``B·A`` updates added to its q and v slices,
scaled by alpha / rank. A is Kaiming-uniform, B zero, so a fresh adapter changes nothing. The base
is frozen; adapters and the head train. ``save_adapter`` writes adapters + head as one safetensors
file; ``load_adapter`` puts a task's file (or its already-read tensors) into a frozen encoder, which
is how one encoder serves several tasks: switching is copying ~0.15 M numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mil.finetune.base import FineTuneStrategy, head_params, head_prefixes, in_head, set_trainable


class LoRAQKV(nn.Linear):
    """A fused qkv Linear with rank-r adapters on its q and v outputs."""

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float = 4.0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(base.weight)
            if base.bias is not None:
                self.bias.copy_(base.bias)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.width = base.out_features // 3
        self.lora_q_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_q_B = nn.Parameter(torch.zeros(self.width, rank))
        self.lora_v_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_v_B = nn.Parameter(torch.zeros(self.width, rank))
        nn.init.kaiming_uniform_(self.lora_q_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_v_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        dq = (x @ self.lora_q_A.t() @ self.lora_q_B.t()) * self.scale
        dv = (x @ self.lora_v_A.t() @ self.lora_v_B.t()) * self.scale
        w = self.width
        return torch.cat([out[..., :w] + dq, out[..., w:2 * w], out[..., 2 * w:] + dv], dim=-1)


def inject_lora(model: nn.Module, rank: int = 4, alpha: float = 4.0) -> int:
    """Replace every ViT block's fused ``qkv`` Linear by a ``LoRAQKV``; returns how many were adapted."""
    targets = [(module, name) for module in model.modules() for name, child in module.named_children()
               if name == "qkv" and type(child) is nn.Linear]
    if not targets and not any(isinstance(m, LoRAQKV) for m in model.modules()):
        raise ValueError("LoRA needs a ViT with fused `qkv` attention projections (timm ViT / DeiT); this model has none")
    for module, name in targets:
        setattr(module, name, LoRAQKV(getattr(module, name), rank, alpha))
    return len(targets)


def lora_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if ".lora_" in name or name.startswith("lora_")]


class LoRA(FineTuneStrategy):
    """Adapters on q and v of every block (rank 4, alpha 4), base frozen, head trained (``train_head``) at
    ``head_lr_scale`` times the adapters' rate."""

    name = "lora"

    def __init__(self, rank: int = 4, alpha: float = 4.0, train_head: bool = True, head_lr_scale: float = 0.01):
        super().__init__()
        self.rank, self.alpha, self.train_head, self.head_lr_scale = rank, alpha, train_head, head_lr_scale

    def prepare(self, model: nn.Module, *, epochs: int = 1) -> nn.Module:
        self.epochs = epochs
        inject_lora(model, self.rank, self.alpha)
        set_trainable(model, self.trainable(model))
        return model

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return lora_params(model) + self._head(model)

    def _head(self, model: nn.Module) -> list[nn.Parameter]:
        return head_params(model) if self.train_head and head_prefixes(model) else []

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """Adapters at ``lr`` (they start at zero); the head at ``lr × head_lr_scale``. MeLo's head is a fresh
        classifier, ours a distilled projector whose output the CLAM was trained on: at the adapters' rate
        it moves the features away from that CLAM in a few steps (End2end LoRA fell to chance AUC)."""
        head = self._head(model)
        groups = [{"params": lora_params(model), "lr": lr}]
        return groups + ([{"params": head, "lr": lr * self.head_lr_scale}] if head else [])


def adapter_tensors(model: nn.Module, *, with_head: bool = True) -> dict[str, torch.Tensor]:
    """The task-specific tensors: every adapter, and the head's weights and buffers (e.g. BatchNorm statistics,
    which training in train mode updates too)."""
    heads = head_prefixes(model) if with_head else ()
    tensors = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()
               if ".lora_" in name or in_head(name, heads)}
    tensors.update({name: b.detach().cpu().contiguous() for name, b in model.named_buffers() if in_head(name, heads)})
    return tensors


def save_adapter(model: nn.Module, path: Path, *, with_head: bool = True) -> Path:
    """One small safetensors file per task: adapters + head, with the rank and alpha in its metadata."""
    from features.store import save_safetensors

    layer = next(m for m in model.modules() if isinstance(m, LoRAQKV))
    meta = {"format": "wsi-pipeline-lora/1", "rank": str(layer.rank), "alpha": str(layer.alpha), "targets": json.dumps(["q", "v"])}
    save_safetensors(adapter_tensors(model, with_head=with_head), Path(path), metadata=meta)
    return Path(path)


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """An adapter file's tensors and metadata."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            tensors[key] = f.get_tensor(key)
    if meta.get("format") != "wsi-pipeline-lora/1":
        raise ValueError(f"{path}: not a LoRA adapter file written by save_adapter")
    return tensors, meta


def load_adapter(model: nn.Module, adapter: Path | tuple[dict, dict]) -> nn.Module:
    """Put a task's adapters + head into ``model`` (adapting it first if it has no adapters yet), in place.

    ``adapter`` is a file from ``save_adapter`` or what ``read_adapter`` returned, so a server keeps
    every task's tensors in memory and switches tasks without touching the disk.
    """
    tensors, meta = read_adapter(adapter) if isinstance(adapter, (str, Path)) else adapter
    if not any(isinstance(m, LoRAQKV) for m in model.modules()):
        inject_lora(model, int(meta["rank"]), float(meta["alpha"]))
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    unknown = sorted(set(tensors) - set(own))
    missing = sorted(name for name in own if ".lora_" in name and name not in tensors)
    if unknown or missing:
        raise ValueError(f"adapter does not fit this model: unknown {unknown[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value)
    return model
