"""Write real pyramidal slide files (Aperio SVS, generic tiled TIFF) tile by tile.

Used by the demo cohort and the benchmarks. Pixels come from a ``render`` callback, so a
100k-pixel-wide slide is written with memory bounded by one tile row, never the whole level.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile

# render(level_index, y0, x0, height, width) -> uint8 RGB array of that shape
RenderFn = Callable[[int, int, int, int, int], np.ndarray]

APERIO_HEADER = "Aperio Image Library v12.0.15"


def level_shapes(height: int, width: int, downsamples: tuple[int, ...]) -> list[tuple[int, int]]:
    """(height, width) of each pyramid level, rounded down like scanners do."""
    return [(max(1, height // d), max(1, width // d)) for d in downsamples]


def _tiles(render: RenderFn, level: int, shape: tuple[int, int], tile: int) -> Iterator[np.ndarray]:
    """Yield tiles in row-major order, one tile row rendered at a time (bounded memory)."""
    height, width = shape
    for y0 in range(0, height, tile):
        h = min(tile, height - y0)
        row = render(level, y0, 0, h, width)
        for x0 in range(0, width, tile):
            block = np.full((tile, tile, 3), 255, np.uint8)
            w = min(tile, width - x0)
            block[:h, :w] = row[:, x0 : x0 + w]
            yield block


def write_pyramid(
    path: Path,
    height: int,
    width: int,
    render: RenderFn,
    *,
    downsamples: tuple[int, ...] = (1, 4, 16),
    flavour: str = "aperio",
    mpp: float | None = 0.25,
    magnification: float | None = 40.0,
    tile: int = 256,
    quality: int = 85,
    thumbnail: np.ndarray | None = None,
    label: np.ndarray | None = None,
    macro: np.ndarray | None = None,
) -> Path:
    """Write a pyramidal JPEG-tiled TIFF.

    ``flavour="aperio"``: an SVS file OpenSlide recognises as Aperio (description starting
    with "Aperio", page 1 a stripped thumbnail, label and macro images named in their
    descriptions, AppMag and MPP in the header). ``flavour="generic"``: a plain tiled TIFF
    pyramid whose only scale information is the TIFF resolution tags (omitted when ``mpp`` is
    None, which makes a slide with no mpp anywhere).
    """
    if flavour not in ("aperio", "generic"):
        raise ValueError(f"unknown TIFF flavour {flavour!r}")
    path = Path(path)
    shapes = level_shapes(height, width, downsamples)
    jpeg = dict(compression="jpeg", compressionargs={"level": quality})
    common = dict(photometric="rgb", metadata=None, **jpeg)
    with tifffile.TiffWriter(path, bigtiff=height * width > 2**31) as tif:
        for index, shape in enumerate(shapes):
            kwargs = dict(common, tile=(tile, tile), shape=(*shape, 3), dtype=np.uint8)
            if flavour == "aperio":
                kwargs["description"] = _aperio_description(index, shape, shapes[0], tile, quality, mpp, magnification)
            elif mpp is not None:
                # TIFF resolution in pixels per centimetre (10_000 µm per cm)
                px_per_cm = 1e4 / (mpp * downsamples[index])
                kwargs["resolution"] = (px_per_cm, px_per_cm)
                kwargs["resolutionunit"] = "CENTIMETER"
            if index > 0 and flavour == "generic":
                kwargs["subfiletype"] = 1  # reduced-resolution image
            tif.write(_tiles(render, index, shape, tile), **kwargs)
            if index == 0 and flavour == "aperio":
                thumb = thumbnail if thumbnail is not None else render(len(shapes) - 1, 0, 0, *shapes[-1])
                tif.write(thumb, **common,
                          description=f"{APERIO_HEADER}\r\n{width}x{height} -> {thumb.shape[1]}x{thumb.shape[0]}")
        if flavour == "aperio":
            for name, image, codec in (("label", label, {"compression": "lzw"}), ("macro", macro, jpeg)):
                if image is None:
                    continue
                tif.write(image, photometric="rgb", metadata=None, subfiletype=1 if name == "label" else 9, **codec,
                          description=f"{APERIO_HEADER}\r\n{name} {image.shape[1]}x{image.shape[0]}")
    return path


def _aperio_description(index: int, shape: tuple[int, int], base: tuple[int, int], tile: int, quality: int,
                        mpp: float | None, magnification: float | None) -> str:
    """Aperio ImageDescription: first line the library, then the size line and |key = value| pairs."""
    h, w = shape
    text = f"{APERIO_HEADER}\r\n{base[1]}x{base[0]} [0,0 {base[1]}x{base[0]}] ({tile}x{tile})"
    if index > 0:
        text += f" -> {w}x{h}"
    text += f" JPEG/RGB Q={quality}"
    if magnification is not None:
        text += f"|AppMag = {magnification:g}"
    if mpp is not None:
        text += f"|MPP = {mpp:.4f}"
    return text
