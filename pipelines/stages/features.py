"""The features stages: the teacher's features of every tile (or an imported store checked), the student's."""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np

from features.store import store_path
from pipelines.config import RunConfig
from pipelines.engine.run_dir import RunPaths
from pipelines.engine.task_context import TASK_FINGERPRINT
from pipelines.manifest import SlideEntry
from pipelines.stages.tile_inspection import read_check_meta
from pipelines.stages.tiles import load_tiles
from wsi.errors import SlideError
from wsi.tiling import TileGrid

log = logging.getLogger(__name__)


@lru_cache(maxsize=2)
def cached_encoder(spec_json: str):
    """One encoder per worker process and spec: built once, reused for every slide."""
    from features.encoders import EncoderConfig, create_encoder

    return create_encoder(EncoderConfig.model_validate_json(spec_json), field="features.teacher")


def extract_features(entry: SlideEntry, cfg: RunConfig, paths: RunPaths, encoder, label: str, extra_attrs: dict,
                     grid: TileGrid, checks=None) -> dict:
    """Every tile of ``grid`` through ``encoder`` into ``features/<label>/<slide_id>.zarr``; with ``checks``
    (:class:`features.extract.TileChecks`) the read checks every tile too, and the store keeps those that pass."""
    from features.extract import TileDataset, UnreadableTiles, encoder_attrs, extract_slide
    from features.zoo import mpp_mismatch

    slide_meta = json.loads(paths.tissue_meta(entry.slide_id).read_text())
    dataset = TileDataset.for_encoder(encoder, entry.slide_path, grid.coords, grid.plan, backend=cfg.slides.backend,
                                      mpp=slide_meta["mpp"], slide_id=entry.slide_id, check=checks is not None)
    attrs = {**encoder_attrs(encoder, grid.plan, TASK_FINGERPRINT.get()), **extra_attrs, "encoder_label": label}
    try:
        stats = extract_slide(dataset, encoder, store_path(paths.root, label, entry.slide_id), cfg.features, attrs, checks)
    except UnreadableTiles as exc:
        raise SlideError(entry.slide_id, str(exc)) from None
    warnings = [w for w in [mpp_mismatch(encoder.zoo, grid.plan.target_mpp)] if w]
    for message in warnings:
        log.warning("%s: %s", entry.slide_id, message)
    meta = {**stats, "encoder": label, "dim": encoder.dim, "warnings": warnings}
    return meta if checks is None else read_check_meta(entry, checks, meta, grid.coords, grid.plan.read_level)


def features_stage(entry: SlideEntry, cfg: RunConfig, paths: RunPaths) -> dict:
    """Teacher features for every tile into ``features/<teacher>/<slide_id>.zarr``; for a features-only slide,
    a check of its imported store. With ``slides.verify_tiles: features`` this read is the slide's tile check:
    tiles that do not decode, or fall below ``tiling.min_sharpness``, are left out of the store, which every later
    stage reads its tiles from (:func:`slide_grid`)."""
    from features.extract import TileChecks

    if not entry.has_pixels:
        return imported_features_check(entry, cfg, paths)
    encoder = cached_encoder(cfg.features.teacher.model_dump_json())
    checks = (TileChecks(cfg.tiling.min_sharpness, cfg.slides.max_unreadable_fraction)
              if cfg.tile_check() == "features" else None)
    return extract_features(entry, cfg, paths, encoder, cfg.features.teacher.label, {}, load_tiles(paths, entry.slide_id),
                            checks)


def slide_grid(paths: RunPaths, cfg: RunConfig, slide_id: str) -> TileGrid:
    """The tiles a slide's features cover: the tiles stage's grid, or, where the teacher's features read checked
    the tiles (``slides.verify_tiles: features``), the tiles it kept (its store's coordinates)."""
    from features.store import open_store

    grid = load_tiles(paths, slide_id)
    if cfg.tile_check() != "features":
        return grid
    coords = open_store(paths.root, cfg.features.teacher.label, slide_id).coords
    return TileGrid(coords, np.full(len(coords), np.nan, np.float32), grid.plan)


def imported_features_check(entry: SlideEntry, cfg: RunConfig, paths: RunPaths) -> dict:
    """A features-only slide's teacher store: there, complete, with tiles (``wsi-pipeline import-features``)."""
    from features.store import open_store

    label = cfg.features.teacher.label
    try:
        store = open_store(paths.root, label, entry.slide_id)
    except FileNotFoundError:
        raise ValueError(f"{entry.slide_id}: no slide_path in slides.csv (line {entry.line}) and no imported features at "
                         f"{store_path(paths.root, label, entry.slide_id)}: run `wsi-pipeline import-features H5_DIR "
                         f"--out {paths.root} --encoder {label}` (the encoder name must be features.teacher's label)") from None
    if len(store) == 0:
        raise ValueError(f"{entry.slide_id}: its imported features have no tiles")
    return {"n_tiles": len(store), "dim": store.attrs["dim"], "imported_from": store.attrs.get("imported_from", ""),
            "encoder": label, "warnings": []}


def student_label(cfg: RunConfig) -> str:
    """Feature folder of the distilled student's (teacher-space) features."""
    return f"student_{cfg.distill.student.label}"


@lru_cache(maxsize=2)
def cached_student(model_dir: str, version: tuple, precision: str):
    """The distilled student, loaded once per worker process and model file version (size, mtime)."""
    from distill.model import load_student

    return load_student(Path(model_dir), precision=precision)


def student_features_stage(entry: SlideEntry, cfg: RunConfig, paths: RunPaths) -> dict:
    """The distilled student's teacher-space features into ``features/student_<name>/<slide_id>.zarr``."""
    weights = paths.student_dir / "student.safetensors"
    st = weights.stat()
    encoder, card = cached_student(str(paths.student_dir), (st.st_size, st.st_mtime_ns), cfg.distill.student.precision)
    extra = {"distilled_from": card["teacher"].get("label", ""), "student_card": str(paths.student_dir / "student.json")}
    return extract_features(entry, cfg, paths, encoder, student_label(cfg), extra, slide_grid(paths, cfg, entry.slide_id))


