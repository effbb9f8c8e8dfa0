"""Tile scores and tissue outlines as files other tools read: GeoJSON for QuPath, CSV for scripts.

QuPath (0.3+) imports a GeoJSON FeatureCollection via File → Import objects (or drag and drop):
each feature becomes a detection (or annotation) with its ``measurements``, and Measure → Show
measurement maps colours them by any measurement. Coordinates are level-0 pixels, y down — the
slide's own pixel frame, which is what QuPath expects.
"""

from __future__ import annotations

import csv
import io
from typing import Literal

import numpy as np


def tiles_geojson(coords: np.ndarray, size: int, measurements: dict[str, np.ndarray], *,
                  object_type: Literal["detection", "annotation"] = "detection",
                  classification: str | None = None) -> dict:
    """A FeatureCollection with one square polygon per tile (level-0 pixels) carrying its measurements."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    for name, values in measurements.items():
        if len(values) != len(coords):
            raise ValueError(f"measurement {name!r} has {len(values)} values for {len(coords)} tiles")
    names = list(measurements)
    columns = [np.asarray(measurements[n], dtype=np.float64) for n in names]
    features = []
    for i, (x, y) in enumerate(coords.tolist()):
        ring = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
        properties: dict = {"objectType": object_type,
                            "measurements": {n: round(float(col[i]), 6) for n, col in zip(names, columns)}}
        if classification:
            properties["classification"] = {"name": classification}
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": properties})
    return {"type": "FeatureCollection", "features": features}


def _ring_area(ring) -> float:
    """Signed shoelace area of a closed ring, in its own coordinates (positive: counter-clockwise as numbers)."""
    xs, ys = np.asarray(ring, dtype=np.float64).T
    return float(np.dot(xs[:-1], ys[1:]) - np.dot(xs[1:], ys[:-1])) / 2


def _oriented(points: np.ndarray, scale: tuple[float, float], exterior: bool) -> np.ndarray:
    """A closed ring in level-0 pixels from contour points of the 2×-upsampled mask, wound as RFC 7946 asks
    (exteriors counter-clockwise, holes clockwise, as the numbers go); whole numbers as integers (a mask of a
    16× or 64× level: shorter to write and to parse)."""
    xy = points.reshape(-1, 2).astype(np.float64)
    ring = np.round((xy + 0.5) / 2 * np.asarray(scale, np.float64), 2)
    ring = np.concatenate([ring, ring[:1]])
    if (_ring_area(ring) > 0) != exterior:
        ring = np.ascontiguousarray(ring[::-1])  # orjson writes contiguous arrays only
    whole = np.rint(ring)
    return whole.astype(np.int64) if np.array_equal(whole, ring) else ring


def geojson_bytes(collection: dict) -> bytes:
    """A GeoJSON object as compact JSON, numpy arrays (rings, coordinates) written as lists: orjson, 15× faster
    than ``json`` on a slide's outline or tiles. The same text as ``json.dumps(…, separators=(",", ":"))`` but
    for small numbers' notation (``0.00001`` for ``1e-05``) and NaN or infinity, written as ``null`` (valid JSON,
    which ``NaN`` is not)."""
    import orjson

    return orjson.dumps(collection, option=orjson.OPT_SERIALIZE_NUMPY)


def tissue_geojson(mask: np.ndarray, downsample: tuple[float, float], *, name: str = "Tissue",
                   object_type: Literal["annotation", "detection"] = "annotation", arrays: bool = False) -> dict:
    """The tissue mask's outline as one QuPath annotation: a MultiPolygon, one polygon per tissue region with
    its holes, in level-0 pixels (``downsample``: level-0 px per mask px, (x, y)); each ring a list of [x, y], or
    with ``arrays`` an (n, 2) numpy array (for :func:`geojson_bytes`: no Python list of every vertex).

    Traced on the mask upsampled 2× (nearest), so a one-pixel region still has an area, and placed a quarter
    mask pixel into the tissue at every edge, of regions and of holes alike (OpenCV traces a hole along the
    tissue pixels around it): the outline never leaves the tissue or the slide.
    """
    import cv2

    binary = np.ascontiguousarray(np.asarray(mask, dtype=bool)).view(np.uint8)
    x, y, w, h = cv2.boundingRect(binary)  # traced within the tissue's bounding box: a slide is mostly glass
    x0, y0 = max(0, x - 1), max(0, y - 1)
    crop = binary[y0:y + h + 1, x0:x + w + 1]
    doubled = cv2.resize(crop, (crop.shape[1] * 2, crop.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    contours, hierarchy = cv2.findContours(doubled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE, offset=(2 * x0, 2 * y0))
    polygons = []
    if hierarchy is not None:
        links = hierarchy[0]  # per contour: next, previous, first child, parent
        for i, contour in enumerate(contours):
            if links[i][3] != -1:
                continue  # a hole: added with its region
            rings = [_oriented(contour, downsample, exterior=True)]
            child = links[i][2]
            while child != -1:
                rings.append(_oriented(contours[child], downsample, exterior=False))
                child = links[child][0]
            polygons.append(rings if arrays else [ring.tolist() for ring in rings])
    area = float(np.count_nonzero(binary)) * downsample[0] * downsample[1]  # the mask's own, exactly
    properties = {"objectType": object_type, "name": name, "classification": {"name": name},
                  "measurements": {"regions": len(polygons), "holes": sum(len(p) - 1 for p in polygons),
                                   "tissue_area_px": round(area, 1)}}
    feature = {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": polygons}, "properties": properties}
    return {"type": "FeatureCollection", "features": [feature] if polygons else []}


def tiles_csv(slide_id: str, coords: np.ndarray, size: int, columns: dict[str, np.ndarray]) -> str:
    """``slide_id,x,y,size,<columns…>`` with one row per tile (level-0 pixels)."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["slide_id", "x", "y", "size", *columns])
    values = [np.asarray(v, dtype=np.float64) for v in columns.values()]
    for i, (x, y) in enumerate(coords.tolist()):
        # 9 significant digits: a float32 score survives the round trip, so ties and order are the tool's own
        writer.writerow([slide_id, x, y, size, *(f"{v[i]:.9g}" for v in values)])
    return buffer.getvalue()
