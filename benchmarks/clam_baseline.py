"""CLAM's create_patches_fp segmentation and patching, re-implemented from its published algorithm as a baseline.

Segmentation (``WholeSlideImage.segmentTissue``): the whole segmentation level read at once, RGB→HSV,
``cv2.medianBlur`` of the saturation, binary threshold at ``sthresh``, ``cv2.morphologyEx`` closing,
``cv2.findContours(RETR_CCOMP)``, contours kept when their area minus their holes' exceeds ``a_t``
(holes: at most ``max_n_holes``, largest first, above ``a_h``), scaled to level 0. Patching
(``process_contour`` with the default ``four_pt`` check): a level-0 grid over each contour's
bounding box, a patch kept when any of four points around its centre is inside the contour and its
centre is in no hole (``cv2.pointPolygonTest``), one candidate at a time as CLAM's pool workers do.
Only for benchmarks: the product's tissue stage is ``wsi.tissue``.
"""

from __future__ import annotations

import cv2
import numpy as np

REF_PATCH = 512


def clam_segment(rgb: np.ndarray, scale: tuple[float, float], *, sthresh=8, mthresh=7, close=4, a_t=16, a_h=4,
                 max_n_holes=8) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """(tissue contours, holes per contour) at level 0, from the RGB of the segmentation level."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    blurred = cv2.medianBlur(hsv[:, :, 1], mthresh)
    _, binary = cv2.threshold(blurred, sthresh, 255, cv2.THRESH_BINARY)
    if close > 0:
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, np.ones((close, close), np.uint8))
    unit = int(REF_PATCH**2 / (scale[0] * scale[1]))
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return [], []
    hierarchy = hierarchy[0][:, 2:]  # (first child, parent)
    tissue, holes = [], []
    for index in np.flatnonzero(hierarchy[:, 1] == -1):
        children = np.flatnonzero(hierarchy[:, 1] == index)
        areas = [cv2.contourArea(contours[c]) for c in children]
        area = cv2.contourArea(contours[index]) - sum(areas)
        if area == 0 or area <= a_t * unit:
            continue
        kept = sorted(zip(areas, children.tolist()), reverse=True)[:max_n_holes]
        tissue.append(contours[index])
        holes.append([contours[c] for a, c in kept if a > a_h * unit])
    factor = np.array(scale, np.float64)
    scaled = [np.asarray(c * factor, np.int32) for c in tissue]
    return scaled, [[np.asarray(h * factor, np.int32) for h in hs] for hs in holes]


def clam_patch(contours: list[np.ndarray], holes: list[list[np.ndarray]], dimensions: tuple[int, int],
               patch: int = 512) -> np.ndarray:
    """Level-0 (x, y) of the patches CLAM's four_pt rule keeps (N × 2)."""
    coords = []
    shift = int(patch // 2 * 0.5)
    for contour, contour_holes in zip(contours, holes):
        x0, y0, w, h = cv2.boundingRect(contour)
        stop_x, stop_y = min(x0 + w, dimensions[0] - patch + 1), min(y0 + h, dimensions[1] - patch + 1)
        for y in range(y0, stop_y, patch):
            for x in range(x0, stop_x, patch):
                cx, cy = x + patch // 2, y + patch // 2
                points = ((cx - shift, cy - shift), (cx + shift, cy + shift), (cx + shift, cy - shift), (cx - shift, cy + shift))
                if not any(cv2.pointPolygonTest(contour, (float(px), float(py)), False) >= 0 for px, py in points):
                    continue
                centre = (float(x + patch / 2), float(y + patch / 2))
                if any(cv2.pointPolygonTest(hole, centre, False) > 0 for hole in contour_holes):
                    continue
                coords.append((x, y))
    return np.asarray(coords, np.int64).reshape(-1, 2)
