"""Tile scores drawn over a slide overview: averaged where tiles overlap, coloured only over tissue.

Everything here is sized by the output (the overview), never by the slide: tiles are splatted onto
the overview grid with a 2-D difference array (four corner updates per tile, then two cumulative
sums), so 100k tiles on a 2,000-px overview cost a few arrays of the overview's size. CLAM builds
level-sized canvases instead, which is where its 40 GB allocations come from.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def tile_boxes(coords: np.ndarray, size: int, downsample: float, shape: tuple[int, int]) -> np.ndarray:
    """Overview-pixel boxes (x0, y0, x1, y1) of level-0 tiles, clipped to ``shape`` (H, W); at least one pixel each."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    h, w = shape
    x0 = np.clip(np.floor(coords[:, 0] / downsample), 0, w - 1).astype(np.int64)
    y0 = np.clip(np.floor(coords[:, 1] / downsample), 0, h - 1).astype(np.int64)
    x1 = np.clip(np.ceil((coords[:, 0] + size) / downsample), x0 + 1, w).astype(np.int64)
    y1 = np.clip(np.ceil((coords[:, 1] + size) / downsample), y0 + 1, h).astype(np.int64)
    return np.stack([x0, y0, x1, y1], axis=1)


def _splat(boxes: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Sum of ``values`` over each box, as an (H, W) image (difference array + cumulative sums)."""
    h, w = shape
    diff = np.zeros((h + 1, w + 1), np.float64)
    x0, y0, x1, y1 = boxes.T
    np.add.at(diff, (y0, x0), values)
    np.add.at(diff, (y0, x1), -values)
    np.add.at(diff, (y1, x0), -values)
    np.add.at(diff, (y1, x1), values)
    return diff.cumsum(axis=0).cumsum(axis=1)[:h, :w]


def score_map(coords: np.ndarray, size: int, values: np.ndarray, shape: tuple[int, int], downsample: float,
              *, blur_sigma: float = 0.0) -> np.ndarray:
    """(H, W) float32: mean of the values of the tiles covering each overview pixel; NaN where none does.

    ``blur_sigma`` (overview pixels) smooths by normalised convolution: sums and counts are blurred
    separately, so uncovered background does not pull the scores towards zero at tissue edges.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) != len(np.asarray(coords).reshape(-1, 2)):
        raise ValueError(f"{len(values)} scores for {len(coords)} tiles")
    boxes = tile_boxes(coords, size, downsample, shape)
    total, count = _splat(boxes, values, shape), _splat(boxes, np.ones_like(values), shape)
    covered = count > 0.5
    if blur_sigma > 0:
        from scipy.ndimage import gaussian_filter

        total, count = gaussian_filter(total, blur_sigma), gaussian_filter(count, blur_sigma)
    out = np.full(shape, np.nan, np.float32)
    out[covered] = (total[covered] / np.maximum(count[covered], 1e-9)).astype(np.float32)
    return out


def colour_lut(name: str) -> np.ndarray:
    """(256, 3) uint8 colours of a matplotlib colour map (``jet``, ``coolwarm``, ``viridis``, …)."""
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"unknown colour map {name!r}; e.g. jet, coolwarm, viridis, inferno") from None
    return (cmap(np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def blend(background: np.ndarray, scores: np.ndarray, mask: np.ndarray, *, cmap: str = "jet", alpha: float = 0.4,
          vmin: float = 0.0, vmax: float = 100.0) -> np.ndarray:
    """``background`` with ``scores`` colour-mapped and alpha-blended where ``mask`` holds and a score exists."""
    if background.shape[:2] != scores.shape or scores.shape != mask.shape:
        raise ValueError(f"shapes differ: background {background.shape[:2]}, scores {scores.shape}, mask {mask.shape}")
    out = background.copy()
    paint = mask & ~np.isnan(scores)
    index = np.clip((scores[paint] - vmin) / max(vmax - vmin, 1e-12) * 255, 0, 255).astype(np.uint8)
    colours = colour_lut(cmap)[index].astype(np.float32)
    out[paint] = np.round((1 - alpha) * out[paint].astype(np.float32) + alpha * colours).astype(np.uint8)
    return out


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask resized (nearest) to ``shape`` (H, W)."""
    if mask.shape == shape:
        return mask.astype(bool)
    image = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(image) > 127


def figure(overlay: np.ndarray, caption: str, *, cmap: str = "jet", label: str = "attention percentile",
           vmin: float = 0.0, vmax: float = 100.0) -> np.ndarray:
    """The overlay with a vertical colour bar on the right and ``caption`` underneath, for people to read."""
    h, w = overlay.shape[:2]
    bar_w, pad, text_h = max(12, w // 40), 10, 18
    height = max(h, 160)
    canvas = Image.new("RGB", (w + bar_w + 4 * pad + 40, height + 2 * text_h + 2 * pad), "white")
    canvas.paste(Image.fromarray(overlay), (0, 0))
    bar_h = height - 2 * pad
    ramp = colour_lut(cmap)[np.linspace(255, 0, bar_h).astype(int)]
    canvas.paste(Image.fromarray(np.repeat(ramp[:, None, :], bar_w, axis=1)), (w + pad, pad))
    draw = ImageDraw.Draw(canvas)
    for frac in (0.0, 0.5, 1.0):
        y = pad + round((1 - frac) * (bar_h - 1))
        draw.line([(w + pad + bar_w, y), (w + pad + bar_w + 4, y)], fill="black")
        draw.text((w + pad + bar_w + 6, max(0, y - 6)), f"{vmin + frac * (vmax - vmin):g}", fill="black")
    draw.text((pad, height + pad // 2), caption, fill="black")
    draw.text((pad, height + pad // 2 + text_h), f"colour: {label} ({cmap})", fill="black")
    return np.asarray(canvas)
