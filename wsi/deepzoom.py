"""Deep Zoom (DZI) pyramids cut on demand: a slide's tiles from its own pyramid, a heatmap's from tile scores.

DZI level ``L`` of an image W × H is the image at downsample ``2^(N−L)``, ``N = ceil(log2(max(W, H)))``,
cut into ``tile_size`` px tiles that overlap their neighbours by ``overlap`` px (OpenSeadragon's format;
OpenSlide's ``DeepZoomGenerator`` uses the same 254 + 1 px). A slide tile is read from the coarsest
pyramid level at or below its downsample and area-resampled; levels coarser than the slide's overview
(a power-of-two downsample ≤ 2,048 px a side, read once) are cut from that overview, so a slide without
small levels — or none at all — never has a whole level read for one tile.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import cv2
import numpy as np

from wsi.heatmap import colour_lut, score_map

DZI_XMLNS = "http://schemas.microsoft.com/deepzoom/2008"


@dataclass(frozen=True)
class DziGeometry:
    """Where each tile of a W × H image's Deep Zoom pyramid lies."""

    width: int
    height: int
    tile_size: int = 254
    overlap: int = 1

    @property
    def max_level(self) -> int:
        return max(0, math.ceil(math.log2(max(self.width, self.height))))

    def scale(self, level: int) -> int:
        """Level-0 pixels per pixel of DZI ``level``."""
        return 2 ** (self.max_level - level)

    def level_size(self, level: int) -> tuple[int, int]:
        s = self.scale(level)
        return max(1, math.ceil(self.width / s)), max(1, math.ceil(self.height / s))

    def tile_count(self, level: int) -> tuple[int, int]:
        w, h = self.level_size(level)
        return math.ceil(w / self.tile_size), math.ceil(h / self.tile_size)

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of a tile in DZI-level pixels, overlap included; ``KeyError`` when there is no such tile."""
        if not 0 <= level <= self.max_level:
            raise KeyError(f"level {level} not in 0..{self.max_level}")
        cols, rows = self.tile_count(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise KeyError(f"tile {col}_{row} not in level {level} ({cols} × {rows} tiles)")
        w, h = self.level_size(level)
        x0, y0 = max(0, col * self.tile_size - self.overlap), max(0, row * self.tile_size - self.overlap)
        return x0, y0, min(w, (col + 1) * self.tile_size + self.overlap), min(h, (row + 1) * self.tile_size + self.overlap)

    def level0_box(self, level: int, col: int, row: int) -> tuple[float, float, float, float]:
        """The tile's box in level-0 pixels (clipped to the image)."""
        s = self.scale(level)
        x0, y0, x1, y1 = self.tile_box(level, col, row)
        return x0 * s, y0 * s, min(self.width, x1 * s), min(self.height, y1 * s)

    def descriptor(self, fmt: str) -> dict:
        """The DZI's fields as JSON (what OpenSeadragon accepts inline instead of the XML)."""
        return {"format": fmt, "tile_size": self.tile_size, "overlap": self.overlap, "width": self.width, "height": self.height}

    def xml(self, fmt: str) -> str:
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Image xmlns="{DZI_XMLNS}" Format="{fmt}" Overlap="{self.overlap}" '
                f'TileSize="{self.tile_size}"><Size Width="{self.width}" Height="{self.height}"/></Image>\n')


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"JPEG encoding failed for an image of shape {rgb.shape}")
    return data.tobytes()


def encode_png(rgba: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgba[..., [2, 1, 0, 3]]), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError(f"PNG encoding failed for an image of shape {rgba.shape}")
    return data.tobytes()


def overview_downsample(width: int, height: int, longest: int = 2048) -> int:
    """The power of two that brings the longer side to at most ``longest`` px."""
    return 2 ** max(0, math.ceil(math.log2(max(width, height) / longest)))


class SlideZoom:
    """A slide's DZI tiles, read through ``reading(slide_id)`` (``wsi.slide.SlidePool.reading``) on demand."""

    def __init__(self, pool, slide_id: str, width: int, height: int, *, tile_size: int = 254, overlap: int = 1):
        self.pool, self.slide_id = pool, slide_id
        self.geometry = DziGeometry(width, height, tile_size, overlap)
        self.overview_ds = overview_downsample(width, height)
        self._overview: np.ndarray | None = None
        self._lock = threading.Lock()

    def overview(self) -> np.ndarray:
        """The whole slide at ``overview_ds``, read once (the coarse DZI levels and thumbnails come from it)."""
        with self._lock:
            if self._overview is None:
                with self.pool.reading(self.slide_id) as slide:
                    self._overview = slide.read_downsampled(self.overview_ds)
            return self._overview

    def region(self, x0: float, y0: float, x1: float, y1: float, out_w: int, out_h: int,
               downsample: float | None = None) -> np.ndarray:
        """Level-0 box (x0, y0)–(x1, y1) as ``out_w`` × ``out_h`` RGB, read at ``downsample`` (default: the box's)."""
        downsample = downsample or max((x1 - x0) / out_w, (y1 - y0) / out_h)
        if downsample >= self.overview_ds:
            view = self.overview()
            d = self.overview_ds
            crop = view[int(y0 // d):max(int(y0 // d) + 1, math.ceil(y1 / d)), int(x0 // d):max(int(x0 // d) + 1, math.ceil(x1 / d))]
            return cv2.resize(crop, (out_w, out_h), interpolation=cv2.INTER_AREA)
        with self.pool.reading(self.slide_id) as slide:
            level = slide.best_level_for_downsample(downsample)
            ds = slide.level_downsamples[level]
            lw, lh = slide.level_dimensions[level]
            w = max(1, min(math.ceil((x1 - x0) / ds), lw - int(x0 / ds)))
            h = max(1, min(math.ceil((y1 - y0) / ds), lh - int(y0 / ds)))
            pixels = slide.read_region((int(x0), int(y0)), level, (w, h))
        if pixels.shape[:2] == (out_h, out_w):
            return pixels
        return cv2.resize(pixels, (out_w, out_h), interpolation=cv2.INTER_AREA)

    def tile(self, level: int, col: int, row: int) -> bytes:
        """One JPEG tile; ``KeyError`` for a tile the pyramid does not have."""
        x0, y0, x1, y1 = self.geometry.tile_box(level, col, row)
        # the level's own downsample: an edge tile's clipped box would otherwise read as a finer level's
        return encode_jpeg(self.region(*self.geometry.level0_box(level, col, row), x1 - x0, y1 - y0, self.geometry.scale(level)))


class HeatZoom:
    """A heatmap's DZI tiles (RGBA PNG, transparent off tissue): tile percentiles splatted onto a grid of
    ``per_tile`` cells per tile side, smoothed by a Gaussian of half a tile, interpolated bilinearly into each
    DZI tile and only then colour-mapped, so the map stays smooth at any zoom."""

    def __init__(self, width: int, height: int, coords: np.ndarray, tile_size: int, percentile: np.ndarray,
                 tissue: np.ndarray | None, *, cmap: str = "jet", per_tile: int = 4, max_side: int = 4096,
                 dzi_tile: int = 254, overlap: int = 1):
        self.geometry = DziGeometry(width, height, dzi_tile, overlap)
        self.cell = max(tile_size / per_tile, max(width, height) / max_side)  # level-0 px per grid cell
        shape = (max(1, math.ceil(height / self.cell)), max(1, math.ceil(width / self.cell)))
        sigma = tile_size / self.cell / 2
        scores = score_map(coords, tile_size, percentile, shape, self.cell, blur_sigma=sigma)
        covered = ~np.isnan(scores)
        self.scores = np.where(covered, np.nan_to_num(scores), 0).astype(np.float32)
        self.cover = covered.astype(np.float32)
        # drawn over tissue only, as the heatmap figures are: the mask at its own resolution, finer than the grid
        self.tissue = None if tissue is None else tissue.astype(np.uint8) * 255  # uint8: a quarter of float32's memory
        self.tissue_ds = None if tissue is None else (width / tissue.shape[1], height / tissue.shape[0])
        self.lut = colour_lut(cmap)

    @staticmethod
    def _sample(grid: np.ndarray, cell: tuple[float, float], scale: float, x0: int, y0: int, size: tuple[int, int]) -> np.ndarray:
        """``grid`` (one cell = ``cell`` level-0 px) bilinearly sampled at the centres of a DZI tile's pixels."""
        sx, sy = scale / cell[0], scale / cell[1]  # grid cells per DZI-level pixel
        matrix = np.float32([[sx, 0, x0 * sx + sx / 2 - 0.5], [0, sy, y0 * sy + sy / 2 - 0.5]])
        return cv2.warpAffine(grid, matrix, size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    def tile(self, level: int, col: int, row: int) -> bytes:
        x0, y0, x1, y1 = self.geometry.tile_box(level, col, row)
        scale, size, cell = self.geometry.scale(level), (x1 - x0, y1 - y0), (self.cell, self.cell)
        cover = self._sample(self.cover, cell, scale, x0, y0, size)
        total = self._sample(self.scores, cell, scale, x0, y0, size)  # scores are 0 where no tile covers
        value = total / np.maximum(cover, 1e-6)  # normalised: tissue edges are not pulled towards zero
        shown = cover >= 0.5
        if self.tissue is not None:
            shown &= self._sample(self.tissue, self.tissue_ds, scale, x0, y0, size) >= 128
        rgba = np.zeros((size[1], size[0], 4), np.uint8)
        rgba[..., :3] = self.lut[np.clip(value / 100 * 255, 0, 255).astype(np.uint8)]
        rgba[..., 3] = np.where(shown, 255, 0).astype(np.uint8)
        return encode_png(rgba)
