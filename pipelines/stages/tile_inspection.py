"""The tiles stage's checks of each tile: undecodable tiles leave the grid, each tile's focus is scored, and its
share of folded tissue is recorded (and, if asked, tiles mostly fold leave the grid).

One pass over the pixels at the read level (``slides.verify_tiles``) answers both: a tile that does not
decode, and one that is out of focus, are known before any model sees them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipelines.config import RunConfig
from pipelines.engine.run_dir import remove, write_npy
from pipelines.manifest import SlideEntry
from wsi.errors import SlideError
from wsi.slide import open_slide
from wsi.tiling import TileGrid, inspect_tiles, tissue_fractions, unreadable_message, unreadable_tiles
from wsi.tissue import TissueMask

log = logging.getLogger(__name__)

MAX_LISTED = 100  # unreadable regions or tiles listed one by one in a stage's JSON (all are counted)


def inspect_grid(entry: SlideEntry, cfg: RunConfig, slide_meta: dict, grid: TileGrid, meta: dict
                 ) -> tuple[TileGrid, dict, np.ndarray]:
    """Read every tile once at its read level: undecodable ones leave the grid (recorded), each kept tile's
    sharpness is returned (aligned with the new grid), and tiles below ``tiling.min_sharpness`` leave the
    grid too. The blurred share is the QC stage's (:func:`blurred_fraction`), so changing
    ``tiling.blur_ratio`` reruns no tile and no feature.

    The share compared with ``slides.max_unreadable_fraction`` is of the grid's tiles; the overview's own
    undecodable area was held to the same limit by the tissue stage (those parts count as glass).
    """
    with open_slide(entry.slide_path, slide_id=entry.slide_id, backend=cfg.slides.backend,
                    mpp=slide_meta["mpp"]) as slide:
        bad, scores = inspect_tiles(slide, grid.coords, grid.plan)
    keep = np.ones(len(grid.coords), bool)
    keep[list(bad)] = False
    n_bad, total = len(bad), len(grid.coords)
    meta.update(n_unreadable_tiles=n_bad,
                unreadable_tiles=unreadable_tiles(bad, grid.coords, grid.plan.read_level, MAX_LISTED))
    if n_bad:
        what = unreadable_message(bad, total)
        if n_bad / total > cfg.slides.max_unreadable_fraction:
            raise SlideError(entry.slide_id, f"{what} — more than slides.max_unreadable_fraction "
                                             f"({cfg.slides.max_unreadable_fraction:g})")
        warn(entry, meta, f"{what}: left out of the grid")
    scored = scores[keep & np.isfinite(scores)]
    meta["sharpness_median"] = float(np.median(scored)) if len(scored) else None  # the blurred share: in the QC
    meta["n_blurry_dropped"] = 0
    if cfg.tiling.min_sharpness is not None:
        blurry = keep & (scores < cfg.tiling.min_sharpness)  # NaN (too little stain to judge) is kept
        meta["n_blurry_dropped"] = int(blurry.sum())
        keep &= ~blurry
    grid = TileGrid(grid.coords[keep], grid.tissue_fraction[keep], grid.plan)
    meta["n_tiles"] = len(grid.coords)
    return grid, meta, scores[keep]


def read_check_meta(entry: SlideEntry, checks, meta: dict, coords: np.ndarray, level: int) -> dict:
    """What the features read's check of every tile found (``slides.verify_tiles: features``), in the fields
    :func:`inspect_grid` gives the tiles stage's JSON (also in the store's ``tile_check`` attribute)."""
    found = checks.summary(coords, level, MAX_LISTED)
    meta.update({k: v for k, v in found.items() if k != "n_read"})
    n_bad, total = found["n_unreadable_tiles"], found["n_read"]
    if n_bad:
        warn(entry, meta, f"{unreadable_message(checks.unreadable, total)}: left out of the features")
    meta["n_tiles"] = total - n_bad - found["n_blurry_dropped"]
    return meta


def warn(entry: SlideEntry, meta: dict, message: str) -> None:
    meta["warnings"].append(message)
    log.warning("%s: %s", entry.slide_id, message)


def blurred_fraction(scores: np.ndarray, ratio: float) -> float | None:
    """The share of a slide's scored tiles whose sharpness is below ``ratio`` × the slide's median (None: none scored)."""
    scored = scores[np.isfinite(scores)]
    return float((scored < ratio * np.median(scored)).mean()) if len(scored) else None


def fold_shares(tissue: TissueMask, grid: TileGrid) -> np.ndarray | None:
    """Each tile's share of folded tissue (``tissue.folds``), None when the slide has no fold."""
    fold = tissue.flagged.get("fold")
    if fold is None:
        return None
    return tissue_fractions(TissueMask(fold, tissue.downsample, 0, 0), grid.coords[:, 0], grid.coords[:, 1],
                            grid.plan.level0_size)


def drop_folds(cfg: RunConfig, tissue: TissueMask, grid: TileGrid, meta: dict) -> tuple[TileGrid, dict]:
    """Count the tissue grid's tiles at least half fold (``n_fold_tiles``); those more than
    ``tiling.max_fold_fraction`` fold leave the grid (before any tile is read)."""
    shares = fold_shares(tissue, grid)
    meta["n_fold_tiles"] = 0 if shares is None else int((shares >= 0.5).sum())
    meta["n_fold_dropped"] = 0
    if cfg.tiling.max_fold_fraction is None or shares is None:
        return grid, meta
    keep = shares <= cfg.tiling.max_fold_fraction
    meta["n_fold_dropped"] = int((~keep).sum())
    meta["n_tiles"] = int(keep.sum())
    return TileGrid(grid.coords[keep], grid.tissue_fraction[keep], grid.plan), meta


def write_fold_shares(target: Path, tissue: TissueMask, grid: TileGrid) -> None:
    """The final grid's fold shares beside its coords (no fold: no file, an old one removed)."""
    shares = fold_shares(tissue, grid)
    if shares is None:
        remove(target)
    else:
        write_npy(target, shares)
