"""Tile scores as files other tools read: GeoJSON for QuPath, CSV for scripts.

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
