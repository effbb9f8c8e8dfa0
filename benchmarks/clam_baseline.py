"""CLAM's create_patches_fp segmentation and patching, re-implemented from its published algorithm as a baseline.

Segmentation (``WholeSlideImage.segmentTissue``): the whole segmentation level read at once, RGB→HSV,
``cv2.medianBlur`` of the saturation, binary threshold at ``sthresh``, ``cv2.morphologyEx`` closing,
``cv2.findContours(RETR_CCOMP)``, contours kept when their area minus their holes' exceeds ``a_t``
(holes: at most ``max_n_holes``, largest first, above ``a_h``), scaled to level 0. Patching
(``process_contour`` with the default ``four_pt`` check): a level-0 grid over each contour's
bounding box, a patch kept when any of four points around its centre is inside the contour and its
centre is in no hole (``cv2.pointPolygonTest``), one candidate at a time as CLAM's pool workers do.
Writes as ``create_patches_fp.py`` does them (``clam_write``): the mask visualisation (``visWSI``:
the level nearest 64× read, contours drawn green and holes blue, saved as JPEG) and the coordinates
as an HDF5 ``coords`` dataset with CLAM's attributes (written once, where CLAM appends per contour;
the stitch image is left out). Only for benchmarks: the product's tissue stage is ``wsi.tissue``.
"""

from __future__ import annotations

from pathlib import Path

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


def clam_write(slide, contours: list[np.ndarray], holes: list[list[np.ndarray]], coords: np.ndarray, out: Path,
               patch: int = 512, line_thickness: int = 250) -> None:
    """The mask JPEG and the coords h5 that CLAM's seg + patch write for one slide."""
    import h5py
    from PIL import Image

    level = slide.best_level_for_downsample(64)
    size = slide.level_dimensions[level]
    image = np.array(Image.fromarray(slide.read_region((0, 0), level, size)).convert("RGB"))
    scale = (size[0] / slide.dimensions[0], size[1] / slide.dimensions[1])
    thickness = int(line_thickness * np.sqrt(scale[0] * scale[1]))
    factor = np.array(scale, np.float64)
    cv2.drawContours(image, [np.asarray(c * factor, np.int32) for c in contours], -1, (0, 255, 0), thickness, lineType=cv2.LINE_8)
    for contour_holes in holes:
        cv2.drawContours(image, [np.asarray(h * factor, np.int32) for h in contour_holes], -1, (0, 0, 255), thickness, lineType=cv2.LINE_8)
    Image.fromarray(image).save(out / "mask.jpg")
    with h5py.File(out / "patches.h5", "w") as f:
        dataset = f.create_dataset("coords", data=coords, maxshape=(None, 2), chunks=(1, 2))
        dataset.attrs.update({"patch_size": patch, "patch_level": 0, "downsample": (1.0, 1.0),
                              "downsampled_level_dim": slide.dimensions, "level_dim": slide.dimensions, "name": "slide"})
