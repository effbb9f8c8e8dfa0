"""Slide reader backends behind one small protocol: OpenSlide (default) and tiffslide.

Every backend returns RGB ``uint8`` arrays, white outside the slide, so callers never see
OpenSlide's transparent RGBA or tiffslide's black padding.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from wsi.errors import SlideError


@runtime_checkable
class SlideReader(Protocol):
    """What the pipeline needs from a slide file. Locations are level-0 (x, y); sizes are (w, h) at ``level``."""

    backend: str
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: dict[str, str]
    notes: list[str]  # what the user should know about how the file was opened (a fallback reader, odd metadata)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray: ...

    def associated_image_names(self) -> list[str]: ...

    def associated_image(self, name: str) -> np.ndarray: ...

    def close(self) -> None: ...


def rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite (non-premultiplied) RGBA onto white: transparent pixels outside the slide become white."""
    if rgba.shape[-1] == 3:
        return rgba
    if rgba[..., 3].min() == 255:  # fully opaque (any region inside the scan): no arithmetic needed
        return rgba[..., :3]
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.rint(rgb).astype(np.uint8)


class OpenSlideReader:
    """OpenSlide backend (Aperio, Hamamatsu, MIRAX, generic tiled TIFF, DICOM, ...)."""

    backend = "openslide"

    def __init__(self, path: Path):
        import threading

        import openslide

        self.path = Path(path)
        self.notes: list[str] = []
        self._local = threading.local()  # per-thread read handles (see read_region)
        self._slide = openslide.OpenSlide(str(path))  # metadata and associated images
        self.level_count = self._slide.level_count
        self.level_dimensions = tuple(tuple(map(int, d)) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties = {k: str(v) for k, v in self._slide.properties.items()}
        self.properties.setdefault("wsi.vendor", self.properties.get("openslide.vendor", ""))

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """OpenSlide's errors are sticky: after one corrupt tile every read of that handle fails. So each thread
        reads through its own handle (a corrupt tile cannot fail another thread's good one), replaced after
        an error so this thread's next read works."""
        import openslide

        handle = getattr(self._local, "slide", None)
        if handle is None:
            handle = self._local.slide = openslide.OpenSlide(str(self.path))
        try:
            rgba = np.asarray(handle.read_region((int(location[0]), int(location[1])), int(level), (int(size[0]), int(size[1]))))
        except openslide.OpenSlideError:
            handle.close()
            self._local.slide = None
            raise
        return rgba_to_rgb_on_white(rgba)

    def associated_image_names(self) -> list[str]:
        return sorted(self._slide.associated_images.keys())

    def associated_image(self, name: str) -> np.ndarray:
        return rgba_to_rgb_on_white(np.asarray(self._slide.associated_images[name].convert("RGBA")))

    def close(self) -> None:
        """Closes the metadata handle and this thread's read handle; other threads' go with their threads."""
        handle = getattr(self._local, "slide", None)
        if handle is not None:
            handle.close()
            self._local.slide = None
        self._slide.close()


class TiffSlideReader:
    """tiffslide backend: pure Python on tifffile; also reads OME-TIFF SubIFD pyramids OpenSlide ignores."""

    backend = "tiffslide"

    def __init__(self, path: Path, direct_tile_reads: bool = True):
        """``direct_tile_reads=False``: every read through tiffslide's Zarr layer (for comparisons)."""
        import tiffslide

        self.notes: list[str] = []
        self._slide = tiffslide.TiffSlide(str(path))
        self.level_count = self._slide.level_count
        self.level_dimensions = tuple(tuple(map(int, d)) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        # tiffslide names its computed properties "tiffslide.*"; expose the OpenSlide names too
        self.properties = {k: str(v) for k, v in self._slide.properties.items() if v is not None}
        for key in ("mpp-x", "mpp-y", "objective-power", "vendor"):
            if f"tiffslide.{key}" in self.properties:
                self.properties.setdefault(f"openslide.{key}", self.properties[f"tiffslide.{key}"])
        self.properties.setdefault("wsi.vendor", self.properties.get("tiffslide.vendor", ""))
        self._tiled_pages = _directly_readable_pages(self._slide) if direct_tile_reads else [None] * self.level_count
        self._decoded = DecodedTiles()
        self._slide.ts_tifffile.filehandle.set_lock(True)  # tile reads seek and read: one thread at a time
        for page in self._tiled_pages:
            if page is not None:
                # tifffile builds a page's decoder on first use and, for JPEG, reads 4 bytes of the file to build
                # it (``is_jfif``) outside the lock: built here, before any thread reads, so a concurrent first
                # decode cannot move the file position under another thread's seek + read
                _ = page.decode  # what tifffile's init_decode() does (it is not in every tifffile version)

    @property
    def tifffile(self):
        """The open ``tifffile.TiffFile`` (its file handle shared with the tile reads, under its lock)."""
        return self._slide.ts_tifffile

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        ds = self.level_downsamples[level]
        x_l, y_l = int(x / ds), int(y / ds)  # tiffslide's own level-0 → level rounding
        page = self._tiled_pages[level]
        if page is not None:  # a plain tiled page: decode its tiles directly
            return read_tiled_page(page, x_l, y_l, w, h, self._decoded)
        region = np.asarray(self._slide.read_region((x, y), int(level), (w, h), as_array=True))
        region = rgba_to_rgb_on_white(region[..., :4] if region.shape[-1] == 4 else region[..., :3]).copy()
        # tiffslide pads outside the image with zeros: make that white, like OpenSlide's transparency
        lw, lh = self.level_dimensions[level]
        if x_l < 0 or y_l < 0 or x_l + w > lw or y_l + h > lh:
            inside = np.zeros((h, w), bool)
            inside[max(0, -y_l) : max(0, lh - y_l), max(0, -x_l) : max(0, lw - x_l)] = True
            region[~inside] = 255
        return region

    @property
    def direct_levels(self) -> list[int]:
        """The levels read tile by tile with tifffile (the others go through tiffslide's Zarr layer)."""
        return [level for level, page in enumerate(self._tiled_pages) if page is not None]

    def associated_image_names(self) -> list[str]:
        return sorted(self._slide.associated_images.keys())

    def associated_image(self, name: str) -> np.ndarray:
        return np.asarray(self._slide.associated_images[name].convert("RGB"))

    def close(self) -> None:
        self._slide.close()


def _directly_readable_pages(slide) -> list:
    """Per level, its TIFF page when :func:`read_tiled_page` can read it (one tiled, 8-bit RGB page), else None."""
    if slide.properties.get("tiffslide.series-axes") != "YXS":
        return [None] * slide.level_count
    series = slide.ts_tifffile.series[slide.properties["tiffslide.series-index"]]
    pages = []
    for level in series.levels[:slide.level_count]:
        page = level.keyframe
        simple = (len(level.pages) == 1 and page.is_tiled and page.planarconfig == 1 and page.samplesperpixel == 3
                  and page.dtype == np.uint8 and page.imagedepth == 1 and page.tiledepth == 1
                  and getattr(page, "jpegheader", None) is None and not page.parent.is_ndpi)  # NDPI: headerless strips
        pages.append(page if simple else None)
    return pages


class DecodedTiles:
    """Recently decoded TIFF tiles of one slide, bounded in bytes (least recently used dropped first).

    Neighbouring regions share tiles wherever a region is smaller than a tile or not aligned to the
    tiles: a 112-px student reads 128-px regions of the 4× level, four to a 256-px tile, and an
    overlapping grid reads every tile several times. Decoding each once is most of a read's cost.
    """

    def __init__(self, max_bytes: int = 16 << 20):
        import threading
        from collections import OrderedDict

        self.max_bytes, self.bytes = max_bytes, 0
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
            return tile

    def put(self, key: tuple[int, int], tile: np.ndarray) -> None:
        with self._lock:
            if key in self._tiles or tile.nbytes > self.max_bytes:
                return
            self._tiles[key] = tile
            self.bytes += tile.nbytes
            while self.bytes > self.max_bytes:
                self.bytes -= self._tiles.popitem(last=False)[1].nbytes


def read_tiled_page(page, x: int, y: int, w: int, h: int, cache: DecodedTiles | None = None) -> np.ndarray:
    """Region (x, y, w, h) of one tiled TIFF page, white outside it, decoded tile by tile with tifffile.

    The pixels tiffslide returns (the same tifffile decoder, tested), without its Zarr layer:
    tiffslide 3 on zarr 3 spends ~2.4 ms of asynchronous bookkeeping per 512-px read against
    ~0.5 ms of JPEG decoding, and tile reads feed the model during feature extraction. Tiles found
    in ``cache`` are not read or decoded again.
    """
    out = np.full((h, w, 3), 255, np.uint8)
    width, height = page.imagewidth, page.imagelength
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    if x0 >= x1 or y0 >= y1:
        return out
    tw, th = page.tilewidth, page.tilelength
    across = -(-width // tw)
    indices = [row * across + col for row in range(y0 // th, (y1 - 1) // th + 1) for col in range(x0 // tw, (x1 - 1) // tw + 1)]

    def paste(tile: np.ndarray | None, index: int) -> None:
        top, left = (index // across) * th, (index % across) * tw
        r0, r1, c0, c1 = max(top, y0), min(top + th, y1), max(left, x0), min(left + tw, x1)
        if tile is None:  # a tile the file does not store: tiffslide's fill value
            out[r0 - y:r1 - y, c0 - x:c1 - x] = 0
        else:
            out[r0 - y:r1 - y, c0 - x:c1 - x] = tile[r0 - top:r1 - top, c0 - left:c1 - left]

    missing = []
    for index in indices:
        tile = cache.get((page.offset, index)) if cache is not None else None
        if tile is None:
            missing.append(index)
        else:
            paste(tile, index)
    if not missing:
        return out
    handle = page.parent.filehandle
    segments = []
    with handle.lock:  # seek + read as one step: the file position is shared by every thread reading this slide
        for index in missing:
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            if offset and count:
                handle.seek(offset)
                segments.append((handle.read(count), index))
            else:
                segments.append((None, index))
    for data, index in segments:
        tile = None if data is None else page.decode(data, index, jpegtables=page.jpegtables)[0][0]
        if tile is not None and cache is not None:
            cache.put((page.offset, index), tile)
        paste(tile, index)
    return out


BACKENDS: dict[str, Callable[[Path], SlideReader]] = {
    "openslide": OpenSlideReader,
    "tiffslide": TiffSlideReader,
}


# What `auto` opens each format with (OpenSlide's vendor name → reader): correct first, then fast. tiffslide's
# direct tile reads are 4.5–5.5× faster than OpenSlide on JPEG tiles and equal on JPEG 2000
# (benchmarks/bench_reads.py); OpenSlide wherever tiffslide is wrong: Ventana (stitching overlaps, no mpp),
# Leica (the scan's offset on the glass), Hamamatsu (NDPI's 64-bit offsets and restart-marker tiles), MIRAX,
# DICOM and the rest. Philips goes to tiffslide only when every tile is stored: OpenSlide draws a sparse
# scan's missing tiles as glass, tiffslide as black.
AUTO_BACKEND = {"aperio": "tiffslide", "generic-tiff": "tiffslide", "philips": "tiffslide"}


def _auto_backend(path: Path, vendor: str | None) -> str:
    """The reader `auto` tries first for ``path`` (the other is the fallback)."""
    choice = AUTO_BACKEND.get(vendor, "openslide") if vendor is not None else "tiffslide"
    if choice == "tiffslide" and vendor == "philips" and _has_missing_tiles(path):
        return "openslide"
    return choice


def _has_missing_tiles(path: Path) -> bool:
    """True when a tiled page of the TIFF leaves tiles unstored (offset or byte count 0), or it cannot be parsed."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return any(page.is_tiled and not all(page.databytecounts) for page in tif.pages)
    except (OSError, ValueError, IndexError, KeyError):
        return True


READER_MODULES = ("openslide", "tiffslide", "tifffile", "imagecodecs", "cv2", "PIL.Image")


WARM_CODECS = ("jpeg", "jpeg8", "jpeg2k", "lzw", "zlib", "webp")  # the tile codecs of the slides tiffslide reads


def warm_imports() -> None:
    """Import the slide readers and OpenCV, which the modules here import lazily (``--help`` stays fast).

    A worker process calls this once when it starts (``pipelines.engine.cluster``): tiffslide alone pulls in Zarr,
    ~0.3–0.7 s that would otherwise land in the first slide's tissue task on every worker.
    """
    import importlib

    for name in READER_MODULES:
        importlib.import_module(name)
    import imagecodecs

    for codec in WARM_CODECS:  # imagecodecs loads each codec's extension at its first use: 3.6 ms for JPEG
        getattr(imagecodecs, f"{codec}_decode", None)


def open_reader(path: Path, backend: str = "auto") -> SlideReader:
    """Open ``path`` with ``backend`` ("auto", "openslide", "tiffslide").

    "auto" picks per file by :data:`AUTO_BACKEND` (files OpenSlide does not recognise, such as OME-TIFFs
    with SubIFD pyramids or stripped TIFFs, go to tiffslide) and tries the other backend when the first
    cannot open the file, noting why in ``reader.notes``. Errors name the file and every reason.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(path, "file not found")
    if not path.is_file():
        raise SlideError(path, "not a regular file")
    if backend != "auto":
        if backend not in BACKENDS:
            raise SlideError(path, f"unknown backend {backend!r}; choose one of {sorted(BACKENDS)} or 'auto'")
        try:
            return BACKENDS[backend](path)
        except Exception as exc:
            raise SlideError(path, f"{backend} cannot open it: {exc}") from exc
    import openslide

    order = ["openslide", "tiffslide"]
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except Exception:
        vendor = None
    if _auto_backend(path, vendor) == "tiffslide":
        order.reverse()
    reasons = []
    for name in order:
        try:
            reader = BACKENDS[name](path)
        except Exception as exc:
            reasons.append(f"{name}: {type(exc).__name__}: {exc}".strip())
            continue
        reader.notes += [f"read with {name}: {reason}" for reason in reasons]  # e.g. tiffslide refusing Latin-1 metadata
        return reader
    raise SlideError(path, "not a readable slide (" + "; ".join(reasons) + ")")
