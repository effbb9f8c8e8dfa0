"""Student backbones that expose a token grid, and the projectors that map it to the teacher's space.

EFCM (Li & Diao, 2024) names a "TransScan" module for adaptive receptive fields but publishes no
layout. Our interpretation (docs/distillation.md):

1. a transformer encoder block over the student's token grid (global context);
2. a selective-kernel "scan" over the grid (SKNet): parallel depthwise branches with different
   receptive fields (3×3 and 3×3 dilated by 2, i.e. 5×5), fused by a softmax over branches that a
   pooled descriptor computes per channel, so each channel picks its receptive field;
3. average pooling and a linear map to the teacher's dimension.

``linear`` and ``mlp`` projectors (pool, then one or two layers) are there for ablation.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class StudentBackbone(nn.Module):
    """A timm model returning its spatial token map (B, C, H, W): ViT patch tokens as a grid, or a CNN's last map."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.prefix = int(getattr(model, "num_prefix_tokens", 0))
        self.is_vit = hasattr(model, "patch_embed") and hasattr(model, "blocks")

    @property
    def channels(self) -> int:
        return int(getattr(self.model, "num_features", getattr(self.model, "embed_dim", 0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_features(x)
        if feats.ndim == 4:
            return feats  # CNN: (B, C, H, W)
        tokens = feats[:, self.prefix:]
        side = int(round(tokens.shape[1] ** 0.5))
        if side * side != tokens.shape[1]:
            raise ValueError(f"cannot arrange {tokens.shape[1]} patch tokens as a square grid")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


class SelectiveKernelScan(nn.Module):
    """SKNet-style attention over receptive fields: per channel, a softmax over dilated depthwise branches."""

    def __init__(self, channels: int, dilations: tuple[int, ...] = (1, 2), reduction: int = 4):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=d, dilation=d, groups=channels, bias=False),
                          nn.BatchNorm2d(channels), nn.GELU())
            for d in dilations)
        hidden = max(channels // reduction, 16)
        self.squeeze = nn.Sequential(nn.Linear(channels, hidden), nn.GELU())
        self.select = nn.Linear(hidden, channels * len(dilations))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = torch.stack([branch(x) for branch in self.branches], dim=1)  # (B, K, C, H, W)
        descriptor = self.squeeze(outs.sum(dim=1).mean(dim=(2, 3)))  # (B, hidden)
        weights = self.select(descriptor).view(x.shape[0], len(self.branches), x.shape[1])
        chosen = weights.softmax(dim=1)
        # kept for inspection (which receptive field each channel chose); read back from a local, since batches
        # may run through the same module on several threads at once (features.batch_threads)
        self.last_weights = chosen
        return x + (outs * chosen[..., None, None]).sum(dim=1)


class TransScan(nn.Module):
    """Token grid (B, C, H, W) → transformer block → selective-kernel scan → pool → teacher dim."""

    def __init__(self, in_channels: int, out_dim: int, *, width: int = 192, heads: int = 4, dilations=(1, 2)):
        super().__init__()
        self.inp = nn.Conv2d(in_channels, width, 1)
        self.pos = nn.Conv2d(width, width, 3, padding=1, groups=width)  # conditional positional encoding
        self.block = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0,
                                                activation="gelu", batch_first=True, norm_first=True)
        self.scan = SelectiveKernelScan(width, dilations)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        x = self.inp(grid)
        x = x + self.pos(x)
        b, c, h, w = x.shape
        tokens = self.block(x.flatten(2).transpose(1, 2))  # (B, HW, C)
        x = self.scan(tokens.transpose(1, 2).reshape(b, c, h, w))
        return self.head(self.norm(x.mean(dim=(2, 3))))


class PooledLinear(nn.Module):
    """Ablation: average pool, then one linear layer."""

    def __init__(self, in_channels: int, out_dim: int, **_):
        super().__init__()
        self.head = nn.Sequential(nn.LayerNorm(in_channels), nn.Linear(in_channels, out_dim))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.head(grid.mean(dim=(2, 3)))


class PooledMLP(nn.Module):
    """Ablation: average pool, then a two-layer MLP."""

    def __init__(self, in_channels: int, out_dim: int, *, width: int = 512, **_):
        super().__init__()
        self.head = nn.Sequential(nn.LayerNorm(in_channels), nn.Linear(in_channels, width), nn.GELU(), nn.Linear(width, out_dim))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.head(grid.mean(dim=(2, 3)))


PROJECTORS = {"transscan": TransScan, "linear": PooledLinear, "mlp": PooledMLP}


def create_projector(kind: str, in_channels: int, out_dim: int, **kwargs) -> nn.Module:
    if kind not in PROJECTORS:
        raise ValueError(f"unknown projector {kind!r}; choose one of {sorted(PROJECTORS)}")
    return PROJECTORS[kind](in_channels, out_dim, **kwargs)
