"""Tissue masks a person corrected: a PNG, or a QuPath GeoJSON export, that replaces the computed mask.

``tissue.mask_dir`` holds ``<slide_id>.geojson`` or ``<slide_id>.png``. A GeoJSON's
polygons are in level-0 pixels, as QuPath exports them and as ``tissue/<slide_id>.geojson`` is
written: features classified as an excluded kind (``Ink``, ``Bubble``, ``Blur``…) or whose class
starts with ``Ignore`` are taken out, every other polygon (``Tissue``, ``Region*``, unclassified) is
tissue; holes are honoured. A PNG is any size with the slide's aspect: non-zero is tissue, resized
(nearest) onto the overview grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SUFFIXES = (".geojson", ".png")  # not .json: the run's own tissue/<id>.json is metadata
EXCLUDED_CLASSES = ("ink", "bubble", "blur", "fold", "artefact", "artifact")


def find_override(mask_dir: Path | None, slide_id: str) -> Path | None:
    """The corrected mask for ``slide_id`` in ``mask_dir``, or None (GeoJSON before PNG)."""
    if mask_dir is None:
        return None
    for suffix in SUFFIXES:
        path = Path(mask_dir) / f"{slide_id}{suffix}"
        if path.is_file():
            return path
    return None


def _features(data) -> list[dict]:
    if isinstance(data, list):
        return [f for item in data for f in _features(item)]
    if data.get("type") == "FeatureCollection":
        return list(data.get("features", []))
    if data.get("type") == "Feature":
        return [data]
    if data.get("type") in ("Polygon", "MultiPolygon"):
        return [{"type": "Feature", "geometry": data, "properties": {}}]
    raise ValueError(f"not GeoJSON features: type {data.get('type')!r}")


def _excluded(properties: dict) -> bool:
    name = str(((properties or {}).get("classification") or {}).get("name", "")).lower()
    return name.startswith("ignore") or name in EXCLUDED_CLASSES


def rasterise_geojson(path: Path, shape: tuple[int, int], downsample: tuple[float, float]) -> np.ndarray:
    """The tissue of a GeoJSON (level-0 polygons) on a grid of ``shape`` whose pixel covers ``downsample``
    level-0 px: tissue polygons filled, their holes and excluded polygons cleared."""
    import cv2

    try:
        features = _features(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable GeoJSON mask ({exc})") from exc
    keep, drop = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    scale = np.array([1 / downsample[0], 1 / downsample[1]])
    for feature in features:
        geometry = feature.get("geometry") or {}
        polygons = {"Polygon": [geometry.get("coordinates")], "MultiPolygon": geometry.get("coordinates")}.get(
            geometry.get("type"), [])
        target = drop if _excluded(feature.get("properties")) else keep
        for rings in polygons or []:
            if not rings:
                continue
            pixels = [np.round(np.asarray(ring, np.float64)[:, :2] * scale - 0.5).astype(np.int32) for ring in rings]
            shape_mask = np.zeros(shape, np.uint8)
            cv2.fillPoly(shape_mask, pixels[:1], 1)
            if len(pixels) > 1:
                cv2.fillPoly(shape_mask, pixels[1:], 0)  # holes
            target |= shape_mask
    return (keep & (1 - drop)).astype(bool)


def load_override(path: Path, shape: tuple[int, int], downsample: tuple[float, float]) -> np.ndarray:
    """The corrected tissue mask from ``path`` on the overview grid (``shape``, ``downsample``)."""
    if Path(path).suffix.lower() == ".png":
        import cv2
        from PIL import Image

        try:
            image = np.asarray(Image.open(path).convert("L")) > 0
        except OSError as exc:
            raise ValueError(f"{path}: not a readable PNG mask ({exc})") from exc
        aspect, expected = image.shape[1] / image.shape[0], shape[1] / shape[0]
        if abs(aspect / expected - 1) > 0.02:
            raise ValueError(f"{path}: a {image.shape[1]}×{image.shape[0]} mask does not have the slide's aspect "
                             f"({expected:.3f}, this one {aspect:.3f})")
        return cv2.resize(image.view(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)
    return rasterise_geojson(path, shape, downsample)
