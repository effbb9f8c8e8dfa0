"""Architectures timm does not have, written from their papers and checkpoint layouts: CONCH's image
encoder (a ViT trunk with an attentional pooler) and CTransPath (a Swin-T with a convolutional stem).

Their parameter names follow the official checkpoints (``trunk.*``, ``attn_pool_contrast.*``,
``ln_contrast.*``; ``patch_embed.proj.N.*``), so those load with at most a prefix stripped.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MultiheadPooler(nn.Module):
    """CONCH v1's attentional pooler (CoCa): learned queries attend over the trunk's normed tokens through
    ``nn.MultiheadAttention`` (separate q/k/v projections because the context is wider than the queries)."""

    def __init__(self, dim: int, context_dim: int, heads: int, queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(queries, dim))
        self.attn = nn.MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        context = self.ln_k(tokens)
        query = self.ln_q(self.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.attn(query, context, context, need_weights=False)[0]


class LinearPooler(nn.Module):
    """CONCH v1.5's attentional pooler: one learned query, bias-free q / kv / out projections, ``heads`` heads."""

    def __init__(self, dim: int, context_dim: int, heads: int, queries: int = 1):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(queries, dim))
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        q = self.to_q(self.ln_q(self.query)).unsqueeze(0).expand(b, -1, -1)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        split = lambda t: t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out(out.transpose(1, 2).reshape(b, q.shape[1], -1))


class ConchVision(nn.Module):
    """CONCH's image embedding: ViT trunk tokens (after its final norm) → attentional pooler → LayerNorm."""

    def __init__(self, trunk: nn.Module, pooler: nn.Module, dim: int):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = pooler
        self.ln_contrast = nn.LayerNorm(dim)
        self.num_features = self.embed_dim = dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.forward_features(x))[:, 0])


def build_conch(version: str, *, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                pool_dim: int, pool_heads: int, init_values: float | None = None, **kw) -> ConchVision:
    """CONCH v1 (ViT-B/16 trunk, MultiheadAttention pooler, 512-d) or v1.5 (ViT-L/16, linear pooler, 768-d)."""
    from timm.models.vision_transformer import VisionTransformer

    trunk = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                              num_heads=num_heads, init_values=init_values, num_classes=0, **kw)
    pooler_cls = MultiheadPooler if version == "v1" else LinearPooler
    return ConchVision(trunk, pooler_cls(pool_dim, embed_dim, pool_heads), pool_dim)


def conch_v15_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """CONCH v1.5's position table for a ``grid``×``grid`` input: the stored 14×14 table (after resampling any
    other stored grid to 14×14, bilinearly, as its loader does) upsampled bicubically with the scale factor
    ``(grid + 0.1) / 14`` its forward pass uses, so a fixed input size gives the authors' numbers exactly."""
    from timm.layers import resample_abs_pos_embed

    stored = int(round((pos_embed.shape[1] - 1) ** 0.5))
    if stored != 14:
        pos_embed = resample_abs_pos_embed(pos_embed, [14, 14], num_prefix_tokens=1, interpolation="bilinear",
                                           antialias=False)
    if grid == 14:
        return pos_embed
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    dim = patches.shape[-1]
    patches = patches.reshape(1, 14, 14, dim).permute(0, 3, 1, 2).float()
    scale = (grid + 0.1) / 14
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([cls, patches], dim=1)


class ConvStem(nn.Module):
    """CTransPath's patch embedding: two stride-2 3×3 conv + BN + ReLU stages (embed/8 then embed/4 channels) and a
    1×1 conv to ``embed_dim``: a 4× downsampling like Swin's patch_size=4, then LayerNorm. Channels-last output."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None, output_fmt="NHWC",
                 **_):
        super().__init__()
        if patch_size != 4:
            raise ValueError(f"CTransPath's stem downsamples by 4, not {patch_size}")
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (4, 4)
        self.grid_size = (self.img_size[0] // 4, self.img_size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers, cin, cout = [], in_chans, embed_dim // 8
        for _ in range(2):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin, cout = cout, cout * 2
        layers.append(nn.Conv2d(cin, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def build_ctranspath(img_size: int = 224, **kw) -> nn.Module:
    """Swin-T (patch 4, window 7) with CTransPath's ConvStem; headless, average-pooled: 768-d."""
    import timm

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, img_size=img_size,
                             embed_layer=ConvStem, **kw)
