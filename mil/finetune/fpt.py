"""Fine-grained prompt tuning (FPT, Huang et al. MICCAI 2024): a frozen large ViT steers a light side ViT.

The frozen encoder sees the high-resolution image once, without gradients. At each of its layers the
class token's attention (mean over heads) picks the top ``top_fraction`` patch tokens; their keys and
values are that layer's "fine-grained" states. A side ViT of the same depth and 1/``width_ratio``
width sees the image at low resolution; before each side layer, ``n_prompts`` learnable prompts
cross-attend to the frozen layer's selected keys/values (the fusion), are concatenated to the side
tokens, and are dropped after the layer. Only side network, prompts, fusion and the output head
train, so training memory is the side network's, not the large model's. ``preload`` returns the frozen
states once per image so later epochs never run the large model again (``forward(x, states=...)``).

Output: with ``out_dim=None`` the frozen encoder's own pooled feature plus a zero-initialised
projection of the side network's class token — the model starts exactly as the frozen encoder (so
End2end starts from the teacher's CLAM) and learns a correction. With ``out_dim=C`` it is a plain
C-way head on the side network (a patch classifier).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mil.finetune.base import FineTuneStrategy, set_trainable


class FPTModel(nn.Module):
    """Frozen ViT (high-res) + side ViT (low-res) + per-layer prompts and cross-attention fusion."""

    def __init__(self, frozen: nn.Module, *, side_size: int | None = None, width_ratio: int = 8, n_prompts: int = 16,
                 top_fraction: float = 0.2, out_dim: int | None = None):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if not (hasattr(frozen, "blocks") and hasattr(frozen, "patch_embed")):
            raise ValueError("FPT needs a timm ViT as its frozen encoder")
        self.frozen = frozen.eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        big = int(frozen.embed_dim)
        depth = len(frozen.blocks)
        patch = int(frozen.patch_embed.patch_size[0])
        self.side_size = side_size or int(frozen.patch_embed.img_size[0]) // 2
        heads = max(1, big // width_ratio // 32)
        width = max(heads, big // width_ratio // heads * heads)
        self.side = VisionTransformer(img_size=self.side_size, patch_size=patch, embed_dim=width, depth=depth,
                                      num_heads=heads, num_classes=0, global_pool="token")
        self.prompts = nn.Parameter(torch.randn(depth, n_prompts, width) * 0.02)
        # fusion: the frozen keys/values projected to the side width (one projection pair shared by all layers,
        # which keeps FPT near the paper's 1.8 % of ViT-B), multi-head attention of the prompts over them
        self.key_proj, self.value_proj = nn.Linear(big, width), nn.Linear(big, width)
        self.heads = heads
        self.fusion_norm = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.residual = out_dim is None
        self.head = nn.Linear(width, out_dim or self._frozen_dim())
        if self.residual:  # start as the frozen encoder
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.top_fraction = top_fraction

    def _frozen_dim(self) -> int:
        return int(getattr(self.frozen, "num_features", self.frozen.embed_dim))

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()  # the frozen encoder never trains (dropout, drop-path off)
        return self

    def trainable_modules(self) -> list[nn.Module]:
        return [self.side, self.key_proj, self.value_proj, self.fusion_norm, self.head]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.prompts] + [p for m in self.trainable_modules() for p in m.parameters()]

    @torch.no_grad()
    def preload(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen encoder's selected keys/values per layer (B, L, 2, T, D) and its pooled feature (B, D)."""
        f = self.frozen
        h = f.norm_pre(f.patch_drop(f._pos_embed(f.patch_embed(x))))
        prefix = int(getattr(f, "num_prefix_tokens", 0))
        top = max(1, math.ceil(self.top_fraction * (h.shape[1] - prefix)))
        states = []
        for block in f.blocks:
            attn = block.attn
            b, n, _ = h.shape
            qkv = attn.qkv(block.norm1(h)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
            q, k = attn.q_norm(q), attn.k_norm(k)
            query = q[:, :, :1] if prefix else q.mean(dim=2, keepdim=True)
            weights = (query @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)[:, :, 0, prefix:].mean(dim=1)
            index = (weights.topk(top, dim=1).indices + prefix)[:, :, None].expand(-1, -1, k.shape[1] * k.shape[3])
            keys = k.transpose(1, 2).reshape(b, n, -1).gather(1, index)
            values = v.transpose(1, 2).reshape(b, n, -1).gather(1, index)
            states.append(torch.stack([keys, values], dim=1))
            h = block(h)
        return torch.stack(states, dim=1), f.forward_head(f.norm(h))

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Multi-head scaled dot-product attention of (B, P, d) prompts over (B, T, d) keys/values."""
        def split(t):
            return t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(query), split(key), split(value))
        return out.transpose(1, 2).reshape(query.shape)

    def forward(self, x: torch.Tensor, states: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``x``: the high-resolution batch; the side network gets it resized to ``side_size``."""
        kv, pooled = states if states is not None else self.preload(x)
        s = self.side
        low = F.interpolate(x, size=(self.side_size, self.side_size), mode="bilinear", antialias=True, align_corners=False)
        h = s.norm_pre(s._pos_embed(s.patch_embed(low)))
        for i, block in enumerate(s.blocks):
            prompts = self.prompts[i].expand(h.shape[0], -1, -1)
            fused = self.fusion_norm[i](prompts + self._attend(prompts, self.key_proj(kv[:, i, 0]), self.value_proj(kv[:, i, 1])))
            h = block(torch.cat([h, fused], dim=1))[:, : h.shape[1]]  # prompts dropped after the layer
        out = self.head(s.forward_head(s.norm(h)))
        return out + pooled.to(out.dtype) if self.residual else out


class FPT(FineTuneStrategy):
    """Wrap a (large) timm ViT as ``FPTModel``; only side network, prompts, fusion and head train."""

    name = "fpt"

    def __init__(self, side_size: int | None = None, width_ratio: int = 8, n_prompts: int = 16,
                 top_fraction: float = 0.2, out_dim: int | None = None):
        super().__init__()
        self.options = {"side_size": side_size, "width_ratio": width_ratio, "n_prompts": n_prompts,
                        "top_fraction": top_fraction, "out_dim": out_dim}

    def prepare(self, model: nn.Module, *, epochs: int = 1) -> nn.Module:
        self.epochs = epochs
        if not isinstance(model, FPTModel):
            device = next(model.parameters()).device
            model = FPTModel(model, **self.options).to(device)  # the side network joins the frozen model's device
        set_trainable(model, model.trainable_parameters())
        return model

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return model.trainable_parameters()
