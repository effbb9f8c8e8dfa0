"""The layout of a synthetic demo slide: a label map of glass, tissue islands with holes, tumour (whole or in
focal lesions of an exact share of the tissue), pen marks and debris, drawn by :mod:`wsi.demo_cohort`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from wsi.demo_artefacts import FAINT, INK

BACKGROUND, TISSUE, TUMOUR, PEN_MARK, DEBRIS_SPECK = 0, 1, 2, 3, 4


@dataclass
class SlideLayout:
    """Label map of one synthetic slide at ``downsample`` level-0 pixels per layout pixel."""

    labels: np.ndarray  # uint8 codes BACKGROUND..DEBRIS_SPECK, then wsi.demo_artefacts' (ink)
    downsample: int
    height: int  # level-0
    width: int
    blur: np.ndarray | None = None  # bool, same grid: rendered out of focus (wsi.demo_artefacts.draw_blur)
    fold: np.ndarray | None = None  # bool, same grid: tissue lying on itself (wsi.demo_artefacts.draw_fold)
    stain: str = "he"  # "ihc": the tissue is the immunohistochemistry texture (DAB brown on haematoxylin blue)

    @property
    def tissue_mask(self) -> np.ndarray:
        return np.isin(self.labels, (TISSUE, TUMOUR, FAINT))

    @property
    def tumour_mask(self) -> np.ndarray:
        return self.labels == TUMOUR

    @property
    def ink_mask(self) -> np.ndarray:
        return np.isin(self.labels, list(INK))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-9)


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float, angle: float) -> np.ndarray:
    """Normalised elliptical distance (1 on the boundary) over the layout grid."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = (c * dx + s * dy) / rx, (-s * dx + c * dy) / ry
    return np.sqrt(u * u + v * v)


def focal_tumour(rng: np.random.Generator, tissue: np.ndarray, fraction: float, foci: int, noise: np.ndarray) -> np.ndarray:
    """A tumour mask of ``foci`` irregular ellipses covering ``fraction`` of ``tissue`` (to a layout pixel).

    Centres are drawn inside the tissue, apart from each other where the tissue allows; each focus gets a
    relative size and shape. The common radius scale is then the ``fraction`` quantile of every tissue
    pixel's smallest (noise-perturbed) elliptical distance to a centre, so the area is exact and the foci
    stay compact whatever the tissue's shape.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"tumour fraction must be between 0 and 1, got {fraction}")
    if foci < 1:
        raise ValueError(f"foci must be at least 1, got {foci}")
    shape = tissue.shape
    radius = np.sqrt(fraction * tissue.sum() / foci / np.pi)  # of one circular focus of the mean size
    depth = ndimage.distance_transform_edt(tissue)
    candidates = np.argwhere(depth > min(0.6 * radius, 0.5 * depth.max()))
    centres: list[np.ndarray] = []
    for _ in range(foci):
        pick = candidates[rng.integers(len(candidates))]
        for _ in range(50):  # apart from the foci already placed, if the tissue has room
            if all(np.hypot(*(pick - c)) > 2.5 * radius for c in centres):
                break
            pick = candidates[rng.integers(len(candidates))]
        centres.append(pick)
    distance = np.full(shape, np.inf, np.float32)
    for cy, cx in centres:
        size = rng.uniform(0.7, 1.3)
        aspect = rng.uniform(0.7, 1.3)
        ellipse = _ellipse(shape, cy, cx, size, size * aspect, rng.uniform(0, np.pi))
        np.minimum(distance, ellipse / np.maximum(1 - 0.15 * noise, 0.2), out=distance)
    scale = np.quantile(distance[tissue], fraction)
    return tissue & (distance <= scale)


def make_layout(rng: np.random.Generator, height: int, width: int, positive: bool,
                tumour_fraction: float | None = None, foci: int | None = None) -> SlideLayout:
    """Draw tissue islands, holes, tumour, pen and debris for one slide.

    By default a positive slide carries one or two large tumour regions; ``tumour_fraction`` instead plants
    ``foci`` (default 1) focal lesions covering exactly that share of the tissue, as real focal cancers are.
    """
    ds = 8
    while width / ds > 1536:
        ds *= 2
    shape = (int(np.ceil(height / ds)), int(np.ceil(width / ds)))
    h, w = shape
    unit = min(h, w)
    noise = _smooth_noise(rng, shape, sigma=unit * 0.05)
    tissue = np.zeros(shape, bool)
    for _ in range(int(rng.integers(2, 4))):
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.2, 0.8) * w
        ry, rx = rng.uniform(0.15, 0.25) * unit, rng.uniform(0.18, 0.3) * unit
        tissue |= _ellipse(shape, cy, cx, ry, rx, rng.uniform(0, np.pi)) + 0.2 * noise < 1.0
    margin = int(0.06 * unit)
    tissue[:margin] = tissue[-margin:] = False
    tissue[:, :margin] = tissue[:, -margin:] = False
    tissue = ndimage.binary_opening(tissue, iterations=2)

    labels = np.where(tissue, TISSUE, BACKGROUND).astype(np.uint8)
    depth = ndimage.distance_transform_edt(tissue)
    for _ in range(int(rng.integers(1, 4))):  # holes well inside the tissue
        r = rng.uniform(0.06, 0.08) * unit
        candidates = np.argwhere((depth > 2.2 * r) & (labels == TISSUE))
        if len(candidates) == 0:
            break
        cy, cx = candidates[rng.integers(len(candidates))]
        hole = _ellipse(shape, cy, cx, r, r * rng.uniform(0.8, 1.4), rng.uniform(0, np.pi)) < 1.0
        labels[hole] = BACKGROUND
        depth[ndimage.binary_dilation(hole, iterations=int(2 * r))] = 0
    if positive and tumour_fraction is not None:
        labels[focal_tumour(rng, labels == TISSUE, tumour_fraction, foci or 1, noise)] = TUMOUR
    elif positive:
        depth = ndimage.distance_transform_edt(labels == TISSUE)
        for _ in range(int(foci or rng.integers(1, 3))):
            r = rng.uniform(0.08, 0.12) * unit
            candidates = np.argwhere(depth > 0.6 * r)
            if len(candidates) == 0:
                candidates = np.argwhere(labels == TISSUE)
            cy, cx = candidates[rng.integers(len(candidates))]
            blob = _ellipse(shape, cy, cx, r, r * rng.uniform(0.7, 1.3), rng.uniform(0, np.pi)) + 0.15 * noise < 1.0
            labels[blob & (labels == TISSUE)] = TUMOUR

    near_tissue = ndimage.binary_dilation(tissue, iterations=max(2, int(0.03 * unit)))
    t = np.linspace(0, 1, 400)  # a thin pen stroke along one side of the glass
    ys = (0.15 + 0.7 * t) * h
    xs = (0.06 + 0.03 * np.sin(6 * t + rng.uniform(0, 6))) * w
    pen = np.zeros(shape, bool)
    pen[np.clip(ys.astype(int), 0, h - 1), np.clip(xs.astype(int), 0, w - 1)] = True
    pen = ndimage.binary_dilation(pen, iterations=max(1, int(12 / ds)))  # ~3 layout px (24 level-0 px) wide
    labels[pen & ~near_tissue] = PEN_MARK
    for _ in range(12):  # debris specks smaller than any tissue threshold
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        speck = _ellipse(shape, cy, cx, max(1.0, 0.004 * unit), max(1.0, 0.006 * unit), rng.uniform(0, np.pi)) < 1.0
        labels[speck & ~near_tissue & (labels == BACKGROUND)] = DEBRIS_SPECK
    return SlideLayout(labels, ds, height, width)
