"""The tissue stage's QC image: the overview with the mask's outline, the excluded and flagged parts in their
colours with a legend, the sections numbered."""

from __future__ import annotations

import numpy as np

from wsi.artefacts import reduce_by
from wsi.tissue import TissueMask

EXCLUDED_COLOURS = {"ink": (255, 128, 0), "bubble": (0, 170, 255)}  # QC colour of each excluded kind (RGB)
FLAGGED_COLOURS = {"fold": (200, 0, 200)}  # and of each flagged kind


def qc_image(rgb: np.ndarray, tissue: TissueMask, max_size: int = 1024) -> np.ndarray:
    """The overview with the mask outline in green, everything outside the tissue dimmed, excluded regions
    (ink, bubbles) and flagged ones (folds) tinted in their colour, a legend naming what each colour is, and
    the sections numbered when there are several (:func:`section_order`)."""
    import cv2

    h, w = tissue.mask.shape
    scale = min(1.0, max_size / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = reduce_by(np.ascontiguousarray(rgb), int(1 / scale))  # a whole factor first: OpenCV's fast path
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if image.shape[1] > 2 * size[0] else cv2.INTER_LINEAR)
    mask = cv2.resize(tissue.mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    dimmed = cv2.addWeighted(image, 0.6, np.full_like(image, 60), 0.4, 0)
    np.copyto(image, dimmed, where=(mask == 0)[..., None])
    legend = [("tissue", (0, 200, 0))]
    marked = [(kind, part, EXCLUDED_COLOURS.get(kind, (255, 0, 255)), "excluded") for kind, part in tissue.excluded.items()]
    marked += [(kind, part, FLAGGED_COLOURS.get(kind, (255, 0, 255)), "flagged") for kind, part in tissue.flagged.items()]
    for kind, part, colour, how in marked:
        shown = cv2.resize(part.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
        if shown.any():
            colour = np.asarray(colour, np.float32)
            image[shown] = (0.4 * image[shown] + 0.6 * colour).astype(np.uint8)
            legend.append((f"{kind} ({how})", tuple(int(c) for c in colour)))
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    inner = mask.astype(bool) & ~cv2.erode(mask, cross, borderType=cv2.BORDER_REPLICATE).astype(bool)  # the mask's rim
    edge = cv2.dilate(inner.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=1 if max(size) < 600 else 2) > 0
    image[edge] = (0, 200, 0)
    if tissue.n_regions > 1:  # sections are regions: one region, nothing to number
        number_sections(image, mask)
    if len(legend) > 1 and min(size) >= 64:
        for row, (text, colour) in enumerate(legend):
            y = 6 + 14 * row
            cv2.rectangle(image, (4, y), (14, y + 10), colour, -1)
            cv2.putText(image, text, (18, y + 9), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    return image


def section_order(mask: np.ndarray, min_share: float = 0.001) -> list[tuple[int, int]]:
    """One point (x, y) inside each tissue section of a mask, numbered left to right (by the sections' centres):
    the section's innermost pixel, so a ring-shaped section is labelled on its tissue, not in its hole. Specks
    under ``min_share`` of the image are not sections."""
    import cv2

    binary = np.ascontiguousarray(mask, np.uint8)
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(binary, connectivity=8)
    depth = cv2.distanceTransform(np.pad(binary, 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
    points = []
    for i in range(1, n):
        if stats[i, cv2.CC_STAT_AREA] < max(4, min_share * mask.size):
            continue
        x, y, w, h = stats[i, :4]
        inside = np.where(labels[y:y + h, x:x + w] == i, depth[y:y + h, x:x + w], -1)
        row, col = np.unravel_index(int(np.argmax(inside)), inside.shape)
        points.append((float(centroids[i][0]), float(centroids[i][1]), int(x + col), int(y + row)))
    return [(x, y) for _, _, x, y in sorted(points)]


def number_sections(image: np.ndarray, mask: np.ndarray) -> None:
    """Write 1, 2, … on each section of a QC image (in place) when the mask has more than one."""
    import cv2

    centres = section_order(mask)
    if len(centres) < 2:
        return
    for number, (x, y) in enumerate(centres, start=1):
        text = str(number)
        (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        cv2.rectangle(image, (x - w // 2 - 3, y - h // 2 - 3), (x + w // 2 + 3, y + h // 2 + 3), (255, 255, 255), -1)
        cv2.putText(image, text, (x - w // 2, y + h // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)


def warm_up() -> None:
    """Pay a worker's one-time costs of the tissue stage before its first slide: import the slide readers, then
    mask, draw and outline a small synthetic overview (what the path imports lazily: NumPy's masked arrays,
    OpenCV's and Pillow's codecs, …). The stage table's warm-up, run once per worker process by
    ``pipelines.engine.cluster``."""
    import io

    from wsi.annotations import tissue_geojson
    from wsi.backends import warm_imports
    from wsi.tissue import TissueConfig, save_mask_png, segment_tissue

    warm_imports()
    rgb = np.full((96, 128, 3), 242, np.uint8)
    rgb[24:72, 32:96] = (190, 110, 160)  # a patch of H&E-coloured tissue
    rgb[40:44, 10:120] = (30, 125, 60)  # crossed by a green stroke
    tissue = segment_tissue(rgb, (64.0, 64.0), TissueConfig(), slide_mpp=0.25)
    qc_image(rgb, tissue, 128)
    tissue_geojson(tissue.mask, tissue.downsample)
    save_mask_png(tissue.mask, io.BytesIO())
