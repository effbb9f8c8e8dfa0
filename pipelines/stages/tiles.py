"""The tiles stage: the tile grid at the target resolution, checked tile by tile where asked."""

from __future__ import annotations

import json
import logging

import numpy as np

from pipelines import __version__
from pipelines.config import RunConfig
from pipelines.engine.run_dir import RunPaths, remove, write_image, write_json, write_npy
from pipelines.manifest import SlideEntry
from pipelines.stages.tile_inspection import drop_folds, inspect_grid, write_fold_shares
from pipelines.stages.tissue import load_tissue
from wsi.files import read_image
from wsi.tiling import ReadPlan, TileGrid, grid_overlay, tile_grid

log = logging.getLogger(__name__)


def tiles_stage(entry: SlideEntry, cfg: RunConfig, paths: RunPaths) -> dict:
    """Tile grid at the target resolution from the tissue mask; with ``slides.verify_tiles: tiles`` every tile is then
    read once (undecodable ones leave the grid, focus is scored: :mod:`pipelines.stages.tile_inspection`)."""
    tissue, slide_meta = load_tissue(paths, entry.slide_id, with_excluded=False)
    grid = tile_grid(tuple(slide_meta["dimensions"]), slide_meta["mpp"], tuple(slide_meta["level_downsamples"]),
                     tissue, cfg.tiling)
    meta = {"slide_id": entry.slide_id, **grid.metadata(), "slide_mpp": slide_meta["mpp"],
            "dimensions": slide_meta["dimensions"], "params": cfg.tiling.model_dump(mode="json"),
            "version": __version__, "warnings": []}
    grid, meta = drop_folds(cfg, tissue, grid, meta)
    if cfg.tile_check() == "tiles":  # else the features read checks them (or nothing does)
        scores = np.zeros(0, np.float32)
        if len(grid.coords):
            grid, meta, scores = inspect_grid(entry, cfg, slide_meta, grid, meta)
        write_npy(paths.tile_sharpness(entry.slide_id), scores)
    else:
        remove(paths.tile_sharpness(entry.slide_id))
    if len(grid.coords) == 0:
        message = ("no tiles: every tile was left out (unreadable, below tiling.min_sharpness or above "
                   "tiling.max_fold_fraction)"
                   if meta.get("n_unreadable_tiles") or meta.get("n_blurry_dropped") or meta.get("n_fold_dropped") else
                   "no tiles: no part of the tissue mask reaches min_tissue_fraction" if tissue.n_regions else
                   "no tiles: no tissue")
        meta["warnings"].append(message)
        log.warning("%s: %s", entry.slide_id, message)
    write_fold_shares(paths.tile_folds(entry.slide_id), tissue, grid)
    qc = read_image(paths.tissue_qc(entry.slide_id))
    write_image(paths.tile_overlay(entry.slide_id), grid_overlay(qc, grid, tuple(slide_meta["dimensions"])))
    write_npy(paths.tile_coords(entry.slide_id), grid.coords)
    write_json(paths.tile_meta(entry.slide_id), meta)
    return meta


def load_tiles(paths: RunPaths, slide_id: str) -> TileGrid:
    """The tiles stage's grid for ``slide_id`` (coords N×2 level-0 x, y and the read plan)."""
    meta = json.loads(paths.tile_meta(slide_id).read_text())
    coords = np.load(paths.tile_coords(slide_id), allow_pickle=False)
    plan = ReadPlan(**{k: meta[k] for k in ReadPlan.__dataclass_fields__})
    return TileGrid(coords, np.full(len(coords), np.nan, np.float32), plan)


