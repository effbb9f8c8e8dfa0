"""A slide opened for the pipeline: a backend reader plus its resolved mpp, id and helpers.

mpp resolution chain (the first source that has a value decides): the ``mpp`` passed in (the CSV's
``mpp`` column) → slide properties (``openslide.mpp-x``, which OpenSlide derives from each vendor's
metadata, then ``aperio.MPP``, ``tiffslide.mpp-x``) → an OME-TIFF's OME-XML (``PhysicalSizeX`` in
its unit) → TIFF resolution tags → ``default_mpp`` (with a warning) → the objective power,
10 / magnification (with a warning) → a :class:`SlideError` naming the slide. A value no scan has
(≤ 0.05 or ≥ 20 µm/px) fails the slide with the value and its source, except TIFF resolution tags,
which image editors fill with 72 dpi: those are skipped with a note.

Level rounding: locations are always level-0 pixels. Pyramid levels are stored with rounded
sizes, so a level's true downsample can be e.g. 4.0029 instead of 4; we use the backend's
reported downsample. At level-aligned locations (multiples of an integer downsample) OpenSlide
and tiffslide return identical pixels; elsewhere on levels > 0 OpenSlide resamples at the
sub-pixel position while tiffslide floors the location to the level's pixel grid (see
``wsi.tiling`` for the rule the tiler applies).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from wsi.backends import SlideReader, open_reader
from wsi.errors import SlideError
from wsi.mpp import description_note, objective_power, resolve_mpp
from wsi.units import PLAUSIBLE_MPP, plausible_mpp

log = logging.getLogger(__name__)



def level0_of(pixel: int, downsample: float) -> int:
    """The level-0 coordinate a read of a level's ``pixel`` starts at: the smallest that maps back onto that pixel
    (readers floor level-0 / downsample). Rounded instead, reads at a downsample a little above a whole number
    (an Aperio level of 16.0009) started a pixel early on every strip after the first."""
    level0 = math.ceil(pixel * downsample)
    while int(level0 / downsample) < pixel:  # the division a hair short of it
        level0 += 1
    return level0


@dataclass
class Slide:
    """One open slide. Use as a context manager, or call :meth:`close`."""

    slide_id: str
    path: Path
    reader: SlideReader
    mpp: float
    mpp_source: str  # "csv", "properties", "ome-xml", "tiff-tags", "default" or "objective-power"
    mpp_detail: str = ""  # which property, tag or field within that source
    objective_power: float | None = None
    warnings: list[str] = field(default_factory=list)
    # regions a tolerant read could not decode and painted as background: level-0 x, y, width, height, level, error
    unreadable: list[dict] = field(default_factory=list)
    # a tolerant read gives up (SlideError) once more than this share of the slide's area is unreadable: by
    # default at the first undecodable part (strict); the tissue stage sets `slides.max_unreadable_fraction`
    max_unreadable_fraction: float = 0.0

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.reader.close()

    @property
    def backend(self) -> str:
        return self.reader.backend

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.reader.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return self.reader.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.reader.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.reader.level_downsamples

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) of ``size`` (w, h) pixels at ``level``, from level-0 ``location`` (x, y)."""
        try:
            return self.reader.read_region(location, level, size)
        except Exception as exc:
            raise SlideError(self.slide_id, f"cannot read region {location} level {level} size {size} "
                                            f"({self.backend}): {type(exc).__name__}: {exc}") from exc

    def best_level_for_downsample(self, downsample: float) -> int:
        """The lowest-resolution level whose downsample does not exceed ``downsample`` (1 % slack)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.01:
                best = level
        return best

    def read_level_tolerant(self, x: int, y: int, w: int, h: int, level: int, unit: int = 256) -> np.ndarray:
        """``w``×``h`` px of ``level`` from its pixel (``x``, ``y``), with undecodable parts as background.

        A region that fails to read is split in halves until the failing parts are at most ``unit`` px a side;
        those are painted white (glass: no tissue) and recorded in :attr:`unreadable`, so one corrupt tile
        costs the mask a tile's area, not the slide — up to :attr:`max_unreadable_fraction` of the slide's
        area (0 by default: strict), beyond which it raises :class:`SlideError`.
        """
        lds = self.level_downsamples[level]
        try:
            return self.read_region((level0_of(x, lds), level0_of(y, lds)), level, (w, h))
        except SlideError as exc:
            if w <= unit and h <= unit:
                self.unreadable.append({"x": round(x * lds), "y": round(y * lds), "width": round(w * lds),
                                        "height": round(h * lds), "level": level, "error": exc.reason})
                share = self.unreadable_fraction
                if share > self.max_unreadable_fraction:  # a truncated file: stop splitting, it cannot pass
                    raise SlideError(self.slide_id, f"{len(self.unreadable)} region(s) of level {level} ({share:.1%} "
                                                    f"of the slide so far) could not be decoded — more than "
                                                    f"slides.max_unreadable_fraction ({self.max_unreadable_fraction:g}); "
                                                    f"last: {exc.reason}") from exc
                return np.full((h, w, 3), 255, np.uint8)
        if w >= h:
            half = w // 2
            parts = [self.read_level_tolerant(x, y, half, h, level, unit),
                     self.read_level_tolerant(x + half, y, w - half, h, level, unit)]
            return np.concatenate(parts, axis=1)
        half = h // 2
        return np.concatenate([self.read_level_tolerant(x, y, w, half, level, unit),
                               self.read_level_tolerant(x, y + half, w, h - half, level, unit)], axis=0)

    @property
    def unreadable_fraction(self) -> float:
        """The share of the slide's level-0 area that tolerant reads could not decode."""
        width, height = self.dimensions
        area = sum(min(r["width"], width - r["x"]) * min(r["height"], height - r["y"]) for r in self.unreadable)
        return float(area) / float(width * height)

    def read_downsampled(self, downsample: float, block: int = 1024, max_read: int = 4096) -> np.ndarray:
        """The whole slide at ``downsample`` (level-0 px per output px).

        Reads from the best level at or below that downsample. A level that is the output itself and no larger
        than ``max_read`` px a side is read in one piece (a 16× level: 3 ms less than in strips). Otherwise each
        output block is read and box-filtered, no read larger than ``max_read`` px a side at that level, so a
        slide without a pyramid (or without small levels) is reduced from level 0 in strips of blocks: memory is
        bounded by the output plus one block, never a whole high-resolution level. Undecodable parts come back as
        background and are recorded in :attr:`unreadable` (:meth:`read_level_tolerant`: a failing read is split
        in halves down to 256 px, so the white area around a corrupt tile depends on the read it fell in).
        """
        if downsample < 1:
            raise ValueError(f"downsample must be ≥ 1, got {downsample}")
        width0, height0 = self.dimensions
        out_w, out_h = max(1, round(width0 / downsample)), max(1, round(height0 / downsample))
        level = self.best_level_for_downsample(downsample)
        lw, lh = self.level_dimensions[level]
        scale_x, scale_y = lw / out_w, lh / out_h  # level px per output px
        if (lw, lh) == (out_w, out_h) and max(lw, lh) <= max_read:  # the level itself, small enough: one read, as is
            return np.ascontiguousarray(self.read_level_tolerant(0, 0, lw, lh, level))
        block = max(1, min(block, int(max_read / max(scale_x, scale_y))))
        out = np.empty((out_h, out_w, 3), np.uint8)
        for oy in range(0, out_h, block):
            for ox in range(0, out_w, block):
                bw, bh = min(block, out_w - ox), min(block, out_h - oy)
                x0, y0 = ox * scale_x, oy * scale_y
                x1, y1 = min(lw, (ox + bw) * scale_x), min(lh, (oy + bh) * scale_y)
                ix0, iy0 = int(math.floor(x0)), int(math.floor(y0))
                iw, ih = max(1, int(math.ceil(x1)) - ix0), max(1, int(math.ceil(y1)) - iy0)
                region = self.read_level_tolerant(ix0, iy0, iw, ih, level)
                if (iw, ih) == (bw, bh) and x0 == ix0 and y0 == iy0:
                    out[oy : oy + bh, ox : ox + bw] = region
                    continue
                box = (x0 - ix0, y0 - iy0, x1 - ix0, y1 - iy0)
                resized = Image.fromarray(region).resize((bw, bh), Image.Resampling.BOX, box=box)
                out[oy : oy + bh, ox : ox + bw] = np.asarray(resized)
        return out

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """RGB thumbnail whose longer side is at most ``max_size``."""
        width0, height0 = self.dimensions
        return self.read_downsampled(max(1.0, max(width0, height0) / max_size))

    def associated_image_names(self) -> list[str]:
        return self.reader.associated_image_names()

    def associated_image(self, name: str) -> np.ndarray:
        names = self.associated_image_names()
        if name not in names:
            raise SlideError(self.slide_id, f"no associated image {name!r}; it has {names}")
        return self.reader.associated_image(name)


def open_slide(path: str | Path, *, slide_id: str | None = None, backend: str = "auto", mpp: float | None = None,
               default_mpp: float | None = None) -> Slide:
    """Open a slide and resolve its mpp (see the module docstring for the chain)."""
    path = Path(path)
    slide_id = slide_id or path.stem
    try:
        reader = open_reader(path, backend)
    except SlideError as exc:
        raise SlideError(slide_id, f"{exc.reason} [{path}]") from exc
    if reader.level_count < 1 or min(reader.level_dimensions[0]) < 1:
        reader.close()
        raise SlideError(slide_id, f"slide has no image data [{path}]")
    if mpp is not None and not plausible_mpp(mpp):
        reader.close()
        raise SlideError(slide_id, f"mpp {mpp:g} given for this slide is not strictly between {PLAUSIBLE_MPP[0]} and "
                                   f"{PLAUSIBLE_MPP[1]} µm/px")
    try:
        resolved, source, detail, notes = resolve_mpp(path, reader.properties, mpp, default_mpp)
    except ValueError as exc:
        reader.close()
        raise SlideError(slide_id, f"{exc} [{path}]") from exc
    notes = list(getattr(reader, "notes", [])) + [n for n in [description_note(path, getattr(reader, "tifffile", None))] if n] + notes
    for note in notes:
        log.warning("%s: %s", slide_id, note)
    return Slide(slide_id, path, reader, resolved, source, detail, objective_power(reader.properties), notes)


@dataclass(frozen=True)
class SlideSource:
    """Where a slide is and how to open it (picklable: it is what crosses to loader processes, not a handle)."""

    slide_id: str
    path: Path
    mpp: float | None = None
    backend: str = "auto"


class SlidePool:
    """The one way tiles are read for models (extraction, distillation, End2end, heatmaps): slides opened
    lazily by id, in whichever process reads — OpenSlide handles never cross processes, so a pickled pool
    arrives empty — with at most ``max_open`` open at once (least recently used closed first, never one
    another thread is reading: loader threads share a pool, :mod:`features.tile_loader`)."""

    def __init__(self, sources: list[SlideSource], max_open: int = 8):
        self.sources = {s.slide_id: s for s in sources}
        self.max_open = max_open
        self._open: dict[str, Slide] = {}
        self._reading: dict[str, int] = {}  # slide id → reads under way
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._plans: dict[tuple, object] = {}  # (slide id, tile plan, input size) → the plan read for that input

    def slide(self, slide_id: str) -> Slide:
        with self._lock:
            return self._take(slide_id, reading=False)

    def _take(self, slide_id: str, reading: bool) -> Slide:
        if self._pid != os.getpid():  # a forked or unpickled copy: the parent's handles are not ours
            self._open, self._reading, self._pid = {}, {}, os.getpid()
        slide = self._open.pop(slide_id, None)
        if slide is None:
            source = self.sources[slide_id]
            slide = open_slide(source.path, slide_id=source.slide_id, backend=source.backend, mpp=source.mpp)
            idle = [key for key in self._open if not self._reading.get(key)]  # least recently used first
            while len(self._open) >= self.max_open and idle:
                self._open.pop(idle.pop(0)).close()
        self._open[slide_id] = slide  # most recently used last
        if reading:
            self._reading[slide_id] = self._reading.get(slide_id, 0) + 1
        return slide

    def read_tile(self, slide_id: str, x: int, y: int, plan, input_size: int | None = None) -> np.ndarray:
        """One tile (plan.patch_size² RGB uint8) of a slide, as ``wsi.tiling.read_tile`` reads it; with
        ``input_size``, the same tile read for a model of that input size (``wsi.tiling.plan_for_input``:
        from the coarsest level that holds it, ``input_size``² px)."""
        from wsi.tiling import plan_for_input, read_tile

        with self.reading(slide_id) as slide:
            if input_size is not None:
                key = (slide_id, plan, input_size)
                with self._lock:
                    derived = self._plans.get(key)
                    if derived is None:
                        if len(self._plans) >= 4096:  # a few per slide; bounded however many slides pass through
                            self._plans.clear()
                        derived = self._plans[key] = plan_for_input(plan, slide.level_downsamples, input_size)
                plan = derived
            return read_tile(slide, int(x), int(y), plan)

    @contextmanager
    def reading(self, slide_id: str) -> Iterator[Slide]:
        """The open slide, kept open (never closed for another) while the ``with`` block reads it."""
        with self._lock:
            slide = self._take(slide_id, reading=True)
        try:
            yield slide
        finally:
            with self._lock:
                self._reading[slide_id] -= 1

    def close(self) -> None:
        with self._lock:
            for slide in self._open.values():
                slide.close()
            self._open, self._reading = {}, {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"], state["_reading"], state["_pid"] = {}, {}, None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())
