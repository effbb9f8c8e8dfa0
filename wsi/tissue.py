"""CLAM-compatible tissue masking with OpenCV (what CLAM itself uses), a few milliseconds per mask.

The algorithm follows CLAM's ``segmentTissue``: on the pyramid level nearest a target downsample
(64× by default), take the HSV saturation, median-blur it, threshold it (fixed ``sthresh`` or
Otsu), close it morphologically, then filter connected regions: a tissue region is kept when its
area (holes excluded) exceeds ``a_t``; of its holes at most ``max_n_holes`` (largest first) with
area above ``a_h`` are kept as holes, smaller ones are filled. ``a_t`` and ``a_h`` are in units of
a 512×512 level-0 patch, as in CLAM. One difference, documented: areas are pixel counts of
connected components, not OpenCV polygon areas, so regions count their boundary pixels fully.
Colour conversion, median blur, closing and the connected components are OpenCV's; borders are
replicated for the blur and the closing, and the closing's erosion uses the mirrored anchor, so an
even kernel (CLAM's ``close`` 2 or 4) does not shift the mask by a pixel as ``cv2.MORPH_CLOSE`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from wsi.artefacts import BubbleConfig, FoldConfig, InkConfig, fold_mask, ink_mask, reduce_by, reduction, thin_parts, widen
from wsi.thresholds import faint_tissue, median_threshold

REFERENCE_PATCH = 512  # CLAM's area unit: one 512×512 level-0 patch
PYRAMID_STEP = 4  # the downsample between levels of a standard pyramid (Aperio, Philips, OME...)

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
    faint: bool = Field(True, description="also keep pale tissue above this slide's glass (its median saturation + "
                                          "6 robust SDs, at least 5 levels) but below sthresh where its neighbourhood "
                                          "is too — not a stained edge's halo (wsi.thresholds.faint_tissue)")
    a_t: float = Field(100, ge=0, description="minimum tissue region area, in 512×512 level-0 patches")
    a_h: float = Field(16, ge=0, description="minimum hole area kept as a hole, in 512×512 level-0 patches")
    area_reference_mpp: float | None = Field(
        None, gt=0, description="null: a_t/a_h count 512×512 level-0 patches (CLAM); a value: 512×512 patches at this "
                                "µm/px, i.e. physical areas that mean the same on 20× and 40× scans")
    max_n_holes: int = Field(8, ge=0, description="at most this many holes per tissue region (largest first)")
    ink: InkConfig = Field(default_factory=InkConfig, description="pen-ink exclusion (wsi/artefacts.py)")
    bubbles: BubbleConfig = Field(default_factory=BubbleConfig, description="exclusion of thin structures on the glass: "
                                                                           "bubble rims, coverslip edges, fibres")
    folds: FoldConfig = Field(default_factory=FoldConfig, description="tissue folds, flagged (wsi/artefacts.py)")
    mask_dir: Path | None = Field(
        None, description="folder of corrected masks, <slide_id>.geojson (QuPath export, level-0 px) or <slide_id>.png: "
                          "a slide with one uses it instead of the computed mask (wsi/mask_override.py); its content "
                          "enters the tissue fingerprint. Relative paths are made absolute from the current "
                          "directory; the folder must exist and must not be the run's own tissue/ folder")
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

    @field_validator("mask_dir")
    @classmethod
    def _existing_folder(cls, value: Path | None) -> Path | None:
        """Absolute (workers may run elsewhere), and there: a missing folder would silently drop the corrections."""
        if value is None:
            return None
        value = Path(value).expanduser().absolute()
        if not value.is_dir():
            raise ValueError(f"{value} is not a folder")
        return value

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
    # what was taken out of the tissue, by kind ("ink", "bubble"), each a bool mask like ``mask``
    excluded: dict[str, np.ndarray] = field(default_factory=dict)
    # tissue kept but marked, by kind ("fold"), each a bool mask like ``mask`` (within it)
    flagged: dict[str, np.ndarray] = field(default_factory=dict)
    # (factor, the overview reduced by it) as the artefact rules judged it, for the QC image to reuse
    overview_reduced: tuple[int, np.ndarray] | None = field(default=None, repr=False, compare=False)

    @property
    def tissue_fraction(self) -> float:
        return np.count_nonzero(self.mask) / self.mask.size if self.mask.size else 0.0


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation as uint8 0-255, OpenCV's definition: 255·(max−min)/max. Contiguous: OpenCV copies a strided
    view at every call, and the thresholds pass it to three (2 ms to copy once, 4 saved at 4.7 Mpx)."""
    import cv2

    return np.ascontiguousarray(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[..., 1])


def label_components(binary: np.ndarray, connectivity: int) -> tuple[int, np.ndarray]:
    """OpenCV's connected components of a uint8 0/1 image: (labels incl. background, label image), the labels as
    uint16 when they fit (half the memory to write and gather: 1.3 + 0.6 ms of a 4.7 Mpx mask), else int32."""
    import cv2

    try:
        return cv2.connectedComponents(binary, connectivity=connectivity, ltype=cv2.CV_16U)
    except cv2.error:  # 65,535 components or more (OpenCV refuses to overflow): a speckled overview
        return cv2.connectedComponents(binary, connectivity=connectivity, ltype=cv2.CV_32S)


def _filter_regions(binary: np.ndarray, min_tissue_px: float, min_hole_px: float, max_n_holes: int,
                    open_near: np.ndarray | None = None, min_width_px: float = 0.0,
                    thin: np.ndarray | None = None, factor: int = 1) -> tuple[np.ndarray, int, int]:
    """CLAM's contour filtering with connected components: keep big regions, keep their big holes. Holes that
    touch ``open_near`` (excluded ink) are never filled: glass a pen circle encloses is not tissue. With
    ``min_width_px``, a thin region is dropped too (a bubble's rim, a coverslip's edge: :func:`thin_parts`), and marked
    in ``thin`` (a bool array like ``binary``, written in place) when it was big enough to be kept otherwise;
    thinness is judged on the mask reduced by ``factor``.

    Tissue is 8-connected, holes are the 4-connected background a flood fill from the border does not reach.
    Both are labelled without OpenCV's per-pixel statistics, which were two thirds of the time on a 16×-level
    mask: areas come from a histogram of 8-bit labels when there are fewer than 256 regions, else from the
    tissue pixels' labels alone.
    """
    import cv2

    binary = np.ascontiguousarray(binary, dtype=bool)
    n_fg, fg_labels = label_components(binary.view(np.uint8), 8)
    n_fg -= 1  # label 0 is the background
    if n_fg == 0:
        return np.zeros_like(binary, dtype=bool), 0, 0
    few = n_fg < 256 and binary.size < 1 << 24  # 8-bit labels; float32 histogram counts stay exact
    if few:  # a clean slide's few regions: areas from a histogram, the kept ones by a lookup table (25 % faster)
        labels8 = fg_labels.astype(np.uint8)
        fg_area = cv2.calcHist([labels8], [0], None, [256], [0, 256]).ravel()[:n_fg + 1].astype(np.int64)
        fg_area[0] = 0  # the background is no region
    else:
        on_tissue = fg_labels[binary]  # the tissue pixels' labels, gathered once
        fg_area = np.bincount(on_tissue, minlength=n_fg + 1)
    keep_region = fg_area > min_tissue_px
    keep_region[0] = False
    if min_width_px > 0 and keep_region.any():
        narrow = thin_parts(fg_labels, fg_area, min_width_px, factor, among=keep_region)
        if narrow.any():
            keep_region &= ~narrow
            if thin is not None:
                thin |= narrow[fg_labels]
    if few:
        table = np.zeros(256, np.uint8)
        table[:n_fg + 1] = keep_region
        mask = cv2.LUT(labels8, table).view(bool)
    else:
        mask = np.zeros_like(binary)
        mask[binary] = keep_region[on_tissue]  # over the tissue pixels only
    # a kept region's holes lie within the kept regions' box: found there (specks all over the glass widen the
    # mask's own box to the whole overview), then labelled within their own box (4-connected: slow)
    kx, ky, kw, kh = cv2.boundingRect(mask.view(np.uint8))
    holes = enclosed_background(binary[ky:ky + kh, kx:kx + kw])
    x, y, w, h = cv2.boundingRect(holes.view(np.uint8))
    if w == 0:
        return mask, int(keep_region.sum()), 0
    box = holes[y:y + h, x:x + w]
    x, y = x + kx, y + ky
    in_box = np.flatnonzero(box)  # raster order, as over the whole mask
    hole_at = (in_box // w + y) * binary.shape[1] + in_box % w + x
    hole_labels = label_components(box.view(np.uint8), 4)[1]
    ids = hole_labels.ravel()[in_box].astype(np.intp)  # signed: the order below negates them
    hole_area = np.bincount(ids)
    hole_ids, first = np.unique(ids, return_index=True)
    # the pixel left of a hole's first pixel (raster order) is tissue: the region enclosing it
    parent = fg_labels.ravel()[hole_at[first] - 1]
    never_fill = np.zeros(len(hole_area), bool)
    if open_near is not None and open_near.any():
        never_fill[np.unique(hole_labels[open_near[y:y + h, x:x + w]])] = True
    fill = np.zeros(len(hole_area), bool)
    n_holes = 0
    order = np.lexsort((-hole_ids, -hole_area[hole_ids], parent))  # by region, then largest (and last) first
    for region, start, count in zip(*np.unique(parent[order], return_index=True, return_counts=True)):
        if not keep_region[region]:
            continue
        ranked = hole_ids[order[start:start + count]]
        kept = ranked[:max_n_holes][hole_area[ranked[:max_n_holes]] > min_hole_px]
        n_holes += len(kept)
        fill[ranked] = True
        fill[kept] = False
    fill &= ~never_fill
    mask.ravel()[hole_at[fill[ids]]] = True
    return mask, int(keep_region.sum()), n_holes


def enclosed_background(binary: np.ndarray) -> np.ndarray:
    """The background that does not reach the image's border through 4-connected background: the holes."""
    import cv2

    binary = np.ascontiguousarray(binary, dtype=bool)
    holes = np.zeros_like(binary)
    x, y, w, h = cv2.boundingRect(binary.view(np.uint8))
    if w == 0:
        return holes
    # filled within the tissue's box: the background around the box reaches the border, as the box's frame does
    crop = np.ascontiguousarray(binary[y:y + h, x:x + w])
    canvas = cv2.copyMakeBorder((~crop).view(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=1)
    cv2.floodFill(canvas, None, (0, 0), 2, flags=4)
    holes[y:y + h, x:x + w] = canvas[1:-1, 1:-1] == 1
    return holes


def segment_tissue(rgb: np.ndarray, downsample: tuple[float, float], cfg: TissueConfig,
                   slide_mpp: float | None = None) -> TissueMask:
    """Tissue mask of an RGB overview image taken at ``downsample`` (level-0 px per pixel, (x, y)).

    ``slide_mpp`` (level-0 µm/px) is needed when ``cfg.area_reference_mpp`` is set, and for ink exclusion
    (``cfg.ink``, by physical size; skipped without it). Ink is removed after the regions are filtered, so
    tissue that a stroke crosses is judged by its whole region's size, and a stroke is never a hole to fill.
    """
    import cv2

    sat = saturation(rgb)
    binary = median_threshold(sat, cfg.mthresh, None if cfg.use_otsu else cfg.sthresh)
    if cfg.faint and not cfg.use_otsu:
        binary |= faint_tissue(sat, binary, cfg.mthresh, cfg.sthresh)
    if cfg.close > 0:
        pad = cfg.close
        padded = cv2.copyMakeBorder(binary, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        kernel, anchor = np.ones((cfg.close, cfg.close), np.uint8), cfg.close // 2
        # erode with the mirrored anchor: with an even kernel, cv2.MORPH_CLOSE would shift the mask by a pixel
        dilated = cv2.dilate(padded, kernel, anchor=(anchor, anchor))
        binary = cv2.erode(dilated, kernel, anchor=(cfg.close - 1 - anchor,) * 2)[pad:-pad, pad:-pad]
    binary = binary.astype(bool)
    excluded = {}
    px_um = slide_mpp * downsample[0] if slide_mpp is not None else None  # artefacts are found by physical size
    reduced = None  # the overview as ink and folds are judged (wsi.artefacts.reduction), made once for both
    if px_um is not None and (cfg.ink.enabled or cfg.folds.enabled):
        reduced = reduce_by(rgb, reduction(px_um))
    if cfg.ink.enabled and px_um is not None:
        excluded["ink"] = ink_mask(rgb, px_um, cfg.ink, reduced)
    unit = REFERENCE_PATCH**2 / (downsample[0] * downsample[1])
    if cfg.area_reference_mpp is not None:
        if slide_mpp is None:
            raise ValueError("area_reference_mpp is set but the slide's mpp is unknown")
        unit *= (cfg.area_reference_mpp / slide_mpp) ** 2
    near_ink = None
    if "ink" in excluded and excluded["ink"].any():
        near_ink = widen(excluded["ink"], 1)
    thin = np.zeros_like(binary)
    min_width = cfg.bubbles.min_width_um / px_um if cfg.bubbles.enabled and px_um is not None else 0.0
    mask, n_regions, n_holes = _filter_regions(binary, cfg.a_t * unit, cfg.a_h * unit, cfg.max_n_holes, near_ink,
                                               min_width, thin, reduction(px_um) if px_um else 1)
    if thin.any():
        excluded["bubble"] = thin & ~excluded["ink"] if "ink" in excluded else thin  # a pen stroke is ink
    if any((part & mask).any() for part in excluded.values()):
        for part in excluded.values():  # after the filter: tissue a stroke crosses keeps its region's size
            mask &= ~part
        tissue = mask_from(mask, downsample, excluded)  # counted again: a region of ink alone is gone
    else:
        tissue = TissueMask(mask, downsample, n_regions, n_holes, excluded)
    if cfg.folds.enabled and px_um is not None:
        judged = tissue.mask
        if "ink" in excluded and excluded["ink"].any():  # marker bleeds into its neighbours: dark, not folded
            judged = judged & ~widen(excluded["ink"], int(np.ceil(50 / px_um)))
        folds = fold_mask(rgb, judged, px_um, cfg.folds, reduced)
        if folds.any():
            tissue.flagged["fold"] = folds
    if reduced is not None and reduction(px_um) > 1:  # a copy, not the caller's overview (factor 1 is rgb itself)
        tissue.overview_reduced = (reduction(px_um), reduced)
    return tissue


def mask_slide(slide, cfg: TissueConfig) -> tuple[TissueMask, np.ndarray]:
    """Mask a :class:`wsi.slide.Slide`; returns the mask and the RGB overview it was computed on.

    Uses the level CLAM would (the largest downsample ≤ ``seg_downsample``), so CLAM's kernel
    sizes mean the same here. A slide without such a level within a 4× pyramid step (no pyramid,
    or no small levels) is reduced to ``seg_downsample / 4`` — the scale a standard pyramid gives —
    by :meth:`wsi.slide.Slide.read_downsampled`, in bounded strips from the finest level it needs;
    the overview is also coarsened until it fits ``max_mask_pixels``.
    """
    level = slide.best_level_for_downsample(cfg.seg_downsample)
    width0, height0 = slide.dimensions
    downsample = slide.level_downsamples[level]
    if downsample < cfg.seg_downsample / PYRAMID_STEP:  # no pyramid, or no small levels: the scale a 4×-step one gives
        downsample = cfg.seg_downsample / PYRAMID_STEP
    if width0 * height0 / downsample**2 > cfg.max_mask_pixels:
        downsample = (width0 * height0 / cfg.max_mask_pixels) ** 0.5
    rgb = slide.read_downsampled(downsample)
    return segment_tissue(rgb, (width0 / rgb.shape[1], height0 / rgb.shape[0]), cfg, slide.mpp), rgb


def mask_from(mask: np.ndarray, downsample: tuple[float, float], excluded: dict[str, np.ndarray] | None = None
              ) -> TissueMask:
    """A :class:`TissueMask` of a given mask (a corrected one, or ours with the ink taken out), its regions and holes
    counted as the filter counts them: 8-connected tissue, 4-connected enclosed background."""
    n_regions, n_holes = count_regions_and_holes(mask)
    return TissueMask(np.ascontiguousarray(mask, dtype=bool), downsample, n_regions, n_holes, dict(excluded or {}))


def count_regions_and_holes(mask: np.ndarray) -> tuple[int, int]:
    """(8-connected regions, 4-connected holes) of a mask, from its contours: OpenCV traces the outer borders of
    8-connected regions and the borders of the 4-connected background they enclose (Suzuki and Abe), which are
    these counts (1.4 ms against 11 for labelling both at 4.7 Mpx). Traced within the mask's box, with a frame of
    background so that a region touching the image's edge is closed."""
    import cv2

    binary = np.ascontiguousarray(mask, dtype=bool).view(np.uint8)
    x, y, w, h = cv2.boundingRect(binary)
    if w == 0:
        return 0, 0
    framed = cv2.copyMakeBorder(binary[y:y + h, x:x + w], 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    contours, hierarchy = cv2.findContours(framed, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    outer = int(np.count_nonzero(hierarchy[0][:, 3] == -1))  # a hole's border has its region's as parent
    return outer, len(contours) - outer
