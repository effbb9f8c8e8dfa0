"""Artefacts for demo and test slides, each with its truth: pathologists' pen ink (strokes and a circle),
out-of-focus fields, faint (pale-stained) tissue, air bubbles and a coverslip edge on the glass, and folds.

Drawn into a :class:`wsi.demo_layout.SlideLayout`'s label map after the tissue, with their own random
generator, so a slide without artefacts is the same slide as before and one with them differs only
where they are.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# label codes after wsi.demo_cohort's (0–4), with the RGB the renderer blends over what lies beneath
INK = {5: ("blue", (35, 70, 170)), 6: ("green", (30, 125, 60)), 7: ("black", (32, 30, 36)), 8: ("red", (190, 32, 42))}
INK_OPACITY = 0.85  # markers are translucent: a little of the tissue shows through
ARTEFACTS = ("ink", "blur", "faint", "ihc", "bubbles", "fold")  # ihc: not an artefact, the stain (the tissue as IHC)
BUBBLE = 10  # label code: a bubble's rim or the coverslip's edge, on the glass
BUBBLE_RGB = (128, 112, 98)  # the grey-brown of a refracting rim (saturation ~60: CLAM's thresholds take it as tissue)
FAINT = 9  # label code: tissue stained so pale it is barely off the glass (fat, sparse stroma, a faded slide)
FAINT_STRENGTH = 0.3  # the share of the stain that remains
GLASS_RGB = (244, 242, 245)
BLUR_SIGMA_UM = 3.0  # an out-of-focus field: fine detail (nuclear edges) gone, tissue architecture kept
MPP = 0.25  # the demo's level-0 µm/px


def _stroke(shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray, half_width: int) -> np.ndarray:
    h, w = shape
    line = np.zeros(shape, bool)
    line[np.clip(ys.astype(int), 0, h - 1), np.clip(xs.astype(int), 0, w - 1)] = True
    return ndimage.binary_dilation(line, structure=np.ones((3, 3), bool), iterations=max(1, half_width))


def draw_ink(rng: np.random.Generator, labels: np.ndarray, tissue: np.ndarray, layout_um: float,
             colours: int = 2) -> np.ndarray:
    """Pen marks into ``labels`` (in place): ``colours`` strokes of different marker colours across the slide,
    over glass and tissue alike, and a circle around part of the tissue, as pathologists mark a lesion.
    ``layout_um``: µm per layout pixel. Strokes are 100 µm wide, a fine marker's line, or 2 % of the slide's
    shorter side if that is wider. Returns the ink mask."""
    h, w = labels.shape
    unit = min(h, w)
    half = max(1, round(0.01 * unit), round(50 / layout_um))
    codes = rng.choice(list(INK), size=min(colours, len(INK)), replace=False)
    t = np.linspace(0, 1, 4 * max(h, w))
    for code in codes:
        y0, y1 = rng.uniform(0.1, 0.9, size=2) * h
        phase, amp = rng.uniform(0, 2 * np.pi), rng.uniform(0.02, 0.08) * h
        xs = (0.08 + 0.84 * t) * w
        ys = y0 + (y1 - y0) * t + amp * np.sin(3 * np.pi * t + phase)
        labels[_stroke(labels.shape, ys, xs, half)] = code
    candidates = np.argwhere(tissue)
    if len(candidates):
        cy, cx = candidates[rng.integers(len(candidates))]
        r = rng.uniform(0.15, 0.25) * unit
        angle = np.linspace(0, 2 * np.pi, 8 * int(r) + 8)
        ring = _stroke(labels.shape, cy + r * np.sin(angle), cx + 1.2 * r * np.cos(angle), half)
        labels[ring] = int(rng.choice(list(INK)))
    return np.isin(labels, list(INK))


def paint_ink(out: np.ndarray, labels: np.ndarray) -> None:
    """Blend each marker colour over the rendered pixels (float RGB, in place) where its label is."""
    for code, (_, rgb) in INK.items():
        where = labels == code
        if where.any():
            out[where] = (1 - INK_OPACITY) * out[where] + INK_OPACITY * np.asarray(rgb, np.float32)


def draw_blur(rng: np.random.Generator, tissue: np.ndarray, patches: int = 2) -> np.ndarray:
    """Out-of-focus fields: ``patches`` ellipses centred in the tissue, each 15–25 % of the slide's shorter side
    across. Returns the blur mask (the renderer blurs what lies there, tissue and glass alike)."""
    h, w = tissue.shape
    unit = min(h, w)
    yy, xx = np.mgrid[:h, :w]
    blur = np.zeros((h, w), bool)
    candidates = np.argwhere(tissue)
    for _ in range(patches if len(candidates) else 0):
        cy, cx = candidates[rng.integers(len(candidates))]
        ry, rx = rng.uniform(0.15, 0.25, size=2) * unit / 2
        blur |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return blur


def blurred_window(render, level: int, y0: int, x0: int, h: int, w: int, downsample: int) -> np.ndarray:
    """``render``'s window, Gaussian-blurred by :data:`BLUR_SIGMA_UM` (in that level's pixels), rendered with a
    margin so the blur near the window's edge sees real neighbours."""
    import cv2

    sigma = BLUR_SIGMA_UM / (MPP * downsample)
    if sigma < 0.3:  # a coarse level: the blur is below a pixel
        return render(level, y0, x0, h, w)
    margin = int(np.ceil(3 * sigma))
    big = render(level, y0 - margin, x0 - margin, h + 2 * margin, w + 2 * margin)
    return cv2.GaussianBlur(big, (0, 0), sigma)[margin:margin + h, margin:margin + w]


def draw_faint(rng: np.random.Generator, labels: np.ndarray, tissue_code: int, share: float = 0.5) -> np.ndarray:
    """Make the tissue (label ``tissue_code``) within an ellipse covering about ``share`` of it faint (label
    :data:`FAINT`): pale fat and sparse stroma that a fixed saturation threshold loses. Returns the faint mask."""
    tissue = labels == tissue_code
    candidates = np.argwhere(tissue)
    if not len(candidates):
        return np.zeros(labels.shape, bool)
    h, w = labels.shape
    yy, xx = np.mgrid[:h, :w]
    cy, cx = candidates[rng.integers(len(candidates))]
    radius = np.sqrt(share * tissue.sum() / np.pi) * 1.3
    faint = tissue & (((yy - cy) / radius) ** 2 + ((xx - cx) / (1.2 * radius)) ** 2 <= 1)
    labels[faint] = FAINT
    return faint


def paint_faint(out: np.ndarray, labels: np.ndarray) -> None:
    """Fade the stain of faint tissue towards the glass (float RGB, in place)."""
    where = labels == FAINT
    if where.any():
        out[where] = FAINT_STRENGTH * out[where] + (1 - FAINT_STRENGTH) * np.asarray(GLASS_RGB, np.float32)


def draw_bubbles(rng: np.random.Generator, labels: np.ndarray, tissue: np.ndarray, layout_um: float,
                 bubbles: int = 3) -> np.ndarray:
    """Air bubbles and a coverslip edge into ``labels`` (in place), on the glass only: up to ``bubbles`` rings apart,
    of radius 4–8 % of the shorter side and at least 3× their rim, and a band along one long side, each 50–90 µm
    wide (rims and edges a
    scanner sees as dark refracting lines). Placed clear of the tissue (a rim over tissue hides tissue, which
    a mask cannot tell). Returns their mask."""
    h, w = labels.shape
    unit = min(h, w)
    clear = ~ndimage.binary_dilation(tissue, iterations=max(2, round(200 / layout_um)))
    yy, xx = np.mgrid[:h, :w]
    drawn = np.zeros((h, w), bool)
    candidates = np.argwhere(clear)
    for _ in range(bubbles if len(candidates) else 0):
        cy, cx = candidates[rng.integers(len(candidates))]
        width = rng.uniform(50, 90) / layout_um
        r = max(rng.uniform(0.04, 0.08) * unit, rng.uniform(3, 5) * width)  # a rim, not a disc
        distance = np.hypot(yy - cy, (xx - cx) / rng.uniform(0.8, 1.2))
        if (drawn & (distance <= r + width)).any():
            continue  # bubbles apart: two overlapping rims would enclose a blob of neither
        drawn |= np.abs(distance - r) <= width / 2
    edge_y = rng.uniform(0.02, 0.05) * h
    if rng.random() < 0.5:
        edge_y = h - 1 - edge_y
    wave = edge_y + 0.01 * h * np.sin(np.linspace(0, 2 * np.pi, w) + rng.uniform(0, 2 * np.pi))
    drawn |= np.abs(yy - wave[None, :]) <= rng.uniform(50, 90) / layout_um / 2
    drawn &= clear
    labels[drawn] = BUBBLE
    return drawn


def paint_bubbles(out: np.ndarray, labels: np.ndarray) -> None:
    """Darken the glass where a rim or edge is (float RGB, in place)."""
    where = labels == BUBBLE
    if where.any():
        out[where] = 0.2 * out[where] + 0.8 * np.asarray(BUBBLE_RGB, np.float32)


def draw_fold(rng: np.random.Generator, tissue: np.ndarray, layout_um: float, folds: int = 1) -> np.ndarray:
    """Folds: ``folds`` curved bands 150–300 µm wide and about half the tissue's extent long, through the tissue.
    Returns the fold mask (the renderer squares the transmitted light there: the section lies on itself)."""
    h, w = tissue.shape
    fold = np.zeros((h, w), bool)
    candidates = np.argwhere(tissue)
    if not len(candidates):
        return fold
    extent = np.ptp(candidates, axis=0).max()
    for _ in range(folds):
        cy, cx = candidates[rng.integers(len(candidates))]
        angle, bend = rng.uniform(0, np.pi), rng.uniform(-0.3, 0.3)
        t = np.linspace(-0.25, 0.25, 4 * max(h, w)) * extent
        ys = cy + t * np.sin(angle) + bend * t**2 / extent
        xs = cx + t * np.cos(angle)
        half = max(1, round(rng.uniform(75, 150) / layout_um))
        fold |= _stroke((h, w), ys, xs, half)
    return fold & tissue
