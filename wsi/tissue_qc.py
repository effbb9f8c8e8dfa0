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
    the sections numbered when there are several (:func:`section_order`). ``rgb`` is the overview ``tissue`` was
    computed on: its reduction kept in ``tissue.overview_reduced`` is used when the factor is the same."""
    import cv2

    h, w = tissue.mask.shape
    scale = min(1.0, max_size / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    factor = int(1 / scale)  # a whole factor first (OpenCV's fast path), the masking's own reduction when it is that
    if tissue.overview_reduced is not None and tissue.overview_reduced[0] == factor:
        image = tissue.overview_reduced[1]
    else:
        image = reduce_by(np.ascontiguousarray(rgb), factor)
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)  # under 2× left: bilinear, 6× faster than area
    mask = cv2.resize(np.ascontiguousarray(tissue.mask).view(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    dimmed = cv2.addWeighted(image, 0.6, np.full_like(image, 60), 0.4, 0)
    image = cv2.copyTo(image, mask, dimmed)  # the tissue as it is, the rest dimmed
    legend = [("tissue", (0, 200, 0))]
    marked = [(kind, part, EXCLUDED_COLOURS.get(kind, (255, 0, 255)), "excluded") for kind, part in tissue.excluded.items()]
    marked += [(kind, part, FLAGGED_COLOURS.get(kind, (255, 0, 255)), "flagged") for kind, part in tissue.flagged.items()]
    for kind, part, colour, how in marked:
        shown = cv2.resize(np.ascontiguousarray(part).view(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        x, y, w, h = cv2.boundingRect(shown)
        if w:  # tinted within the part's box: a stroke or a fold is a small share of the image
            box = image[y:y + h, x:x + w]
            tinted = cv2.addWeighted(box, 0.4, np.full_like(box, colour), 0.6, 0)
            image[y:y + h, x:x + w] = cv2.copyTo(tinted, shown[y:y + h, x:x + w], box)
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


WARM_UP_SIZE = (1875, 2500)  # the 16× level of a 40,000 × 30,000 slide: the overview a typical task masks


def warm_up(size: tuple[int, int] = WARM_UP_SIZE) -> None:
    """Pay a worker's one-time costs of the tissue stage before its first slide: import the slide readers, then
    mask, draw, outline and encode a synthetic overview of a task's size (``size``: rows, columns): two sections,
    a hole, pen stroke and specks, so every rule runs. What the path imports lazily (NumPy's masked arrays,
    scikit-image's filters, OpenCV's and Pillow's codecs) is imported, and the process's heap has grown to
    what a task needs: a worker's first slide took twice the time of its next ones without it. The stage
    table's warm-up, run once per worker process by ``pipelines.engine.cluster``."""

    import cv2
    from PIL import Image

    from wsi.annotations import geojson_bytes, tissue_geojson
    from wsi.backends import DecodedTiles, warm_imports
    from wsi.mask_png import decode_mask_png, encode_mask_png
    from wsi.tissue import TissueConfig, segment_tissue

    warm_imports()
    rows, cols = size
    # what the slide's reader holds while the task masks it: its cache of decoded tiles (16 MiB of 196-KiB tiles),
    # so the heap grows to a task's peak here (a worker's first slide faulted 4,000 pages, ~40 ms, without it)
    tiles = [np.ones((256, 256, 3), np.uint8) for _ in range(DecodedTiles().max_bytes // (256 * 256 * 3) + 1)]
    rng = np.random.default_rng(0)
    rgb = np.full((rows, cols, 3), (243, 241, 244), np.uint8)
    section = np.zeros((rows, cols), np.uint8)
    cv2.ellipse(section, (cols // 2, rows // 2), (cols // 4, rows // 4), 0, 0, 360, 1, -1)
    cv2.circle(section, (cols // 2, rows // 2), max(1, rows // 16), 0, -1)  # a hole
    cv2.ellipse(section, (cols // 8, rows // 4), (cols // 20, rows // 12), 0, 0, 360, 1, -1)  # a second section: numbered
    stain = rng.integers(0, 60, (rows, cols, 1), dtype=np.uint8)
    rgb[section == 1] = (np.asarray((200, 120, 170), np.uint8) - stain)[section == 1]
    cv2.line(rgb, (cols // 10, rows // 5), (9 * cols // 10, 4 * rows // 5), (30, 125, 60), max(1, rows // 60))
    for y, x in rng.integers(0, (rows, cols), size=(40, 2)):  # specks
        cv2.circle(rgb, (int(x), int(y)), 2, (120, 90, 110), -1)
    tissue = segment_tissue(rgb, (16.0, 16.0), TissueConfig(), slide_mpp=0.25)
    qc = qc_image(rgb, tissue, 1024)
    Image.open(_jpeg(qc)).convert("RGB").load()
    geojson_bytes(tissue_geojson(tissue.mask, tissue.downsample, arrays=True))
    decode_mask_png(encode_mask_png(tissue.mask))
    del tiles


def _jpeg(image: np.ndarray):
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=90)
    out.seek(0)
    return out
