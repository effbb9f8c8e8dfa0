"""Per-slide stages: plain functions from a slide entry and the config to artifacts on disk.

Each writes its data files first and its metadata JSON last, all atomically, and returns that
metadata. A stage knows nothing of state, retries or scheduling; the runner does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from features.store import store_path
from pipelines import __version__
from pipelines.artifacts import RunPaths, atomic_write, write_json, write_image, write_npy, write_text
from pipelines.config import RunConfig
from pipelines.evaluation import mil_stage
from pipelines.heatmaps import drawable, heatmap_dir, heatmaps_stage, resolve_strategy, wants_heatmap
from pipelines.manifest import SlideEntry
from wsi.slide import open_slide
from wsi.tiling import ReadPlan, TileGrid, grid_overlay, tile_grid
from wsi.tissue import TissueMask, load_mask_png, mask_slide, qc_image, save_mask_png

log = logging.getLogger(__name__)


def tissue_stage(entry: SlideEntry, cfg: RunConfig, paths: RunPaths) -> dict:
    """Mask the tissue; write the QC thumbnail, the mask PNG and the slide's geometry and mpp."""
    with open_slide(entry.slide_path, slide_id=entry.slide_id, backend=cfg.slides.backend, mpp=entry.mpp,
                    default_mpp=cfg.slides.default_mpp) as slide:
        tissue, overview = mask_slide(slide, cfg.tissue)
        meta = {
            "slide_id": entry.slide_id,
            "slide_path": str(entry.slide_path),
            "backend": slide.backend,
            "dimensions": list(slide.dimensions),
            "level_dimensions": [list(d) for d in slide.level_dimensions],
            "level_downsamples": list(slide.level_downsamples),
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
            "objective_power": slide.objective_power,
            "warnings": list(slide.warnings),
        }
    meta.update({
        "mask_shape": list(tissue.mask.shape),
        "mask_downsample": list(tissue.downsample),
        "tissue_fraction": tissue.tissue_fraction,
        "n_regions": tissue.n_regions,
        "n_holes": tissue.n_holes,
        "params": cfg.tissue.model_dump(mode="json"),
        "version": __version__,
    })
    if tissue.n_regions == 0:
        message = "no tissue found: every tile stage downstream gets zero tiles"
        meta["warnings"].append(message)
        log.warning("%s: %s", entry.slide_id, message)
    write_image(paths.tissue_qc(entry.slide_id), qc_image(overview, tissue, cfg.tissue.qc_max_size))
    atomic_write(paths.tissue_mask(entry.slide_id), lambda f: save_mask_png(tissue.mask, f))
    write_json(paths.tissue_meta(entry.slide_id), meta)
    return meta


def load_tissue(paths: RunPaths, slide_id: str) -> tuple[TissueMask, dict]:
    """The tissue stage's mask and metadata for ``slide_id``."""
    meta = json.loads(paths.tissue_meta(slide_id).read_text())
    mask = load_mask_png(paths.tissue_mask(slide_id))
    return TissueMask(mask, tuple(meta["mask_downsample"]), meta["n_regions"], meta["n_holes"]), meta


def tiles_stage(entry: SlideEntry, cfg: RunConfig, paths: RunPaths) -> dict:
    """Tile grid at the target resolution from the tissue mask; no pixels are read."""
    tissue, slide_meta = load_tissue(paths, entry.slide_id)
    grid = tile_grid(tuple(slide_meta["dimensions"]), slide_meta["mpp"], tuple(slide_meta["level_downsamples"]),
                     tissue, cfg.tiling)
    meta = {"slide_id": entry.slide_id, **grid.metadata(), "slide_mpp": slide_meta["mpp"],
            "dimensions": slide_meta["dimensions"], "params": cfg.tiling.model_dump(mode="json"),
            "version": __version__, "warnings": []}
    if len(grid.coords) == 0:
        message = "no tiles: no part of the tissue mask reaches min_tissue_fraction" if tissue.n_regions else "no tiles: no tissue"
        meta["warnings"].append(message)
        log.warning("%s: %s", entry.slide_id, message)
    qc = np.asarray(Image.open(paths.tissue_qc(entry.slide_id)).convert("RGB"))
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


# The fingerprint of the task being run, for stages that record it inside their artifacts.
TASK_FINGERPRINT: ContextVar[str | None] = ContextVar("TASK_FINGERPRINT", default=None)


@lru_cache(maxsize=2)
def _cached_encoder(spec_json: str):
    """One encoder per worker process and spec: built once, reused for every slide."""
    from features.encoders import EncoderConfig, create_encoder

    return create_encoder(EncoderConfig.model_validate_json(spec_json), field="features.teacher")


def _extract(entry: SlideEntry, cfg: RunConfig, paths: RunPaths, encoder, label: str, extra_attrs: dict) -> dict:
    """Every tile of one slide through ``encoder`` into ``features/<label>/<slide_id>.zarr``."""
    from features.extract import TileDataset, encoder_attrs, extract_slide

    grid = load_tiles(paths, entry.slide_id)
    slide_meta = json.loads(paths.tissue_meta(entry.slide_id).read_text())
    dataset = TileDataset(slide_meta["slide_path"], grid.coords, grid.plan, backend=cfg.slides.backend,
                          mpp=slide_meta["mpp"], slide_id=entry.slide_id)
    attrs = {**encoder_attrs(encoder, grid.plan, TASK_FINGERPRINT.get()), **extra_attrs, "encoder_label": label}
    stats = extract_slide(dataset, encoder, store_path(paths.root, label, entry.slide_id), cfg.features, attrs)
    return {**stats, "encoder": label, "dim": encoder.dim, "warnings": []}


def features_stage(entry: SlideEntry, cfg: RunConfig, paths: RunPaths) -> dict:
    """Teacher features for every tile into ``features/<teacher>/<slide_id>.zarr``."""
    encoder = _cached_encoder(cfg.features.teacher.model_dump_json())
    return _extract(entry, cfg, paths, encoder, cfg.features.teacher.label, {})


def student_label(cfg: RunConfig) -> str:
    """Feature folder of the distilled student's (teacher-space) features."""
    return f"student_{cfg.distill.student.label}"


@lru_cache(maxsize=2)
def _cached_student(model_dir: str, version: tuple, precision: str):
    """The distilled student, loaded once per worker process and model file version (size, mtime)."""
    from distill.model import load_student

    return load_student(Path(model_dir), precision=precision)


def student_features_stage(entry: SlideEntry, cfg: RunConfig, paths: RunPaths) -> dict:
    """The distilled student's teacher-space features into ``features/student_<name>/<slide_id>.zarr``."""
    weights = paths.student_dir / "student.safetensors"
    st = weights.stat()
    encoder, card = _cached_student(str(paths.student_dir), (st.st_size, st.st_mtime_ns), cfg.distill.student.precision)
    extra = {"distilled_from": card["teacher"].get("label", ""), "student_card": str(paths.student_dir / "student.json")}
    return _extract(entry, cfg, paths, encoder, student_label(cfg), extra)


def distill_stage(entries: list[SlideEntry], cfg: RunConfig, paths: RunPaths) -> dict:
    """EFCM stage 1: distil the student from the teacher's stored features (labels unused)."""
    from distill.trainer import SlideTiles, train
    from features.store import open_store

    dcfg = cfg.distill
    use = [e for e in entries if not (dcfg.exclude_test and e.split == "test")]
    if not use:
        raise ValueError("no slides to distil on (all are in the test split)")
    teacher = cfg.features.teacher.label
    rng = np.random.default_rng(dcfg.seed)
    per_slide = -(-(dcfg.max_train_tiles + dcfg.max_val_tiles) // len(use))  # bounded memory: sample before loading
    slides, dim, digests = [], None, {}
    for entry in use:
        store = open_store(paths.root, teacher, entry.slide_id)
        digests.setdefault(store.attrs.get("weights_sha256"), entry.slide_id)
        if len(store) == 0:
            continue
        rows = np.sort(rng.choice(len(store), min(per_slide, len(store)), replace=False))
        meta = json.loads(paths.tissue_meta(entry.slide_id).read_text())
        slides.append(SlideTiles(entry.slide_id, Path(meta["slide_path"]), meta["mpp"], load_tiles(paths, entry.slide_id).plan,
                                 store.coords[rows], np.asarray(store.features.oindex[rows, :], dtype=np.float16)))
        dim = store.attrs["dim"]
    if not slides:
        raise ValueError("no teacher features to distil from (every slide has zero tiles)")
    if len(digests) > 1:  # targets from several models would mix feature spaces
        raise ValueError(f"the teacher stores come from {len(digests)} different models (e.g. slides "
                         f"{', '.join(digests.values())}): rerun the features stage (--force features)")
    card = train(slides, dim, dcfg, paths.student_dir, fingerprint=TASK_FINGERPRINT.get() or "",
                 teacher={"label": teacher, "dim": dim, "spec": cfg.features.teacher.model_dump(mode="json"),
                          "weights": cfg.features.teacher.weights_source(),
                          "weights_sha256": next(iter(digests)),
                          "random_weights": cfg.features.teacher.random_weights})
    best = card["metrics"]["best"]
    return {"n_slides": len(slides), "val_cosine": best.get("cosine"), "val_r2": best.get("r2"),
            "initial_cosine": card["metrics"]["initial"].get("cosine"), "precision": card["precision"], "warnings": []}


def qc_stage(entries: list[SlideEntry], cfg: RunConfig, paths: RunPaths) -> dict:
    """Cohort QC table ``qc/slides.csv``: per slide its mpp and source, tissue, tiles and read plan."""
    import csv
    import io

    columns = ["slide_id", "label", "case_id", "backend", "width", "height", "mpp", "mpp_source", "tissue_fraction",
               "n_regions", "n_holes", "n_tiles", "read_level", "read_size", "level0_size", "delivered_mpp", "warnings"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for entry in entries:
        tissue = json.loads(paths.tissue_meta(entry.slide_id).read_text())
        tiles = json.loads(paths.tile_meta(entry.slide_id).read_text())
        writer.writerow({
            "slide_id": entry.slide_id, "label": entry.label or "", "case_id": entry.case_id or "",
            "backend": tissue["backend"], "width": tissue["dimensions"][0], "height": tissue["dimensions"][1],
            "mpp": tissue["mpp"], "mpp_source": tissue["mpp_source"], "tissue_fraction": round(tissue["tissue_fraction"], 4),
            "n_regions": tissue["n_regions"], "n_holes": tissue["n_holes"], "n_tiles": tiles["n_tiles"],
            "read_level": tiles["read_level"], "read_size": tiles["read_size"], "level0_size": tiles["level0_size"],
            "delivered_mpp": round(tiles["delivered_mpp"], 4), "warnings": "; ".join(tissue["warnings"] + tiles["warnings"]),
        })
    write_text(paths.qc_table, buffer.getvalue())
    return {"n_slides": len(entries), "slides": [e.slide_id for e in entries]}


@dataclass(frozen=True)
class Stage:
    """A stage declaration: what it runs, on what, after what, which config it reads, what it writes."""

    name: str
    fn: Callable
    scope: Literal["slide", "cohort"]
    after: tuple[str, ...] = ()
    config: tuple[str, ...] = ()  # dotted RunConfig fields (or whole sections) whose values enter the fingerprint
    reads_slide: bool = False  # the slide file itself is an input
    artifacts: Callable[[RunPaths, str, RunConfig], list[Path]] = lambda paths, key, cfg: []
    resources: dict[str, float] = field(default_factory=dict)  # Dask resources, e.g. {"GPU": 1}
    extra_inputs: Callable[..., list] = lambda cfg, hashes: []  # more input fingerprints (e.g. weight files)
    enabled: Callable[[RunConfig], bool] = lambda cfg: True  # False: this config does not need the stage
    applies: Callable[[RunConfig, SlideEntry], bool] = lambda cfg, entry: True  # slide stages: which slides get a task
    encoders: Callable[[RunConfig], list[str]] = lambda cfg: []  # dotted config fields of the encoders it builds from spec
    uses_torch: bool = False  # runs a model: the runner sets torch's threads to the cores the task owns


def needs_student(cfg: RunConfig) -> bool:
    """Distillation and student features only serve the MIL strategies that use the student."""
    return any(s in ("reuse", "retrain", "end2end") for s in cfg.mil.strategies)


# All stages in run order. A slide stage runs per slide after the stages in ``after`` (same slide);
# a cohort stage runs once, on the slides whose ``after`` stages are done.
STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("tissue", tissue_stage, "slide", config=("slides.backend", "slides.default_mpp", "tissue"), reads_slide=True,
          artifacts=lambda p, k, c: [p.tissue_qc(k), p.tissue_mask(k), p.tissue_meta(k)]),
    Stage("tiles", tiles_stage, "slide", after=("tissue",), config=("tiling",),
          artifacts=lambda p, k, c: [p.tile_overlay(k), p.tile_coords(k), p.tile_meta(k)]),
    Stage("features", features_stage, "slide", after=("tiles",), config=("features.teacher", "features.dtype"),
          artifacts=lambda p, k, c: [store_path(p.root, c.features.teacher.label, k)], resources={"GPU": 1}, uses_torch=True,
          extra_inputs=lambda cfg, hashes: weights_inputs(cfg, "features.teacher", hashes), encoders=lambda cfg: ["features.teacher"]),
    Stage("qc", qc_stage, "cohort", after=("tiles",), artifacts=lambda p, k, c: [p.qc_table]),
    Stage("distill", distill_stage, "cohort", after=("features",), config=("distill", "features.teacher", "features.dtype"),
          artifacts=lambda p, k, c: [p.student_dir / "student.safetensors", p.student_dir / "student.json"],
          resources={"GPU": 1}, uses_torch=True, enabled=needs_student, extra_inputs=lambda cfg, hashes: weights_inputs(cfg, "distill.student", hashes),
          encoders=lambda cfg: ["distill.student"]),
    Stage("student_features", student_features_stage, "slide", after=("tiles", "distill"), config=("features.dtype",),
          artifacts=lambda p, k, c: [store_path(p.root, student_label(c), k)], resources={"GPU": 1}, uses_torch=True,
          enabled=needs_student),
    Stage("mil", mil_stage, "cohort", after=("features", "student_features"), config=("mil",),
          artifacts=lambda p, k, c: [p.root / "results" / "summary.md", p.root / "results" / "predictions.csv"],
          resources={"GPU": 1}, uses_torch=True, encoders=lambda cfg: ["features.teacher"] if "end2end" in cfg.mil.strategies and "fpt" in cfg.mil.finetune else []),
    Stage("heatmaps", heatmaps_stage, "slide", after=("mil",), config=("heatmaps",),
          artifacts=lambda p, k, c: [heatmap_dir(p, resolve_strategy(c), k) / "heatmap.json"],
          enabled=lambda cfg: cfg.heatmaps.slides != "none" and bool(drawable(cfg)),
          applies=wants_heatmap, uses_torch=True, resources={"GPU": 1},
          encoders=lambda cfg: ["features.teacher"] if resolve_strategy(cfg) == "teacher" and cfg.heatmaps.overlap > 0 else []),
]}


def encoder_config(cfg: RunConfig, dotted: str):
    """The EncoderConfig at a dotted field of the run config (``features.teacher``, ``distill.student``)."""
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def weights_inputs(cfg: RunConfig, dotted: str, hashes=None) -> list:
    """The content (sha256, cached in ``hashes``) of the encoder's local weights file, so replacing the file
    reruns what it made and touching it does not."""
    from pipelines.state import file_fingerprint

    weights = encoder_config(cfg, dotted).weights
    return [file_fingerprint(Path(weights), "content", hashes)] if weights else []


def check_encoders(cfg: RunConfig, stages: set[str]) -> None:
    """Before any task runs: every encoder the planned stages build has weights (or an explicit seed for
    random ones), and every local weights file exists. Raises ValueError naming the field."""
    from features.encoders import NoWeightsError, WeightsError, no_weights_message

    fields = {f: None for name in STAGES if name in stages for f in STAGES[name].encoders(cfg)}
    for dotted in fields:
        spec = encoder_config(cfg, dotted)
        if dotted == "features.teacher" and spec.random_weights and spec.seed is None:  # a student starts from distill.seed
            raise NoWeightsError(no_weights_message(spec, dotted))
        if spec.weights is not None and not Path(spec.weights).is_file():
            raise WeightsError(f"{dotted}.weights: {spec.weights}: file not found")


def upstream(stage: str) -> list[str]:
    """Every stage ``stage`` depends on, transitively, in run order."""
    needed: set[str] = set()
    todo = list(STAGES[stage].after)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(STAGES[name].after)
    return [s for s in STAGES if s in needed]


def downstream(stage: str) -> list[str]:
    """``stage`` and every stage that depends on it, transitively, in run order."""
    return [s for s in STAGES if s == stage or stage in upstream(s)]
