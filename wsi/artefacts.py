"""Artefacts on real glass, found on the tissue stage's overview: pathologists' pen ink, thin structures on the
glass (bubble rims, coverslip edges, fibres) and tissue folds.

Ink is found by colour and by shape. Marker colours that H&E never shows at overview scale (green,
saturated blue, neutral black) or shows only in small amounts (saturated red: blood) are candidates.
Only coherent components above a physical area count as ink: a stroke is millimetres long, while
haematoxylin-dark nuclei and red cells are specks of a few µm that the overview averages into the
tissue colour. A red candidate must also be a stroke, elongated rather than a blob, so a
haemorrhage is not ink. The ink mask is widened by a few pixels for the anti-aliased rim of a stroke.
The hue bands are OpenCV's (0–180); H&E's stains sit at 125–180 and 0–8 (measured on the H&E and IHC
textures the demo uses).
"""

from __future__ import annotations

import numpy as np
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

INK_COLOURS = ("green", "blue", "black", "red")


class InkConfig(BaseModel):
    """Pen-ink exclusion (``tissue.ink``)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="exclude pen ink (green, blue, black, red marker) from the tissue mask")
    colours: tuple[Literal["green", "blue", "black", "red"], ...] = Field(
        INK_COLOURS, description="which marker colours to look for: green, blue, black, red")
    min_area_um2: float = Field(8_000, gt=0, description="smallest ink component, µm² (a 80 × 100 µm piece of stroke): "
                                                         "smaller same-coloured specks are nuclei or blood, not ink")
    min_saturation: int = Field(70, ge=0, le=255, description="saturation (0–255) a coloured marker pixel has at least")
    rim_um: float = Field(4.0, ge=0, description="the ink mask is widened by this, µm (a stroke's anti-aliased rim)")


def ink_candidates(rgb: np.ndarray, cfg: InkConfig) -> dict[str, np.ndarray]:
    """Per marker colour, the pixels of that colour (before the shape rule), on the 3 × 3 median of the overview."""
    import cv2

    hsv = cv2.cvtColor(cv2.medianBlur(np.ascontiguousarray(rgb), 3), cv2.COLOR_RGB2HSV)
    s = cfg.min_saturation
    ranges = {  # (H, S, V) lower and upper bounds, inclusive; OpenCV's hue is 0–179
        "green": [((35, s, 0), (94, 255, 234))],
        "blue": [((95, min(255, s + 30), 0), (124, 255, 255))],  # haematoxylin sits at ≥ 125, or is pale
        "black": [((0, 0, 0), (179, 109, 69))],  # neutral dark: stained tissue this dark keeps its colour
        "red": [((0, 150, 70), (8, 255, 255)), ((174, 150, 70), (179, 255, 255))],  # marker red; eosin is paler
    }
    out = {}
    for colour in cfg.colours:
        hit = cv2.inRange(hsv, *ranges[colour][0])
        for low, high in ranges[colour][1:]:
            hit |= cv2.inRange(hsv, low, high)
        out[colour] = hit > 0
    return out


def ink_mask(rgb: np.ndarray, px_um: float, cfg: InkConfig) -> np.ndarray:
    """Pen ink on an overview whose pixels are ``px_um`` µm wide: boolean, same shape as ``rgb``'s first two axes."""
    import cv2

    out = np.zeros(rgb.shape[:2], bool)
    if not cfg.enabled:
        return out
    min_px = cfg.min_area_um2 / px_um**2
    candidates = ink_candidates(rgb, cfg)
    # one labelling for the colours judged by size alone (a component may mix them: a blue stroke over a black
    # one is ink either way), one for red, which must also be a stroke; a colour with fewer candidate pixels
    # than one ink component needs is not labelled at all (the usual clean slide: no labelling)
    sized = [part for colour, part in candidates.items() if colour != "red" and part.sum() >= min_px]
    if sized:
        union = np.logical_or.reduce(sized)
        labels = cv2.connectedComponents(union.view(np.uint8), connectivity=8)[1]
        keep = np.bincount(labels[union]) >= min_px  # areas counted over the candidates only
        keep[0] = False
        if keep.any():
            out |= keep[labels]
    if "red" in candidates and candidates["red"].sum() >= min_px:
        n, labels, stats, _ = cv2.connectedComponentsWithStats(candidates["red"].view(np.uint8), connectivity=8)
        keep = np.zeros(n, bool)
        keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_px
        for label in np.flatnonzero(keep):  # a stroke, not a blob of blood: its area is many times its half-width²
            x, y, w, h = stats[label, :4]
            part = (labels[y:y + h, x:x + w] == label).astype(np.uint8)
            half_width = cv2.distanceTransform(np.pad(part, 1), cv2.DIST_L2, 3).max()
            keep[label] = stats[label, cv2.CC_STAT_AREA] >= 6 * half_width**2  # a disc: π
        out |= keep[labels]
    rim = int(round(cfg.rim_um / px_um))
    if rim > 0 and out.any():
        out = cv2.dilate(out.view(np.uint8), np.ones((2 * rim + 1, 2 * rim + 1), np.uint8)).astype(bool)
    return out


class BubbleConfig(BaseModel):
    """Thin structures on the glass (``tissue.bubbles``): the rim of an air bubble, a coverslip's edge, a fibre."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="exclude regions that are thin: bubble rims, coverslip edges, fibres "
                                            "(wsi.artefacts.thin_parts)")
    min_width_um: float = Field(120.0, gt=0, description="a region of which under a tenth lies farther than half this "
                                                         "(µm) from its edge is excluded; tissue strips narrower than "
                                                         "this go too (less than one 256-px tile at 0.5 µm/px)")


class FoldConfig(BaseModel):
    """Tissue folds (``tissue.folds``): flagged, not excluded (the tissue is there, doubled)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="flag folded tissue: where the optical density is ratio × the median of "
                                            "the slide's tissue")
    ratio: float = Field(1.6, gt=1, description="a fold's optical density over the median of the slide's tissue (a "
                                                "fold doubles the section: 2 in theory)")
    min_area_um2: float = Field(20_000.0, gt=0, description="smallest fold, µm²")


THIN_CORE_SHARE = 0.1  # a region with less of itself than this farther than half the width from its edge is thin


def thin_parts(labels: np.ndarray, area: np.ndarray, binary: np.ndarray, width_px: float) -> np.ndarray:
    """Per label of ``labels`` (``area``: each label's pixel count, 0 the background), whether it is thin: less
    than :data:`THIN_CORE_SHARE` of it is left by an erosion with a disc ``width_px`` across. A rim, an edge or a
    fibre is all border; where two of them cross, a disc fits, but only there (a bubble on a coverslip's edge),
    while a section of tissue is mostly core."""
    import cv2

    size = max(1, int(round(width_px)))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    core = cv2.erode(binary.view(np.uint8), disc, borderType=cv2.BORDER_CONSTANT, borderValue=0).view(bool)
    thin = np.bincount(labels[core], minlength=len(area)) < THIN_CORE_SHARE * area
    thin[0] = False
    return thin


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Summed optical density of R, G and B, −log10 of the transmitted share (float32): doubled tissue doubles it."""
    import cv2

    table = (-np.log10((np.arange(256, dtype=np.float32) + 1) / 256)).astype(np.float32)
    return cv2.LUT(np.ascontiguousarray(rgb), table).sum(axis=2, dtype=np.float32)


def fold_mask(rgb: np.ndarray, tissue: np.ndarray, px_um: float, cfg: FoldConfig) -> np.ndarray:
    """Folded tissue on an overview whose pixels are ``px_um`` µm wide, within the boolean ``tissue`` mask.

    A fold is the section lying on itself: about twice the optical density of the slide's tissue. Each tissue
    pixel's density, averaged over ~50 µm (the texture's scale, so a cluster of nuclei is not a fold), is
    compared with the median over all the tissue; components above ``min_area_um2`` count. A slide whose
    tissue is mostly fold, or a tumour twice as dense as the rest, is misjudged: folds are flagged, not dropped.
    """
    import cv2

    out = np.zeros(tissue.shape, bool)
    if not cfg.enabled or not tissue.any():
        return out
    weight = tissue.astype(np.float32)
    od = optical_density(rgb) * weight
    small = max(1, int(round(50 / px_um))) | 1
    local = cv2.blur(od, (small, small)) / np.maximum(cv2.blur(weight, (small, small)), 1e-6)
    candidate = tissue & (local > cfg.ratio * float(np.median(od[tissue])))
    if candidate.sum() * px_um**2 < cfg.min_area_um2:
        return out
    labels = cv2.connectedComponents(candidate.view(np.uint8), connectivity=8)[1]
    keep = np.bincount(labels[candidate]) * px_um**2 >= cfg.min_area_um2
    keep[0] = False
    return keep[labels] if keep.any() else out
