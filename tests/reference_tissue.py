"""Today's tissue masking before OpenCV (numpy / scipy / scikit-image), kept as the reference the OpenCV
path is compared with (tests/test_tissue.py). Not used by the package."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from wsi.tissue import REFERENCE_PATCH, TissueConfig, TissueMask


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
