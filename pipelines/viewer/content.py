"""Every URL the viewer answers, as bytes: the page, the slide list, DZI slides and heatmaps, overlays.

The server (``pipelines.viewer.server``) adds HTTP on top, the static export (``pipelines.viewer.export``)
writes the same answers to files: one routing table, so the two never differ. A URL is matched against
fixed patterns and its ids are looked up in the run's index; nothing in a URL is ever joined to a path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from pipelines.engine.cluster import machine_cores
from pipelines.viewer.run_index import ViewerRun, attention_tiles, slides_document, tile_scores, url_key

TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".png": "image/png", ".jpeg": "image/jpeg", ".json": "application/json", ".geojson": "application/geo+json",
         ".dzi": "application/xml", ".txt": "text/plain; charset=utf-8", ".map": "application/json"}
log = logging.getLogger(__name__)
THUMB = 192  # gallery thumbnail side, px
ID = r"(?P<id>[^/]+)"
ROUTES = [  # (pattern, handler method name); matched in order against the URL path without its leading /
    (r"api/slides(?:\.json)?", "_slides"),
    (rf"api/slides/{ID}/tissue\.geojson", "_tissue"),
    (rf"api/slides/{ID}/tiles\.json", "_grid"),
    (rf"api/slides/{ID}/attention/(?P<row>[^/]+)\.json", "_attention"),
    (rf"api/slides/{ID}/attention/(?P<row>[^/]+)/(?P<kind>top|bottom)/(?P<rank>\d{{1,3}})\.jpeg", "_thumbnail"),
    (rf"slide/{ID}\.dzi", "_slide_dzi"),
    (rf"slide/{ID}_files/(?P<level>\d{{1,2}})/(?P<col>\d{{1,7}})_(?P<tile_row>\d{{1,7}})\.jpeg", "_slide_tile"),
    (rf"heatmap/(?P<row>[^/]+)/{ID}\.dzi", "_heatmap_dzi"),
    (rf"heatmap/(?P<row>[^/]+)/{ID}_files/(?P<level>\d{{1,2}})/(?P<col>\d{{1,7}})_(?P<tile_row>\d{{1,7}})\.png", "_heatmap_tile"),
]


class NotFound(KeyError):
    """No such page, slide, row, level or tile: the server answers 404."""


class ByteCache:
    """A least-recently-used cache of encoded answers, bounded by their total size."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.size, self.hits, self.misses = max_bytes, 0, 0, 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_make(self, key: str, make: Callable[[], bytes]) -> bytes:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return data
            self.misses += 1
        data = make()  # outside the lock: tiles are cut in parallel
        with self._lock:
            if key not in self._items and len(data) <= self.max_bytes:
                self._items[key] = data
                self.size += len(data)
                while self.size > self.max_bytes:
                    self.size -= len(self._items.popitem(last=False)[1])
        return data


def static_files() -> dict[str, bytes]:
    """The page's own files (index.html, viewer.js, viewer.css, OpenSeadragon), by URL path."""
    root = resources.files("pipelines.viewer") / "static"
    found = {}

    def walk(folder, prefix: str) -> None:
        for item in folder.iterdir():
            if item.is_dir():
                walk(item, f"{prefix}{item.name}/")
            elif not item.name.endswith(".map"):
                found[f"{prefix}{item.name}"] = item.read_bytes()

    walk(root, "")
    return found


class ViewerContent:
    """The answer to every viewer URL of one run; thread-safe, cut on demand, cached."""

    def __init__(self, run: ViewerRun, *, cache_bytes: int = 512 * 2**20, max_slides_open: int = 16, cutters: int | None = None):
        from wsi.slide import SlidePool, SlideSource

        self.run = run
        # on every image URL (?v=): the browser caches images for a day, and the same URL of a rerun run, or of
        # another run served later on this port, must not show its old pixels
        self.version = hashlib.sha1(f"{run.root.resolve()}:{time.time_ns()}".encode()).hexdigest()[:12]
        self.static = static_files()
        self.cache = ByteCache(cache_bytes)
        sources = [SlideSource(s.slide_id, Path(s.entry.slide_path), (s.meta or {}).get("mpp"), run.cfg.slides.backend)
                   for s in run.slides.values() if s.entry.slide_path is not None and s.meta is not None]
        self.pool = SlidePool(sources, max_open=max_slides_open)
        self.row_keys = {url_key(row): row for row in run.rows}  # URL form of a results row → the row
        self._zooms: OrderedDict[tuple, object] = OrderedDict()
        self._zoom_lock = threading.Lock()
        self._routes = [(re.compile(pattern), getattr(self, name)) for pattern, name in ROUTES]
        self._cutters = ThreadPoolExecutor(cutters or machine_cores(), thread_name_prefix="wsi-viewer-cut")

    def warm_up(self) -> threading.Thread:
        """In the background: the readers' and colour maps' imports and the first slide's overview, so the
        first view does not wait for them."""
        def warm() -> None:
            from wsi.heatmap import colour_lut

            colour_lut(self.run.cfg.heatmaps.cmap)
            first = next((s for s in self.run.slides.values() if s.size is not None and s.entry.slide_path), None)
            if first is not None:
                try:
                    self.slide_zoom(first.slide_id).overview()
                except Exception as exc:  # the same error reaches the browser when it asks: here, only noted
                    log.warning("viewer: warming up on %s failed: %s", first.slide_id, exc)

        thread = threading.Thread(target=warm, name="wsi-viewer-warm-up", daemon=True)
        thread.start()
        return thread

    def get(self, path: str) -> tuple[bytes, str]:
        """(body, content type) of a URL path (without query); ``NotFound`` for anything else."""
        path = path.lstrip("/")
        if path in ("", "index.html"):
            return self.static["index.html"], TYPES[".html"]
        if path in self.static:
            return self.static[path], TYPES.get(Path(path).suffix, "application/octet-stream")
        for pattern, handler in self._routes:
            match = pattern.fullmatch(path)
            if match:
                params = match.groupdict()
                body = self.cache.get_or_make(path, lambda handler=handler, params=params: self._cut(handler, params))
                return body, TYPES[Path(path).suffix or ".json"]
        raise NotFound(path)

    def _cut(self, handler: Callable[..., bytes], params: dict) -> bytes:
        """Make an answer on one of a thread per core, in the order asked: more threads cutting at once only
        fight over the GIL (each decode hands it back and waits to retake it), and a lock would let some
        requests wait for seconds while others overtake them."""
        return self._cutters.submit(handler, **params).result()  # a FIFO queue: first asked, first cut

    # --- lookups: every id, row and level from a URL is checked here ------------------------------------------
    def _slide(self, slide_id: str):
        try:
            slide = self.run.slide(slide_id)
        except KeyError:
            raise NotFound(f"no slide {slide_id!r} in this run") from None
        if slide.size is None or slide.entry.slide_path is None:
            raise NotFound(f"slide {slide_id!r} has no pixels to show (it failed before the tissue stage)")
        return slide

    def _row(self, row: str, slide_id: str) -> tuple[str, Path]:
        name = self.row_keys.get(row)
        slide = self._slide(slide_id)
        if name is None or name not in slide.heatmaps:
            raise NotFound(f"no heatmap {row!r} for slide {slide_id!r}")
        return name, slide.heatmaps[name]

    def _zoom(self, key: tuple, make: Callable[[], object]):
        """The zoom of ``key``, made once: one builder per key (a heatmap's grid, a slide's handle), the others
        waiting for it, while requests for other keys go on."""
        with self._zoom_lock:
            future = self._zooms.get(key)
            owner = future is None
            if owner:
                future = self._zooms[key] = Future()
                while len(self._zooms) > 32:  # up to ~10 MB each (a slide's overview, a heatmap's grids and mask)
                    self._zooms.popitem(last=False)
            self._zooms.move_to_end(key)
        if owner:
            try:
                future.set_result(make())
            except Exception as exc:
                with self._zoom_lock:
                    self._zooms.pop(key, None)  # asked again, made again: the failure may pass (a file written since)
                future.set_exception(exc)
        return future.result()

    def slide_zoom(self, slide_id: str):
        from wsi.deepzoom import SlideZoom

        slide = self._slide(slide_id)
        return self._zoom(("slide", slide_id), lambda: SlideZoom(self.pool, slide_id, *slide.size))

    def heat_zoom(self, row: str, slide_id: str):
        from wsi.deepzoom import HeatZoom

        name, folder = self._row(row, slide_id)
        slide = self._slide(slide_id)

        def make():
            from pipelines.stages.tissue import load_tissue

            coords, size, _, percentile = tile_scores(folder)
            tissue, _ = load_tissue(self.run.paths, slide_id)
            return HeatZoom(*slide.size, coords, size, percentile, tissue.mask, cmap=self.run.cfg.heatmaps.cmap)

        return self._zoom(("heat", name, slide_id), make)

    @staticmethod
    def _tile(zoom, level: str, col: str, tile_row: str) -> bytes:
        try:
            zoom.geometry.tile_box(int(level), int(col), int(tile_row))
        except KeyError as exc:  # only the geometry's answer is a 404; a slide that fails to read is a 500
            raise NotFound(exc.args[0]) from None
        return zoom.tile(int(level), int(col), int(tile_row))

    def _attention_tiles(self, row: str, slide_id: str) -> dict:
        _, folder = self._row(row, slide_id)
        return self._zoom(("attention", row, slide_id), lambda: attention_tiles(folder))

    # --- handlers ---------------------------------------------------------------------------------------------
    def _slides(self) -> bytes:
        return json.dumps(slides_document(self.run, self.version)).encode()

    def _tissue(self, id: str) -> bytes:
        path = self.run.paths.tissue_outline(self._slide(id).slide_id)
        if not path.exists():
            raise NotFound(f"slide {id!r} has no tissue outline")
        return path.read_bytes()

    def _grid(self, id: str) -> bytes:
        from pipelines.stages.tiles import load_tiles

        slide = self._slide(id)
        if not self.run.paths.tile_coords(slide.slide_id).exists():
            raise NotFound(f"slide {id!r} has no tiles")
        grid = load_tiles(self.run.paths, slide.slide_id)
        return json.dumps({"size": int(grid.plan.level0_size), "coords": grid.coords.astype(int).tolist()},
                          separators=(",", ":")).encode()

    def _attention(self, id: str, row: str) -> bytes:
        tiles = json.loads(json.dumps(self._attention_tiles(row, id)))  # a copy to add the URLs to
        for kind in ("top", "bottom"):
            for tile in tiles[kind]:
                tile["image"] = f"api/slides/{id}/attention/{row}/{kind}/{tile['rank']}.jpeg?v={self.version}"
        return json.dumps(tiles).encode()

    def _thumbnail(self, id: str, row: str, kind: str, rank: str) -> bytes:
        from wsi.deepzoom import encode_jpeg

        picks = self._attention_tiles(row, id)[kind]
        if not 1 <= int(rank) <= len(picks):
            raise NotFound(f"no {kind} tile {rank} for slide {id!r}")
        t = picks[int(rank) - 1]
        return encode_jpeg(self.slide_zoom(id).region(t["x"], t["y"], t["x"] + t["size"], t["y"] + t["size"], THUMB, THUMB))

    def _slide_dzi(self, id: str) -> bytes:
        return self.slide_zoom(id).geometry.xml("jpeg").encode()

    def _slide_tile(self, id: str, level: str, col: str, tile_row: str) -> bytes:
        return self._tile(self.slide_zoom(id), level, col, tile_row)

    def _heatmap_dzi(self, row: str, id: str) -> bytes:
        self._row(row, id)
        from wsi.deepzoom import DziGeometry

        return DziGeometry(*self._slide(id).size).xml("png").encode()

    def _heatmap_tile(self, row: str, id: str, level: str, col: str, tile_row: str) -> bytes:
        return self._tile(self.heat_zoom(row, id), level, col, tile_row)
