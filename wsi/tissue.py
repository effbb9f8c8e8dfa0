"""CLAM-compatible tissue masking with numpy/scipy/scikit-image.

The algorithm follows CLAM's ``segmentTissue``: on the pyramid level nearest a target downsample
(64× by default), take the HSV saturation, median-blur it, threshold it (fixed ``sthresh`` or
Otsu), close it morphologically, then filter connected regions: a tissue region is kept when its
area (holes excluded) exceeds ``a_t``; of its holes at most ``max_n_holes`` (largest first) with
area above ``a_h`` are kept as holes, smaller ones are filled. ``a_t`` and ``a_h`` are in units of
a 512×512 level-0 patch, as in CLAM. One difference, documented: areas are pixel counts of
connected components, not OpenCV polygon areas, so regions count their boundary pixels fully.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage

REFERENCE_PATCH = 512  # CLAM's area unit: one 512×512 level-0 patch

PRESETS: dict[str, dict[str, float | int | bool]] = {
    # CLAM's create_patches_fp.py defaults and its presets/*.csv
    "clam_default": dict(sthresh=8, mthresh=7, close=4, use_otsu=False, a_t=100, a_h=16, max_n_holes=8),
    "tcga": dict(sthresh=8, mthresh=7, close=4, use_otsu=False, a_t=16, a_h=4, max_n_holes=8),
    "bwh_biopsy": dict(sthresh=15, mthresh=11, close=2, use_otsu=False, a_t=1, a_h=1, max_n_holes=2),
    "bwh_resection": dict(sthresh=15, mthresh=11, close=4, use_otsu=False, a_t=100, a_h=16, max_n_holes=8),
}


class TissueConfig(BaseModel):
    """Tissue masking parameters (CLAM's names). A ``preset`` fills the fields you do not set."""

    model_config = ConfigDict(extra="forbid")
    preset_fields: ClassVar[tuple[str, ...]] = tuple(PRESETS["clam_default"])

    preset: Literal["clam_default", "tcga", "bwh_biopsy", "bwh_resection"] | None = Field(
        None, description="CLAM preset whose values fill every field not set explicitly")
    seg_downsample: float = Field(64.0, gt=0, description="mask on the pyramid level nearest this downsample (CLAM: 64)")
    sthresh: int = Field(8, ge=0, le=255, description="saturation threshold (0-255) when use_otsu is false")
    mthresh: int = Field(7, ge=1, description="median blur kernel size in mask pixels (odd)")
    close: int = Field(4, ge=0, description="morphological closing kernel size in mask pixels (0: none)")
    use_otsu: bool = Field(False, description="threshold the blurred saturation with Otsu instead of sthresh")
    a_t: float = Field(100, ge=0, description="minimum tissue region area, in 512×512 level-0 patches")
    a_h: float = Field(16, ge=0, description="minimum hole area kept as a hole, in 512×512 level-0 patches")
    area_reference_mpp: float | None = Field(
        None, gt=0, description="null: a_t/a_h count 512×512 level-0 patches (CLAM); a value: 512×512 patches at this "
                                "µm/px, i.e. physical areas that mean the same on 20× and 40× scans")
    max_n_holes: int = Field(8, ge=0, description="at most this many holes per tissue region (largest first)")
    max_mask_pixels: int = Field(50_000_000, ge=10_000, description="cap on the mask's pixel count; a larger level is read at a coarser downsample")
    qc_max_size: int = Field(1024, ge=64, description="longer side of the QC thumbnail in pixels")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        if isinstance(data, dict) and data.get("preset"):
            preset = PRESETS.get(data["preset"])
            if preset is not None:
                data = {**preset, **data}
        return data

    @model_validator(mode="after")
    def _odd_median(self):
        if self.mthresh % 2 == 0:
            raise ValueError(f"mthresh must be odd (a median kernel size), got {self.mthresh}")
        return self


@dataclass
class TissueMask:
    """Binary tissue mask over the whole slide; pixel (r, c) covers level-0 [c·dx, (c+1)·dx) × [r·dy, (r+1)·dy)."""

    mask: np.ndarray  # bool (h, w)
    downsample: tuple[float, float]  # level-0 pixels per mask pixel, (x, y)
    n_regions: int
    n_holes: int

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation as uint8 0-255, OpenCV's definition: 255·(max−min)/max."""
    hi = rgb.max(axis=2).astype(np.float32)
    lo = rgb.min(axis=2).astype(np.float32)
    sat = np.where(hi > 0, 255.0 * (hi - lo) / np.maximum(hi, 1.0), 0.0)
    return np.rint(sat).astype(np.uint8)


def _filter_regions(binary: np.ndarray, min_tissue_px: float, min_hole_px: float, max_n_holes: int) -> tuple[np.ndarray, int, int]:
    """CLAM's contour filtering with connected components: keep big regions, keep their big holes."""
    eight = np.ones((3, 3), bool)
    fg_labels, n_fg = ndimage.label(binary, structure=eight)
    if n_fg == 0:
        return np.zeros_like(binary), 0, 0
    fg_area = np.bincount(fg_labels.ravel(), minlength=n_fg + 1)
    # holes: background components (4-connected, dual of 8-connected foreground) not touching the border
    bg_labels, n_bg = ndimage.label(~binary)
    border = np.unique(np.concatenate([bg_labels[0], bg_labels[-1], bg_labels[:, 0], bg_labels[:, -1]]))
    bg_area = np.bincount(bg_labels.ravel(), minlength=n_bg + 1)
    holes_of: dict[int, list[tuple[int, int]]] = {}
    for hole_id, slc in enumerate(ndimage.find_objects(bg_labels), start=1):
        if slc is None or hole_id in border:
            continue
        # the pixel left of the hole's first pixel in its top row belongs to the enclosing region
        row = slc[0].start
        cols = np.flatnonzero(bg_labels[row, slc[1]] == hole_id)
        parent = int(fg_labels[row, slc[1].start + cols[0] - 1])
        holes_of.setdefault(parent, []).append((int(bg_area[hole_id]), hole_id))
    keep_region = np.zeros(n_fg + 1, bool)
    keep_hole = np.zeros(n_bg + 1, bool)
    fill_hole = np.zeros(n_bg + 1, bool)
    for region in range(1, n_fg + 1):
        if fg_area[region] <= min_tissue_px or fg_area[region] == 0:
            continue
        keep_region[region] = True
        holes = sorted(holes_of.get(region, []), reverse=True)
        kept = [h for area, h in holes[:max_n_holes] if area > min_hole_px]
        keep_hole[kept] = True
        fill_hole[[h for _, h in holes if h not in set(kept)]] = True
    mask = keep_region[fg_labels] | (fill_hole[bg_labels] & (bg_labels > 0))
    return mask, int(keep_region.sum()), int(keep_hole.sum())


def segment_tissue(rgb: np.ndarray, downsample: tuple[float, float], cfg: TissueConfig,
                   slide_mpp: float | None = None) -> TissueMask:
    """Tissue mask of an RGB overview image taken at ``downsample`` (level-0 px per pixel, (x, y)).

    ``slide_mpp`` (level-0 µm/px) is needed only when ``cfg.area_reference_mpp`` is set.
    """
    from skimage.filters import threshold_otsu
    from skimage.filters.rank import median

    sat = saturation(rgb)
    blurred = median(sat, footprint=np.ones((cfg.mthresh, cfg.mthresh), bool)) if cfg.mthresh > 1 else sat
    if cfg.use_otsu:
        threshold = threshold_otsu(blurred) if blurred.min() != blurred.max() else 255
    else:
        threshold = cfg.sthresh
    binary = blurred > threshold
    if cfg.close > 0:
        pad = cfg.close
        padded = np.pad(binary, pad, mode="edge")
        binary = ndimage.binary_closing(padded, structure=np.ones((cfg.close, cfg.close), bool))[pad:-pad, pad:-pad]
    unit = REFERENCE_PATCH**2 / (downsample[0] * downsample[1])
    if cfg.area_reference_mpp is not None:
        if slide_mpp is None:
            raise ValueError("area_reference_mpp is set but the slide's mpp is unknown")
        unit *= (cfg.area_reference_mpp / slide_mpp) ** 2
    mask, n_regions, n_holes = _filter_regions(binary, cfg.a_t * unit, cfg.a_h * unit, cfg.max_n_holes)
    return TissueMask(mask, downsample, n_regions, n_holes)


def mask_slide(slide, cfg: TissueConfig) -> tuple[TissueMask, np.ndarray]:
    """Mask a :class:`wsi.slide.Slide`; returns the mask and the RGB overview it was computed on.

    Uses the level CLAM would (the largest downsample ≤ ``seg_downsample``), so CLAM's kernel
    sizes mean the same here. When that level is larger than ``max_mask_pixels`` (a slide
    without a pyramid, say) the overview is read block-wise at a coarser downsample instead,
    so memory stays bounded.
    """
    level = slide.best_level_for_downsample(cfg.seg_downsample)
    width0, height0 = slide.dimensions
    downsample = slide.level_downsamples[level]
    if width0 * height0 / downsample**2 > cfg.max_mask_pixels:
        downsample = (width0 * height0 / cfg.max_mask_pixels) ** 0.5
    rgb = slide.read_downsampled(downsample)
    return segment_tissue(rgb, (width0 / rgb.shape[1], height0 / rgb.shape[0]), cfg, slide.mpp), rgb


def qc_image(rgb: np.ndarray, tissue: TissueMask, max_size: int = 1024) -> np.ndarray:
    """The overview with the mask outline in green and everything outside the tissue dimmed."""
    from PIL import Image
    from skimage.segmentation import find_boundaries

    h, w = tissue.mask.shape
    scale = min(1.0, max_size / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX)).astype(np.float32)
    mask = np.asarray(Image.fromarray(tissue.mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
    image[~mask] = 0.6 * image[~mask] + 0.4 * np.array([60, 60, 60])
    edge = ndimage.binary_dilation(find_boundaries(mask, mode="inner"), iterations=1 if max(size) < 600 else 2)
    image[edge] = (0, 200, 0)
    return image.astype(np.uint8)


def save_mask_png(mask: np.ndarray, path) -> None:
    """Write a binary mask as a 1-bit PNG to a path or binary file."""
    from PIL import Image

    Image.fromarray(mask.astype(bool)).save(path, format="PNG")


def load_mask_png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path)).astype(bool)
