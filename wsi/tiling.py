"""Tile grids at a target resolution (mpp or magnification), not at a pyramid level.

A tile is ``patch_size`` pixels at ``target_mpp``. It is read from the lowest-resolution level
that is not coarser than the target (never upsampled when the scan allows), ``read_size`` pixels
square at that level, and resized to ``patch_size`` by the reader of the tiles. When a level is
within ``mpp_tolerance`` of the target it is read as is (``read_size == patch_size``), and the
mpp actually delivered is recorded.

Coordinates are level-0 (x, y) of each tile's top-left corner. The grid is laid out in pixels of
the read level (stride ``level_stride``) and mapped to level 0 as ``x0 = ceil(x_level · ds)``. With
an integer downsample (4, 16, ...) that is exact and level-aligned, and OpenSlide and tiffslide
read identical pixels. With a rounded downsample such as 4.0021 (a level whose size did not divide
evenly), tiffslide reads exactly level pixel ``x_level`` (it floors ``x0 / ds``), while OpenSlide
resamples at ``x0 / ds = x_level + ε`` (ε < 1/ds px): the two then differ by that sub-pixel shift.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from wsi.errors import SlideError
from wsi.tissue import TissueMask
from wsi.units import MicronsPerPixel, magnification_to_mpp

log = logging.getLogger(__name__)


class TilingConfig(BaseModel):
    """Where tiles go: target resolution, tile size in target pixels, overlap, tissue threshold."""

    model_config = ConfigDict(extra="forbid")

    target_mpp: float | None = Field(0.5, gt=0, description="µm per pixel of the tiles (0.5 ≈ 20×); "
                                                            "ignored when target_magnification is set")
    target_magnification: float | None = Field(None, gt=0, description="objective magnification of the tiles "
                                                                        "(20 → 0.5 µm/px); overrides target_mpp")
    patch_size: int = Field(256, ge=16, description="tile side in pixels at the target resolution")
    overlap: int = Field(0, ge=0, description="overlap between neighbouring tiles in target pixels (stride = patch_size - overlap)")
    min_tissue_fraction: float = Field(0.25, ge=0, le=1, description="keep a tile when at least this fraction of it "
                                                                     "is tissue in the mask (0: any tissue)")
    mpp_tolerance: float = Field(0.05, ge=0, lt=0.5, description="a level within this relative mpp difference of "
                                                                 "the target is read without resizing")
    blur_ratio: float = Field(0.1, gt=0, lt=1, description="a tile whose sharpness is below this share of its "
                                                           "slide's median is counted as blurred (QC: blurred_fraction)")
    max_fold_fraction: float | None = Field(None, ge=0, le=1, description="drop tiles more than this share of which "
                                                                        "is folded tissue (tissue.folds); null: keep "
                                                                        "them, flagged in tiles/<id>.fold.npy")
    min_sharpness: float | None = Field(None, ge=0, description="drop tiles whose sharpness (wsi.tiling.sharpness: the "
                                                                "median over an 8×8 grid of the Laplacian variance of "
                                                                "stained pixels, at the target mpp) is below this; null: "
                                                                "keep them. Needs slides.verify_tiles (features or tiles: the read "
                                                                "that scores them; with features, they leave the "
                                                                "features, not tiles/<id>.coords.npy)")

    @model_validator(mode="after")
    def _check(self):
        if self.target_mpp is None and self.target_magnification is None:
            raise ValueError("set target_mpp or target_magnification")
        if self.overlap >= self.patch_size:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than patch_size ({self.patch_size})")
        return self

    @property
    def mpp(self) -> MicronsPerPixel:
        if self.target_magnification is not None:
            return magnification_to_mpp(self.target_magnification)
        return MicronsPerPixel(float(self.target_mpp))


@dataclass(frozen=True)
class ReadPlan:
    """How one tile is read: ``read_size`` px at ``read_level`` covering ``level0_size`` level-0 px."""

    target_mpp: float
    patch_size: int
    read_level: int
    read_downsample: float
    read_size: int
    level0_size: int
    level0_stride: int  # nominal; exact for integer downsamples
    level_stride: int  # grid step in pixels of the read level
    read_mpp: float  # µm/px of the pixels as read
    delivered_mpp: float  # µm/px of the tiles after resizing to patch_size
    upsampled: bool


def plan_read(slide_mpp: float, level_downsamples: tuple[float, ...], cfg: TilingConfig) -> ReadPlan:
    """Choose the read level and sizes for tiles of ``cfg`` on a slide scanned at ``slide_mpp``."""
    target = float(cfg.mpp)
    factor = target / slide_mpp  # level-0 px per target px
    level = 0
    for index, ds in enumerate(level_downsamples):
        if ds <= factor * (1 + cfg.mpp_tolerance):
            level = index
    ds = level_downsamples[level]
    if abs(ds - factor) <= cfg.mpp_tolerance * factor:
        read_size = cfg.patch_size
    else:
        read_size = max(1, round(cfg.patch_size * factor / ds))
    stride_target = cfg.patch_size - cfg.overlap
    level_stride = max(1, round(stride_target * read_size / cfg.patch_size))
    level0_size = int(round(read_size * ds))
    level0_stride = int(round(level_stride * ds))
    upsampled = factor < 1 - cfg.mpp_tolerance
    if upsampled:
        log.warning("target %.3f µm/px is finer than the scan (%.3f µm/px): tiles will be upsampled", target, slide_mpp)
    return ReadPlan(target, cfg.patch_size, level, ds, read_size, level0_size, max(1, level0_stride), level_stride,
                    slide_mpp * ds, slide_mpp * ds * read_size / cfg.patch_size, upsampled)


def plan_for_input(plan: ReadPlan, level_downsamples: tuple[float, ...], input_size: int,
                   tolerance: float = 0.05) -> ReadPlan:
    """The same tiles (level-0 footprint and coordinates) read for a model that sees them at ``input_size`` px:
    from the coarsest pyramid level that still holds that resolution, resized straight to ``input_size``.

    A 112-px student on 512-px level-0 tiles reads 128 px at the 4× level, 1/16 of the pixels to decode;
    a model whose input needs level 0 reads level 0 as before. A model larger than the tiles is fed the
    tiling's level, upsampled, never a finer one. ``tolerance``: a level whose pixels fall short
    of ``input_size`` by at most this fraction still counts (its tile is upsampled that little).
    """
    slide_mpp = plan.read_mpp / plan.read_downsample
    needed = plan.level0_size / input_size  # level-0 px per model-input px
    level = 0
    for index, ds in enumerate(level_downsamples):
        if ds <= needed * (1 + tolerance):
            level = index
    level = max(level, plan.read_level)  # never finer than the tiles themselves: no detail the tiling did not read
    ds = level_downsamples[level]
    read_size = max(1, round(plan.level0_size / ds))
    return replace(plan, patch_size=input_size, read_level=level, read_downsample=ds, read_size=read_size,
                   level_stride=max(1, round(plan.level0_stride / ds)), read_mpp=slide_mpp * ds,
                   delivered_mpp=slide_mpp * plan.level0_size / input_size, upsampled=read_size < input_size)


@dataclass
class TileGrid:
    """Tiles of one slide: level-0 top-left ``coords`` (N×2, x, y) and their tissue fraction."""

    coords: np.ndarray  # int64 (N, 2)
    tissue_fraction: np.ndarray  # float32 (N,)
    plan: ReadPlan

    def metadata(self) -> dict:
        return {"n_tiles": int(len(self.coords)), **asdict(self.plan)}


def _area_below(integral: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Exact tissue area in [0, rows) × [0, cols) (fractional mask pixels): bilinear in the integral image."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    r = np.clip(rows, 0, h)
    c = np.clip(cols, 0, w)
    r0 = np.minimum(np.floor(r).astype(np.int64), max(h - 1, 0))
    c0 = np.minimum(np.floor(c).astype(np.int64), max(w - 1, 0))
    fr, fc = r - r0, c - c0
    i00, i01 = integral[r0, c0], integral[r0, c0 + 1]
    i10, i11 = integral[r0 + 1, c0], integral[r0 + 1, c0 + 1]
    return i00 * (1 - fr) * (1 - fc) + i10 * fr * (1 - fc) + i01 * (1 - fr) * fc + i11 * fr * fc


def tissue_fractions(mask: TissueMask, xs: np.ndarray, ys: np.ndarray, size: int) -> np.ndarray:
    """Exact fraction of tissue under each level-0 square (x, y, size), partial mask pixels weighted by overlap."""
    h, w = mask.mask.shape
    if h == 0 or w == 0 or len(xs) == 0:
        return np.zeros(len(xs), np.float32)
    import cv2

    integral = cv2.integral(np.ascontiguousarray(mask.mask, dtype=bool).view(np.uint8), sdepth=cv2.CV_32S)  # (h + 1, w + 1), exact pixel counts
    dx, dy = mask.downsample
    c0, c1 = np.clip(xs / dx, 0, w), np.clip((xs + size) / dx, 0, w)
    r0, r1 = np.clip(ys / dy, 0, h), np.clip((ys + size) / dy, 0, h)
    total = (_area_below(integral, r1, c1) - _area_below(integral, r0, c1)
             - _area_below(integral, r1, c0) + _area_below(integral, r0, c0))
    area = np.maximum((r1 - r0) * (c1 - c0), 1e-12)
    return np.clip(total / area, 0.0, 1.0).astype(np.float32)


def tile_grid(dimensions: tuple[int, int], slide_mpp: float, level_downsamples: tuple[float, ...],
              mask: TissueMask, cfg: TilingConfig) -> TileGrid:
    """All full tiles inside the slide whose tissue fraction reaches ``cfg.min_tissue_fraction``."""
    plan = plan_read(slide_mpp, level_downsamples, cfg)
    width0, height0 = dimensions
    ds = plan.read_downsample

    def axis(extent0: int) -> np.ndarray:
        level_px = np.arange(0, int(extent0 / ds) + 1, plan.level_stride, dtype=np.int64)
        level0 = np.ceil(level_px * ds - 1e-9).astype(np.int64)  # see the module docstring for this rule
        return level0[level0 + plan.level0_size <= extent0]

    gx, gy = np.meshgrid(axis(width0), axis(height0))
    gx, gy = gx.ravel(), gy.ravel()
    fraction = tissue_fractions(mask, gx, gy, plan.level0_size)
    keep = (fraction >= cfg.min_tissue_fraction) & (fraction > 0)
    coords = np.stack([gx[keep], gy[keep]], axis=1).astype(np.int64).reshape(-1, 2)
    return TileGrid(coords, fraction[keep], plan)


def grid_overlay(overview: np.ndarray, grid: TileGrid, dimensions: tuple[int, int]) -> np.ndarray:
    """The overview with each kept tile outlined, for checking the grid by eye."""
    import cv2

    out = np.ascontiguousarray(overview).copy()
    sy, sx = overview.shape[0] / dimensions[1], overview.shape[1] / dimensions[0]
    size = grid.plan.level0_size
    if not len(grid.coords):
        return out
    x, y = grid.coords[:, 0], grid.coords[:, 1]
    c0, r0 = (x * sx).astype(np.int64), (y * sy).astype(np.int64)
    c1 = np.minimum(out.shape[1] - 1, np.ceil((x + size) * sx).astype(np.int64) - 1)
    r1 = np.minimum(out.shape[0] - 1, np.ceil((y + size) * sy).astype(np.int64) - 1)
    for box in np.stack([c0, r0, c1, r1], axis=1).tolist():
        cv2.rectangle(out, box[:2], box[2:], (30, 30, 220), 1)
    return out


def read_tile(slide, x: int, y: int, plan: ReadPlan) -> np.ndarray:
    """One tile as RGB (patch_size, patch_size, 3): read at the plan's level, resized if needed."""
    region = slide.read_region((int(x), int(y)), plan.read_level, (plan.read_size, plan.read_size))
    if plan.read_size == plan.patch_size:
        return region
    import cv2

    # area averaging down (15x faster than PIL's BOX, equal to it within 1 grey level at integer factors), bicubic up
    interpolation = cv2.INTER_AREA if plan.read_size > plan.patch_size else cv2.INTER_CUBIC
    return cv2.resize(np.ascontiguousarray(region), (plan.patch_size, plan.patch_size), interpolation=interpolation)


def sharpness(tile: np.ndarray, cells: int = 8) -> float:
    """Focus of one tile as delivered (at the target mpp): the median, over a ``cells`` × ``cells`` grid of its
    parts, of the variance of the Laplacian of the grey levels over each part's stained pixels (grey < 220).
    Out-of-focus tissue loses the fine edges the Laplacian responds to; glass has none either, so parts under
    a tenth stained are left out (NaN when all are), and the median follows the tile's majority when only
    part of it is out of focus: with 8 × 8 parts (32 px of a 256-px tile), few parts straddle the edge of a
    blurred field, so a tile half in one is judged by its halves (a 4 × 4 grid missed 16 % of the tiles
    mostly in a field, `benchmarks/bench_tissue_artefacts.py`). Absolute values depend on the stain and
    tissue: compare within a slide."""
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(tile), cv2.COLOR_RGB2GRAY)
    cells = max(1, min(cells, *grey.shape))  # a tile smaller than the grid: one part per pixel row at most
    laplacian = cv2.Laplacian(grey, cv2.CV_32F).astype(np.float64)
    stained = (grey < 220).astype(np.float64)
    h, w = (grey.shape[0] // cells) * cells, (grey.shape[1] // cells) * cells  # whole parts (a few edge px left)

    def per_part(values: np.ndarray) -> np.ndarray:
        return values[:h, :w].reshape(cells, h // cells, cells, w // cells).sum(axis=(1, 3))

    count = per_part(stained)
    used = count >= 0.1 * (h // cells) * (w // cells)
    if not used.any():
        return float("nan")
    total, squares = per_part(laplacian * stained), per_part(laplacian**2 * stained)
    mean = total[used] / count[used]
    return float(np.median(squares[used] / count[used] - mean**2))


def inspect_tiles(slide, coords: np.ndarray, plan: ReadPlan, workers: int = 2) -> tuple[dict[int, str], np.ndarray]:
    """Read every tile once as feature extraction will (row-major, so neighbouring tiles share their decoded TIFF
    tiles): ({index: error} of those that fail to decode, each tile's :func:`sharpness`, NaN where unread).

    Two threads: decoding releases the GIL. A few corrupt tiles in a good slide then cost it those tiles
    instead of a failed features task, and blurred ones are known before any model sees them.
    """
    from concurrent.futures import ThreadPoolExecutor

    scores = np.full(len(coords), np.nan, np.float32)

    def check(rows: range) -> dict[int, str]:
        bad = {}
        for index in rows:
            x, y = coords[index]
            try:
                scores[index] = sharpness(read_tile(slide, int(x), int(y), plan))
            except SlideError as exc:  # any backend, any codec: recorded, the tile left out
                bad[index] = exc.reason
        return bad

    n = len(coords)
    step = max(1, -(-n // max(1, workers)))
    parts = [range(start, min(n, start + step)) for start in range(0, n, step)]
    found: dict[int, str] = {}
    if len(parts) <= 1:
        found = check(parts[0]) if parts else {}
    else:
        with ThreadPoolExecutor(len(parts)) as pool:
            for bad in pool.map(check, parts):
                found.update(bad)
    return found, scores


def unreadable_tiles(bad: dict[int, str], coords: np.ndarray, level: int, listed: int = 100) -> list[dict]:
    """The first ``listed`` tiles (by index) of ``bad`` ({index: error}) that did not decode, with their level-0
    x, y, read level and error: how a stage's JSON and the features store list them (all are counted)."""
    return [{"x": int(coords[i][0]), "y": int(coords[i][1]), "level": int(level), "error": error}
            for i, error in sorted(bad.items())[:listed]]


def unreadable_message(bad: dict[int, str], total: int) -> str:
    """"N of M tissue tiles (P %) could not be decoded; first: <error>", for warnings and errors alike."""
    first = bad[min(bad)] if bad else ""
    return f"{len(bad)} of {total} tissue tiles ({len(bad) / max(1, total):.1%}) could not be decoded; first: {first}"

