"""Artefacts on real glass, found on the tissue stage's overview: pathologists' pen ink, thin structures on the
glass (bubble rims, coverslip edges, fibres) and tissue folds.

Ink is found by colour and by shape. Marker colours that H&E never shows at overview scale (green,
saturated blue, neutral black) or shows only in small amounts (saturated red: blood) are candidates.
Only coherent components above a physical area count as ink: a stroke is millimetres long, while
haematoxylin-dark nuclei and red cells are specks of a few µm that the overview averages into the
tissue colour. A red or black candidate must also be a stroke, elongated rather than a blob, so a
haemorrhage or a deposit of dark pigment (anthracosis, melanin) is not ink. The ink mask is widened
by a few pixels for the anti-aliased rim of a stroke. The hue bands are OpenCV's (0–180); H&E's
stains sit at 125–180 and 0–8 (measured on the H&E and IHC textures the demo uses).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
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


STROKES = ("red", "black")  # marker colours that must be strokes: blood is a red blob, pigment a black one


def strokes(candidate: np.ndarray, min_px: float) -> np.ndarray:
    """The components of ``candidate`` of at least ``min_px`` pixels that are strokes: long for their width (area
    ≥ 6 × the largest inscribed half-width², which a disc, at π, is not; a circle drawn in marker is)."""
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(candidate.view(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_px
    for label in np.flatnonzero(keep):
        x, y, w, h = stats[label, :4]
        part = (labels[y:y + h, x:x + w] == label).astype(np.uint8)
        half_width = cv2.distanceTransform(np.pad(part, 1), cv2.DIST_L2, 3).max()
        keep[label] = stats[label, cv2.CC_STAT_AREA] >= 6 * half_width**2
    out = np.zeros(candidate.shape, bool)
    out[candidate] = keep[labels[candidate]]
    return out


def ink_mask(rgb: np.ndarray, px_um: float, cfg: InkConfig, reduced: np.ndarray | None = None) -> np.ndarray:
    """Pen ink on an overview whose pixels are ``px_um`` µm wide: boolean, same shape as ``rgb``'s first two axes,
    widened by ``rim_um`` (a stroke's anti-aliased rim).

    Looked for first on the overview reduced by :func:`reduction` (``reduced``: that image, when the caller has
    it), as a stroke is tens of µm wide at least: a clean slide costs no full-size pass. Where ink is found, it
    is judged again on ``rgb``'s own pixels, over the box around it, so its edge is the overview's."""
    import cv2

    out = np.zeros(rgb.shape[:2], bool)
    if not cfg.enabled:
        return out
    factor = reduction(px_um)
    if factor == 1:
        return widen(judge_ink(rgb, px_um, cfg), int(round(cfg.rim_um / px_um)))
    found = judge_ink(reduce_by(rgb, factor) if reduced is None else reduced, px_um * factor, cfg)
    if not found.any():
        return out
    x, y, w, h = cv2.boundingRect(found.view(np.uint8))
    margin = 2 * factor  # the reduced pixels' reach, and a stroke's edge the reduction blended into its neighbours
    x0, y0 = max(0, x * factor - margin), max(0, y * factor - margin)
    x1, y1 = min(out.shape[1], (x + w) * factor + margin), min(out.shape[0], (y + h) * factor + margin)
    out[y0:y1, x0:x1] = judge_ink(rgb[y0:y1, x0:x1], px_um, cfg)
    return widen(out, int(round(cfg.rim_um / px_um)))


def judge_ink(rgb: np.ndarray, px_um: float, cfg: InkConfig) -> np.ndarray:
    """Pen ink on an overview of ``px_um`` µm/px, at its own pixels: marker-coloured components big enough, and for
    red and black, strokes (not widened)."""
    import cv2

    out = np.zeros(rgb.shape[:2], bool)
    min_px = cfg.min_area_um2 / px_um**2
    candidates = ink_candidates(rgb, cfg)
    # one labelling for the colours judged by size alone (a component may mix them: a blue stroke over a green
    # one is ink either way); red and black must also be strokes, as blood and dark pigment (anthracosis,
    # melanin) come in blobs, judged with the ink already found, so the pieces of a red stroke that a green
    # (or black) one crosses are judged as the drawing they belong to; a colour with fewer candidate pixels
    # than one ink component needs is not labelled at all (the usual clean slide: no labelling)
    sized = [part for colour, part in candidates.items() if colour not in STROKES and np.count_nonzero(part) >= min_px]
    if sized:
        union = np.logical_or.reduce(sized)
        labels = cv2.connectedComponents(union.view(np.uint8), connectivity=8)[1]
        keep = np.bincount(labels[union]) >= min_px  # areas counted over the candidates only
        keep[0] = False
        if keep.any():
            out[union] = keep[labels[union]]  # gathered over the candidates only: 3× faster than the whole image
    stroke_colours = [candidates[c] for c in STROKES if c in candidates and np.count_nonzero(candidates[c]) >= min_px]
    if stroke_colours:  # judged as strokes with the ink found: a red stroke cut by a green one leaves stubs, not blobs
        marked = np.logical_or.reduce(stroke_colours)
        out |= strokes(marked | out, min_px) & marked
    return out


def widen(mask: np.ndarray, by: int) -> np.ndarray:
    """A boolean mask grown by ``by`` pixels (a square of side 2·by + 1); grown within its bounding box and ``by``
    around it, as nothing beyond that changes (a pen line's mask grown by 50 µm: 3.6 → 0.6 ms on a 16× overview)."""
    import cv2

    if by <= 0 or not mask.any():
        return mask
    x, y, w, h = cv2.boundingRect(np.ascontiguousarray(mask).view(np.uint8))
    x0, y0, x1, y1 = max(0, x - by), max(0, y - by), min(mask.shape[1], x + w + by), min(mask.shape[0], y + h + by)
    out = np.zeros(mask.shape, bool)
    box = np.ascontiguousarray(mask[y0:y1, x0:x1]).view(np.uint8)
    out[y0:y1, x0:x1] = cv2.dilate(box, np.ones((2 * by + 1, 2 * by + 1), np.uint8)).view(bool)
    return out


class BubbleConfig(BaseModel):
    """Thin structures on the glass (``tissue.bubbles``): the rim of an air bubble, a coverslip's edge, a fibre."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="exclude regions that are thin: bubble rims, coverslip edges, fibres "
                                            "(wsi.artefacts.thin_parts)")
    min_width_um: float = Field(120.0, gt=0, description="a region of which under a tenth lies farther than half this "
                                                         "(µm) from its edge, and whose area is at least 6 × its "
                                                         "largest inscribed radius squared (long), is excluded; long "
                                                         "tissue strips narrower than this go too (less than one "
                                                         "256-px tile at 0.5 µm/px)")


class FoldConfig(BaseModel):
    """Tissue folds (``tissue.folds``): flagged, not excluded (the tissue is there, doubled)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="flag folded tissue: where the optical density is ratio × that of the "
                                            "slide's stained tissue (wsi.artefacts.fold_mask)")
    ratio: float = Field(1.6, gt=1, description="a fold's optical density over the slide's stained tissue's (its "
                                                "median without the pale parts; a fold doubles the section: 2 in "
                                                "theory)")
    min_area_um2: float = Field(20_000.0, gt=0, description="smallest fold, µm²")


THIN_CORE_SHARE = 0.1  # a region with less of itself than this farther than half the width from its edge is thin
JUDGED_AT_UM = 8.0  # ink, bubbles and folds are judged on the overview reduced to about this many µm per pixel


def reduction(px_um: float) -> int:
    """The integer factor that brings an overview of ``px_um`` µm/px near :data:`JUDGED_AT_UM` (1: already there).
    A 40× scan masked at 16× (4 µm/px) is judged at 8 µm/px: 4× fewer pixels, and a marker's stroke, a rim or a
    fold (≥ 50 µm) still several pixels wide."""
    return max(1, int(JUDGED_AT_UM // px_um))


def reduce_by(image: np.ndarray, factor: int) -> np.ndarray:
    """``image`` averaged over ``factor`` × ``factor`` blocks; a last partial row or column of blocks is left out.
    On a whole number of blocks OpenCV's area resize takes its fast path: 8× faster than with a fractional one.
    At factor 1, ``image`` itself (not a copy: callers only read it)."""
    import cv2

    h, w = image.shape[:2]
    if factor == 1:
        return image
    rows, cols = max(1, h // factor), max(1, w // factor)
    whole = np.ascontiguousarray(image[:rows * factor, :cols * factor])
    return cv2.resize(whole, (cols, rows), interpolation=cv2.INTER_AREA)


def expand_by(mask: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask of :func:`reduce_by`'s blocks drawn back on ``shape``: each pixel its block's value, the left
    out last rows and columns their neighbours'."""
    import cv2

    rows, cols = mask.shape
    big = cv2.resize(mask.view(np.uint8), (cols * factor, rows * factor), interpolation=cv2.INTER_NEAREST)
    big = big[:shape[0], :shape[1]]  # an overview smaller than one block was reduced to one block
    bottom, right = shape[0] - big.shape[0], shape[1] - big.shape[1]
    if bottom or right:
        big = cv2.copyMakeBorder(big, 0, bottom, 0, right, cv2.BORDER_REPLICATE)
    return np.ascontiguousarray(big).view(bool)


def thin_parts(labels: np.ndarray, area: np.ndarray, width_px: float, factor: int = 1,
               among: np.ndarray | None = None) -> np.ndarray:
    """Per label of ``labels`` (``area``: each label's pixel count, 0 the background), whether it is thin: less
    than :data:`THIN_CORE_SHARE` of it is left by an erosion with a disc ``width_px`` across, and it is long,
    its area at least 6 × its largest inscribed radius squared (a disc's is π×). A rim, an edge or a fibre is all
    border and long; where two of them cross, a disc fits, but only there (a bubble on a coverslip's edge);
    a section of tissue is mostly core, and a compact fragment just about the disc's width is not long.
    Judged on every ``factor``-th pixel of the labels (:func:`reduction`); only the labels ``among`` marks (a bool
    per label, e.g. the regions big enough to keep) when given, the others are not thin."""
    import cv2

    small = labels[::factor, ::factor]
    binary = (small > 0).view(np.uint8)
    size = max(1, int(round(width_px / factor)))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    core = cv2.erode(binary, disc, borderType=cv2.BORDER_CONSTANT, borderValue=0).view(bool)
    thin = np.bincount(small[core], minlength=len(area)) * factor**2 < THIN_CORE_SHARE * area
    thin[0] = False
    if among is not None:
        thin &= among
    if not thin.any():
        return thin
    judged = thin[small]  # the candidates' pixels only (a per-label maximum by sorting took 0.26 s)
    labels = small[judged]
    sampled = np.zeros(len(area), bool)
    sampled[labels] = True
    thin &= sampled  # a region between the samples is not judged
    candidates = np.flatnonzero(thin)
    if len(candidates):
        # depth within the candidates' box and a margin around it: the box's edge is taken as background, which
        # is farther than the disc's width from every candidate pixel, so no depth that decides thinness moves
        # (a neighbour region the sampling joined to a candidate is beyond the box's own background otherwise)
        x, y, w, h = cv2.boundingRect(judged.view(np.uint8))
        m = 1 + size
        x0, y0, x1, y1 = max(0, x - m), max(0, y - m), min(small.shape[1], x + w + m), min(small.shape[0], y + h + m)
        depth = cv2.distanceTransform(np.pad(binary[y0:y1, x0:x1], 1), cv2.DIST_L2, 3)[1:-1, 1:-1] * factor
        radius = np.zeros(len(area), np.float64)
        np.maximum.at(radius, labels, depth[judged[y0:y1, x0:x1]])
        thin[candidates] = area[candidates] >= 6 * radius[candidates] ** 2
    return thin


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Summed optical density of R, G and B, −log10 of the transmitted share (float32): doubled tissue doubles it."""
    import cv2

    table = (-np.log10((np.arange(256, dtype=np.float32) + 1) / 256)).astype(np.float32)
    per_channel = cv2.LUT(np.ascontiguousarray(rgb), table)
    return cv2.transform(per_channel, np.ones((1, 3), np.float32)).reshape(rgb.shape[:2])  # the channels' sum, fast


STAINED_OD = 0.15  # summed optical density below which a pixel is glass or nearly (glass: ~0.06), not a reference


def stained_density(values: np.ndarray, pale: float = 0.6, rounds: int = 3) -> float:
    """The typical density of a slide's stained tissue: the median, recomputed ``rounds`` times without the values
    paler than ``pale`` × it. Pale fat, faint stroma or a weakly stained region would otherwise pull a plain
    median down until ordinary tissue looks twice as dense (a fold); a fold itself is a minority and barely
    moves a median. The values are sorted once: each round keeps a tail of them, whose median is its middle
    (``np.median``'s own arithmetic; 3 ms against 21 for a median per round, at 470,000 values)."""
    ordered = np.sort(np.asarray(values), axis=None)

    def median(start: int) -> float:
        tail = ordered[start:]
        mid = len(tail) // 2
        return float(tail[mid]) if len(tail) % 2 else float(np.mean(tail[mid - 1:mid + 1]))

    start, reference = 0, median(0)
    for _ in range(rounds):  # the reference only rises, so each round's tail is within the last one's
        bound = pale * reference  # compared in the values' own float type, as ``values >= bound`` does
        first = int(np.searchsorted(ordered, ordered.dtype.type(bound) if ordered.dtype.kind == "f" else bound))
        if first == len(ordered) or first == start:  # none left, or none dropped: the median stands
            break
        start, reference = first, median(first)
    return reference


def fold_mask(rgb: np.ndarray, tissue: np.ndarray, px_um: float, cfg: FoldConfig,
              reduced: np.ndarray | None = None) -> np.ndarray:
    """Folded tissue on an overview whose pixels are ``px_um`` µm wide, within the boolean ``tissue`` mask.

    A fold is the section lying on itself: about twice the optical density of the slide's tissue. Each tissue
    pixel's density, averaged over ~100 µm (beyond the texture's scale, so a cluster of nuclei is not a fold,
    within a fold's width), is compared with the slide's stained tissue (:func:`stained_density` of the pixels
    above :data:`STAINED_OD`, so glass inside a generous mask is no reference): folds are where it exceeds
    ``ratio``, grown into the pixels around them above halfway to it (a fold's edge is blurred by the
    average); components above ``min_area_um2`` count. Judged on the overview reduced by :func:`reduction`
    (``reduced``: that image, when the caller has it). A slide mostly fold, or a tumour twice as dense as the
    rest, is misjudged: folds are flagged, not dropped, unless ``tiling.max_fold_fraction`` asks.
    """
    import cv2
    from skimage.filters import apply_hysteresis_threshold

    out = np.zeros(tissue.shape, bool)
    if not cfg.enabled or not tissue.any():
        return out
    factor = reduction(px_um)
    if factor > 1:  # judged on the reduced overview (:func:`reduction`), drawn back on the mask's pixels
        small = reduce_by(tissue.view(np.uint8) * np.uint8(255), factor) >= 128
        folds = fold_mask(reduce_by(rgb, factor) if reduced is None else reduced, small, px_um * factor, cfg)
        return expand_by(folds, factor, tissue.shape) & tissue if folds.any() else out
    window = max(1, int(round(100 / px_um))) | 1
    x, y, w, h = cv2.boundingRect(np.ascontiguousarray(tissue).view(np.uint8))
    x0, y0 = max(0, x - window), max(0, y - window)
    x1, y1 = min(tissue.shape[1], x + w + window), min(tissue.shape[0], y + h + window)
    if (x0, y0, x1, y1) != (0, 0, tissue.shape[1], tissue.shape[0]):  # judged within the tissue's box and a window
        out[y0:y1, x0:x1] = fold_mask(rgb[y0:y1, x0:x1], tissue[y0:y1, x0:x1], px_um, cfg)  # around it: the same
        return out  # averages over the tissue, as the box's edge is farther than half a window from every pixel of it
    weight = tissue.astype(np.float32)
    od = optical_density(rgb) * weight
    local = cv2.blur(od, (window, window)) / np.maximum(cv2.blur(weight, (window, window)), 1e-6)
    stained = local[tissue]
    stained = stained[stained >= STAINED_OD]
    if not len(stained):
        return out
    ratio = np.where(tissue, local / stained_density(stained), 0)
    if not (ratio > cfg.ratio).any():
        return out
    candidate = apply_hysteresis_threshold(ratio, 1 + (cfg.ratio - 1) / 2, cfg.ratio) & tissue
    labels = cv2.connectedComponents(candidate.view(np.uint8), connectivity=8)[1]
    keep = np.bincount(labels[candidate]) * px_um**2 >= cfg.min_area_um2
    keep[0] = False
    return keep[labels] if keep.any() else out
