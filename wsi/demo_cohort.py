"""A small demo cohort of real pyramidal slides, made offline from tissue textures that packages ship.

Each slide has irregular tissue islands (H&E texture from ``wsidicom-data``) on glass, holes
inside the tissue, a thin green pen stroke and debris specks on the glass; positive slides carry
planted "tumour" regions with a visibly different texture (scikit-image's immunohistochemistry
image). Ground truth (tissue mask without holes, tumour mask) is written beside every slide.
"""

from __future__ import annotations

import csv
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from skimage.transform import rescale

from wsi.demo_artefacts import (
    ARTEFACTS,
    BUBBLE,
    FAINT,
    blurred_window,
    draw_blur,
    draw_bubbles,
    draw_faint,
    draw_fold,
    draw_ink,
    paint_bubbles,
    paint_faint,
    paint_ink,
)
from wsi.demo_layout import DEBRIS_SPECK, PEN_MARK, TISSUE, TUMOUR, SlideLayout, make_layout
from wsi.tiff_writer import level_shapes, write_pyramid

GLASS = np.array([244, 242, 245], np.float32)
PEN = np.array([30, 125, 60], np.float32)
DEBRIS = np.array([95, 60, 45], np.float32)
# label codes of the layout map


@lru_cache(maxsize=1)
def _base_textures() -> tuple[np.ndarray, np.ndarray]:
    """(normal H&E texture, tumour IHC texture), each mirrored 2×2 so it tiles without seams."""
    from skimage import data

    he_file = resources.files("wsidicom_data") / "data" / "test_tile.png"
    with resources.as_file(he_file) as path:
        he = np.asarray(Image.open(path).convert("RGB"))
    ihc = data.immunohistochemistry()

    def mirror(t: np.ndarray, fill: tuple[int, int, int]) -> np.ndarray:
        t = t.astype(np.float32)
        # unstained gaps (near-white) get a pale stain tone, so the ground-truth tissue is all stained
        whiteness = np.clip((t.min(axis=2, keepdims=True) - 170.0) / 60.0, 0.0, 1.0)
        t = (1 - whiteness) * t + whiteness * np.array(fill, np.float32)
        top = np.concatenate([t, t[:, ::-1]], axis=1)
        return np.concatenate([top, top[::-1]], axis=0)

    return mirror(he, (226, 178, 214)), mirror(ihc, (214, 190, 160))


class SlideRenderer:
    """Renders any region of any level of a layout: texture lookup, so memory ∝ the region."""

    def __init__(self, layout: SlideLayout, downsamples: tuple[int, ...], rng: np.random.Generator):
        self.layout, self.downsamples = layout, downsamples
        self.shapes = level_shapes(layout.height, layout.width, downsamples)
        he, ihc = _base_textures()
        stain = rng.normal(1.0, 0.04, size=3).astype(np.float32)  # per-slide stain variation
        # the texture's offset, a multiple of every downsample, so each level depicts the same tissue as level 0
        coarsest = max(downsamples)
        self.offset = rng.integers(0, max(1, 4096 // coarsest), size=2) * coarsest
        self.textures = []
        for d in downsamples:
            scaled = [np.clip(t * stain if d == 1 else rescale(t, 1 / d, channel_axis=2, anti_aliasing=True, preserve_range=True) * stain, 0, 255)
                      for t in (he, ihc)]
            self.textures.append(scaled)
        self.noise_rng = np.random.default_rng(int(rng.integers(2**31)))

    def __call__(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        out = self._render(level, y0, x0, h, w)
        if self.layout.blur is None:
            return out
        ly, lx = self._layout_index(level, y0, x0, h, w)
        where = self.layout.blur[ly][:, lx]
        if where.any():  # out of focus: the same region rendered with a margin, Gaussian-blurred
            out[where] = blurred_window(self._render, level, y0, x0, h, w, self.downsamples[level])[where]
        return out

    def _layout_index(self, level: int, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        lh, lw = self.shapes[level]
        scale_y, scale_x = self.layout.height / lh, self.layout.width / lw
        ys, xs = np.arange(y0, y0 + h), np.arange(x0, x0 + w)
        ly = np.clip(((ys + 0.5) * scale_y / self.layout.downsample).astype(int), 0, self.layout.labels.shape[0] - 1)
        lx = np.clip(((xs + 0.5) * scale_x / self.layout.downsample).astype(int), 0, self.layout.labels.shape[1] - 1)
        return ly, lx

    def _render(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        ys, xs = np.arange(y0, y0 + h), np.arange(x0, x0 + w)
        ly, lx = self._layout_index(level, y0, x0, h, w)
        labels = self.layout.labels[ly][:, lx]
        noise = self.noise_rng.normal(0, 1.2, size=(h, w)).astype(np.float32)
        out = np.empty((h, w, 3), np.float32)
        for c in range(3):  # glass, with the noise of a real scan (channel by channel: 4× a broadcast over RGB)
            np.add(noise, GLASS[c], out=out[..., c])
        tissue = self.textures[level][1 if self.layout.stain == "ihc" else 0]
        d = self.downsamples[level]
        for code, texture in ((TISSUE, tissue), (TUMOUR, self.textures[level][1]), (FAINT, tissue)):
            where = labels == code
            count = np.count_nonzero(where)
            if not count:
                continue
            th, tw = texture.shape[:2]
            ty, tx = (ys + self.offset[0] // d) % th, (xs + self.offset[1] // d) % tw
            if count > where.size // 8:  # much of the strip: gather whole rows, then copy where the class is
                block = texture[ty][:, tx]
                for c in range(3):
                    np.copyto(out[..., c], block[..., c], where=where)
            else:  # a few pixels (glass is most of a slide): look up only those
                rows, cols = np.nonzero(where)
                out[rows, cols] = texture[ty[rows], tx[cols]]
        paint_faint(out, labels)
        if self.layout.fold is not None:
            fold = self.layout.fold[ly][:, lx]
            if fold.any():  # light through two layers: the transmitted share squared
                out[fold] = out[fold] ** 2 / 255
        paint_bubbles(out, labels)
        flat = out.reshape(-1, 3)  # pixel indices found once: a boolean mask over RGB is searched per use
        pen, debris = np.flatnonzero(labels == PEN_MARK), np.flatnonzero(labels == DEBRIS_SPECK)
        flat[pen] = 0.2 * flat[pen] + 0.8 * PEN
        flat[debris] = DEBRIS
        paint_ink(out, labels)
        return np.clip(out, 0, 255, out=out).astype(np.uint8)


def _label_image(text: str) -> np.ndarray:
    image = Image.new("RGB", (300, 300), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 20, 280, 280), outline=(0, 0, 0), width=4)
    draw.text((40, 130), text, fill=(0, 0, 0))
    return np.asarray(image)


def write_demo_slide(path: Path, *, height: int, width: int, positive: bool, seed: int, flavour: str = "aperio",
                     mpp: float | None = 0.25, magnification: float | None = 40.0,
                     downsamples: tuple[int, ...] = (1, 4, 16), tumour_fraction: float | None = None,
                     foci: int | None = None, artefacts: tuple[str, ...] = ()) -> SlideLayout:
    """Write one demo slide plus its ground truth (``<stem>.tissue.png``, ``<stem>.tumour.png``, ``<stem>.truth.json``,
    and ``<stem>.ink.png`` / ``.blur.png`` / ``.faint.png`` / ``.bubble.png`` / ``.fold.png`` with those artefacts).

    ``tumour_fraction`` and ``foci``: see :func:`make_layout`. ``artefacts``: any of :data:`wsi.demo_artefacts.ARTEFACTS`
    (``ihc``: an IHC-stained slide)
    (:mod:`wsi.demo_artefacts`), drawn with their own generator: the tissue is the same slide's.
    """
    unknown = set(artefacts) - set(ARTEFACTS)
    if unknown:
        raise ValueError(f"unknown artefacts {sorted(unknown)}; choose from {list(ARTEFACTS)}")
    rng = np.random.default_rng(seed)
    layout = make_layout(rng, height, width, positive, tumour_fraction, foci)
    if "ink" in artefacts:
        draw_ink(np.random.default_rng([seed, 1]), layout.labels, layout.tissue_mask, (mpp or 0.25) * layout.downsample)
    if "blur" in artefacts:
        layout.blur = draw_blur(np.random.default_rng([seed, 2]), layout.tissue_mask)
    if "faint" in artefacts:
        draw_faint(np.random.default_rng([seed, 3]), layout.labels, TISSUE)
    if "ihc" in artefacts:
        layout.stain = "ihc"
    if "bubbles" in artefacts:
        draw_bubbles(np.random.default_rng([seed, 4]), layout.labels, layout.tissue_mask, (mpp or 0.25) * layout.downsample)
    if "fold" in artefacts:
        layout.fold = draw_fold(np.random.default_rng([seed, 5]), layout.tissue_mask, (mpp or 0.25) * layout.downsample)
    renderer = SlideRenderer(layout, downsamples, rng)
    thumb = renderer(len(downsamples) - 1, 0, 0, *renderer.shapes[-1])
    label = _label_image(path.stem)
    macro = np.concatenate([np.asarray(Image.fromarray(label).resize((thumb.shape[0], thumb.shape[0]))), thumb], axis=1)
    write_pyramid(path, height, width, renderer, downsamples=downsamples, flavour=flavour, mpp=mpp,
                  magnification=magnification, thumbnail=thumb, label=label, macro=macro)
    stem = path.with_suffix("")
    Image.fromarray((layout.tissue_mask * 255).astype(np.uint8)).save(f"{stem}.tissue.png")
    Image.fromarray((layout.tumour_mask * 255).astype(np.uint8)).save(f"{stem}.tumour.png")
    if "ink" in artefacts:
        Image.fromarray((layout.ink_mask * 255).astype(np.uint8)).save(f"{stem}.ink.png")
    if "faint" in artefacts:
        Image.fromarray((layout.labels == FAINT).astype(np.uint8) * 255).save(f"{stem}.faint.png")
    if layout.blur is not None:
        Image.fromarray((layout.blur * 255).astype(np.uint8)).save(f"{stem}.blur.png")
    if "bubbles" in artefacts:
        Image.fromarray((layout.labels == BUBBLE).astype(np.uint8) * 255).save(f"{stem}.bubble.png")
    if layout.fold is not None:
        Image.fromarray((layout.fold * 255).astype(np.uint8)).save(f"{stem}.fold.png")
    truth = {"downsample": layout.downsample, "width": width, "height": height, "positive": positive,
             "mpp": mpp, "tissue_fraction": float(layout.tissue_mask.mean()), "artefacts": list(artefacts),
             "tumour_fraction_of_tissue": float(layout.tumour_mask.sum() / max(1, layout.tissue_mask.sum()))}
    Path(f"{stem}.truth.json").write_text(json.dumps(truth, indent=2))
    return layout


def load_truth(slide_path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(tissue mask, tumour mask, metadata) saved beside a demo slide; masks at ``meta['downsample']``."""
    stem = Path(slide_path).with_suffix("")
    tissue = np.asarray(Image.open(f"{stem}.tissue.png")) > 0
    tumour = np.asarray(Image.open(f"{stem}.tumour.png")) > 0
    return tissue, tumour, json.loads(Path(f"{stem}.truth.json").read_text())


def tumour_tiles(slide_path: Path, coords: np.ndarray, tile_size: float) -> np.ndarray:
    """Which tiles (level-0 top-left ``coords``, ``tile_size`` level-0 px) of a demo slide have their centre in
    its truth's tumour mask: the ground truth to score a model's tiles against."""
    _, tumour, meta = load_truth(slide_path)
    centres = (np.asarray(coords, np.float64) + tile_size / 2) / meta["downsample"]
    ys = np.clip(centres[:, 1].astype(int), 0, tumour.shape[0] - 1)
    xs = np.clip(centres[:, 0].astype(int), 0, tumour.shape[1] - 1)
    return tumour[ys, xs]


def _slide_spec(out_dir: Path, i: int, size: int, seed: int, tumour: dict, artefacts: tuple[str, ...] = ()
                ) -> tuple[dict, dict]:
    """(write_demo_slide's arguments, slides.csv row) of demo slide ``i``: every fourth a 20x generic TIFF."""
    positive, generic = i % 2 == 1, i % 4 == 2
    height = size * 3 // 4
    name = f"demo_{i:03d}" + (".tif" if generic else ".svs")
    kwargs = dict(path=out_dir / name, height=height, width=size, positive=positive, seed=seed * 1000 + i,
                  artefacts=artefacts, **tumour)
    if generic:
        kwargs.update(height=height // 2, width=size // 2, flavour="generic", mpp=0.5, magnification=None)
    row = {"slide_id": f"demo_{i:03d}", "slide_path": name, "label": "tumor" if positive else "normal",
           "case_id": f"patient_{i:03d}"}
    return kwargs, row


def _write(kwargs: dict) -> None:
    write_demo_slide(**kwargs)


def make_demo_cohort(out_dir: Path, *, n_slides: int = 12, size: int = 8192, seed: int = 0,
                     tumour_fraction: float | None = None, foci: int | None = None,
                     artefacts: tuple[str, ...] = (), progress=None, workers: int | None = None) -> Path:
    """Write ``n_slides`` slides (every fourth a generic 20× TIFF, the rest 40× Aperio SVS) and ``slides.csv``.

    ``size`` is the level-0 width of a 40× slide; 20× slides cover the same area at half the pixels.
    Half the slides (alternating) are tumour-positive; ``tumour_fraction`` / ``foci`` make their tumour
    focal (:func:`make_layout`), the default draws one or two large regions; ``artefacts`` go on every slide
    (:func:`write_demo_slide`). Each slide is seeded on its own (``seed * 1000 + i``),
    so ``workers`` processes (default: one per core) write the same bytes as one. Returns slides.csv's path.
    """
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    if n_slides < 1:
        raise ValueError("n_slides must be at least 1")
    if size < 1024:
        raise ValueError("size must be at least 1024 pixels")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tumour_fraction is not None and not 0 < tumour_fraction < 1:
        raise ValueError(f"tumour_fraction must be between 0 and 1, got {tumour_fraction}")
    if foci is not None and foci < 1:
        raise ValueError(f"foci must be at least 1, got {foci}")
    if set(artefacts) - set(ARTEFACTS):
        raise ValueError(f"unknown artefacts {sorted(set(artefacts) - set(ARTEFACTS))}; choose from {list(ARTEFACTS)}")
    tumour = {k: v for k, v in (("tumour_fraction", tumour_fraction), ("foci", foci)) if v is not None}
    specs = [_slide_spec(out_dir, i, size, seed, tumour, tuple(artefacts)) for i in range(n_slides)]
    workers = min(workers or os.cpu_count() or 1, n_slides)
    if workers == 1:
        for done, (kwargs, _) in enumerate(specs, 1):
            write_demo_slide(**kwargs)
            if progress is not None:
                progress(done, n_slides)
    else:  # spawned: safe from a process that already runs threads (torch, Dask)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for done, future in enumerate(as_completed([pool.submit(_write, kwargs) for kwargs, _ in specs]), 1):
                future.result()
                if progress is not None:
                    progress(done, n_slides)
    rows = [row for _, row in specs]
    csv_path = out_dir / "slides.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return csv_path
