"""The features stages: the teacher's features of every tile (or an imported store checked), the student's."""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

from features.store import store_path
from pipelines.config import RunConfig
from pipelines.engine.run_dir import RunPaths
from pipelines.engine.task_context import TASK_FINGERPRINT
from pipelines.manifest import SlideEntry
from pipelines.stages.tiles import load_tiles

log = logging.getLogger(__name__)


@lru_cache(maxsize=2)
def cached_encoder(spec_json: str):
    """One encoder per worker process and spec: built once, reused for every slide."""
    from features.encoders import EncoderConfig, create_encoder

    return create_encoder(EncoderConfig.model_validate_json(spec_json), field="features.teacher")


def extract_features(entry: SlideEntry, cfg: RunConfig, paths: RunPaths, encoder, label: str, extra_attrs: dict) -> dict:
    """Every tile of one slide through ``encoder`` into ``features/<label>/<slide_id>.zarr``."""
    from features.extract import TileDataset, encoder_attrs, extract_slide
    from features.zoo import mpp_mismatch

    grid = load_tiles(paths, entry.slide_id)
    slide_meta = json.loads(paths.tissue_meta(entry.slide_id).read_text())
    dataset = TileDataset.for_encoder(encoder, entry.slide_path, grid.coords, grid.plan, backend=cfg.slides.backend,
                                      mpp=slide_meta["mpp"], slide_id=entry.slide_id)
    attrs = {**encoder_attrs(encoder, grid.plan, TASK_FINGERPRINT.get()), **extra_attrs, "encoder_label": label}
    stats = extract_slide(dataset, encoder, store_path(paths.root, label, entry.slide_id), cfg.features, attrs)
    warnings = [w for w in [mpp_mismatch(encoder.zoo, grid.plan.target_mpp)] if w]
    for message in warnings:
        log.warning("%s: %s", entry.slide_id, message)
    return {**stats, "encoder": label, "dim": encoder.dim, "warnings": warnings}


def features_stage(entry: SlideEntry, cfg: RunConfig, paths: RunPaths) -> dict:
    """Teacher features for every tile into ``features/<teacher>/<slide_id>.zarr``; for a features-only slide,
    a check of its imported store."""
    if not entry.has_pixels:
        return imported_features_check(entry, cfg, paths)
    encoder = cached_encoder(cfg.features.teacher.model_dump_json())
    return extract_features(entry, cfg, paths, encoder, cfg.features.teacher.label, {})


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
    return extract_features(entry, cfg, paths, encoder, student_label(cfg), extra)


