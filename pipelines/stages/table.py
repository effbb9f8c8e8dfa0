"""The stage table: every stage of a run, in order, with what it runs on, needs, reads and writes.

Handed to the engine (plan, runner, status: :mod:`pipelines.engine`); the stage functions themselves know
nothing of it.
"""

from __future__ import annotations

from pathlib import Path

from distill.config import DistillConfig
from features.store import store_path
from pipelines.config import RunConfig
from pipelines.engine.stage import Stage, StageTable
from pipelines.manifest import SlideEntry
from pipelines.stages.distill import distill_stage
from pipelines.stages.features import features_stage, student_features_stage, student_label
from pipelines.stages.heatmaps import drawable, heatmap_dir, heatmaps_stage, resolve_strategy, wants_heatmap
from pipelines.stages.mil import fold_artifacts, mil_fingerprint_stages, mil_fold_stage, mil_key_inputs, mil_keys, mil_needs
from pipelines.stages.predict import (
    bundle_inputs,
    embed_stage,
    heatmap_folder,
    predict_heatmaps_stage,
    predict_stage,
    predicting,
    prediction_file,
    predictions_stage,
    run_bundle,
)
from pipelines.stages.qc import qc_stage
from pipelines.stages.results import results_stage
from pipelines.stages.tiles import tiles_stage
from pipelines.stages.tissue import tissue_stage
from wsi.tiling import TilingConfig


def training(cfg: RunConfig) -> bool:
    """A training run; a prediction run (``predict.bundle``) has the tissue, tiles, qc and prediction stages only."""
    return not predicting(cfg)


def needs_student(cfg: RunConfig) -> bool:
    """Distillation and student features only serve the MIL strategies that use the student."""
    return training(cfg) and any(s in ("reuse", "retrain", "end2end") for s in cfg.mil.strategies)


# The mil fields a CLAM's training depends on (End2end's own are added per task by mil_key_inputs): changing
# the rows asked for, End2end's settings or the bag cache retrains no CLAM.
CLAM_FIELDS = tuple(f"mil.{name}" for name in ("model", "size", "dropout", "k_sample", "bag_weight", "instance_loss",
                                               "subtyping", "lr", "weight_decay", "max_epochs", "min_epochs", "patience",
                                               "folds", "val_fraction", "seed", "classes", "device", "standardize"))


# The distill fields a student depends on: how its tiles are cached or loaded does not change it, nor where its
# starting weights lie or which device trains it (the student's identity: its weights file's content enters apart).
DISTILL_FIELDS = tuple(f"distill.{name}.identity" if name == "student" else f"distill.{name}"
                       for name in DistillConfig.model_fields if name not in ("tile_cache_mb", "num_workers"))


# The tiling fields the grid depends on: the blur ratio only labels tiles in the QC table.
TILING_FIELDS = tuple(f"tiling.{name}" for name in TilingConfig.model_fields if name != "blur_ratio")
# What the features read's tile check depends on (slides.verify_tiles: features; the same values are in the
# tiles stage's fingerprint, which the features' follows, when the tiles stage checks instead)
TILE_CHECK_FIELDS = ("slides.verify_tiles", "slides.max_unreadable_fraction", "tiling.min_sharpness")


def corrected_mask_input(cfg: RunConfig, entry: SlideEntry, hashes=None) -> list:
    """A tissue task's corrected mask (``tissue.mask_dir``): its content, or None when the slide has none."""
    if cfg.tissue.mask_dir is None:
        return []
    from pipelines.engine.state import file_fingerprint
    from wsi.mask_override import find_override

    override = find_override(cfg.tissue.mask_dir, entry.slide_id)
    return [{"mask": file_fingerprint(override, "content", hashes) if override else None}]


def imported_store_input(cfg: RunConfig, entry: SlideEntry, root: Path, hashes=None) -> list:
    """A features-only slide's ``features`` task stands for its imported store: its fingerprint is the store's
    identity (re-importing reruns what used it), not the teacher's config, which built nothing."""
    from pipelines.engine.state import file_fingerprint

    store = store_path(root, cfg.features.teacher.label, entry.slide_id)
    return [{"imported": file_fingerprint(store / "zarr.json", "stat", hashes)}]


# All stages in run order. A slide stage runs per slide after the stages in ``after`` (same slide);
# a cohort stage runs once, on the slides whose ``after`` stages are done; a fold stage runs one such
# task per key (mil: per results row and fold), each after the same-stage keys it ``needs``.
_STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("tissue", tissue_stage, "slide", config=("slides.backend", "slides.default_mpp", "slides.max_unreadable_fraction",
                                                  "tissue"), reads_slide=True, slide_inputs=corrected_mask_input,
          pixels=True, applies=lambda cfg, entry: entry.has_pixels,
          artifacts=lambda p, k, c: [p.tissue_qc(k), p.tissue_mask(k), p.tissue_outline(k), p.tissue_meta(k)]),
    Stage("tiles", tiles_stage, "slide", after=("tissue",),
          config=(*TILING_FIELDS, "slides.verify_tiles", "slides.max_unreadable_fraction"), pixels=True,
          applies=lambda cfg, entry: entry.has_pixels,
          artifacts=lambda p, k, c: [p.tile_overlay(k), p.tile_coords(k), p.tile_meta(k)]
          + ([p.tile_sharpness(k)] if c.tile_check() == "tiles" else [])),
    Stage("features", features_stage, "slide", after=("tiles",), config=("features.teacher.identity", "features.dtype",
                                                                         *TILE_CHECK_FIELDS),
          stands_for=imported_store_input,
          artifacts=lambda p, k, c: [store_path(p.root, c.features.teacher.label, k)], resources={"GPU": 1}, uses_torch=True,
          enabled=training,
          extra_inputs=lambda cfg, hashes: weights_inputs(cfg, "features.teacher", hashes), encoders=lambda cfg: ["features.teacher"]),
    Stage("qc", qc_stage, "cohort", after=("tiles",), config=("tiling.blur_ratio",), artifacts=lambda p, k, c: [p.qc_table],
          waits_for=lambda cfg: ("features",) if cfg.tile_check() == "features" else ()),
    Stage("distill", distill_stage, "cohort", after=("features",), config=(*DISTILL_FIELDS, "features.teacher.identity", "features.dtype"),
          pixels=True, reads_labels=False,
          artifacts=lambda p, k, c: [p.student_dir / "student.safetensors", p.student_dir / "student.json"],
          resources={"GPU": 1}, uses_torch=True, enabled=needs_student,
          extra_inputs=lambda cfg, hashes: weights_inputs(cfg, "distill.student", hashes),
          encoders=lambda cfg: ["distill.student"]),
    Stage("student_features", student_features_stage, "slide", after=("tiles", "distill"), config=("features.dtype",),
          pixels=True, applies=lambda cfg, entry: entry.has_pixels,
          artifacts=lambda p, k, c: [store_path(p.root, student_label(c), k)], resources={"GPU": 1}, uses_torch=True,
          enabled=needs_student),
    Stage("mil", mil_fold_stage, "fold", after=("features", "student_features"), config=CLAM_FIELDS,
          keys=mil_keys, needs=mil_needs, key_inputs=mil_key_inputs, fingerprint_stages=mil_fingerprint_stages, enabled=training,
          artifacts=lambda p, k, c: fold_artifacts(p, k), resources={"GPU": 1}, uses_torch=True,
          encoders=lambda cfg: ["features.teacher"] if "end2end" in cfg.mil.strategies and "fpt" in cfg.mil.finetune else []),
    Stage("results", results_stage, "cohort", after=("mil",), config=("mil.strategies", "mil.finetune"),
          artifacts=lambda p, k, c: [p.root / "results" / "summary.md", p.root / "results" / "predictions.csv"],
          enabled=training),
    Stage("heatmaps", heatmaps_stage, "slide", after=("results",), config=("heatmaps",), pixels=True,
          artifacts=lambda p, k, c: [heatmap_dir(p, resolve_strategy(c), k) / "heatmap.json"],
          enabled=lambda cfg: training(cfg) and cfg.heatmaps.slides != "none" and bool(drawable(cfg)),
          applies=lambda cfg, entry: entry.has_pixels and wants_heatmap(cfg, entry), uses_torch=True, resources={"GPU": 1},
          encoders=lambda cfg: ["features.teacher"] if resolve_strategy(cfg) == "teacher" and cfg.heatmaps.overlap > 0 else []),
    # a prediction run (`wsi-pipeline predict`): the bundle's encoder, its CLAMs, the table, the heatmaps
    Stage("embed", embed_stage, "slide", after=("tiles",), config=("features.dtype", "predict.precision"), pixels=True,
          applies=lambda cfg, entry: entry.has_pixels, enabled=predicting, resources={"GPU": 1}, uses_torch=True,
          artifacts=lambda p, k, c: [store_path(p.root, run_bundle(c).encoder_label, k)],
          extra_inputs=lambda cfg, hashes: bundle_inputs(cfg, "encoder")),
    Stage("predict", predict_stage, "slide", after=("embed",), enabled=predicting, uses_torch=True, resources={"GPU": 1},
          applies=lambda cfg, entry: entry.has_pixels, artifacts=lambda p, k, c: [prediction_file(p, k)],
          extra_inputs=lambda cfg, hashes: bundle_inputs(cfg, "clam")),
    Stage("predictions", predictions_stage, "cohort", after=("predict",), enabled=predicting,
          artifacts=lambda p, k, c: [p.root / "predictions.csv"]),
    Stage("predict_heatmaps", predict_heatmaps_stage, "slide", after=("predict",), config=("heatmaps",), pixels=True,
          enabled=lambda cfg: predicting(cfg) and cfg.heatmaps.slides != "none", uses_torch=True, resources={"GPU": 1},
          applies=lambda cfg, entry: entry.has_pixels and wants_heatmap(cfg, entry),
          artifacts=lambda p, k, c: [heatmap_folder(p, k) / "heatmap.json"]),
]}


def encoder_config(cfg: RunConfig, dotted: str):
    """The EncoderConfig at a dotted field of the run config (``features.teacher``, ``distill.student``)."""
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def weights_inputs(cfg: RunConfig, dotted: str, hashes=None) -> list:
    """The content (sha256, cached in ``hashes``) of the encoder's local weights file, so replacing the file
    reruns what it made and touching it does not."""
    from pipelines.engine.state import file_fingerprint

    weights = encoder_config(cfg, dotted).weights
    return [file_fingerprint(Path(weights), "content", hashes)] if weights else []


def check_encoders(cfg: RunConfig, stages: set[str], entries: list[SlideEntry] = ()) -> None:
    """Before any task runs: every encoder the planned stages build has weights (or an explicit seed for
    random ones), and every local weights file exists. Raises ValueError naming the field. On a
    features-only cohort (``entries`` without slide files) the features are imported: no teacher is built."""
    from features.encoders import NoWeightsError, WeightsError, no_weights_message
    from features.zoo import zoo_model

    if entries and not any(e.has_pixels for e in entries):
        stages = stages - {"features"}
    fields = {f: None for name in _STAGES if name in stages for f in _STAGES[name].encoders(cfg)}
    for dotted in fields:
        spec = encoder_config(cfg, dotted)
        if dotted == "features.teacher" and spec.random_weights and spec.seed is None:  # a student starts from distill.seed
            raise NoWeightsError(no_weights_message(spec, dotted))
        if spec.weights is not None and not Path(spec.weights).is_file():
            raise WeightsError(f"{dotted}.weights: {spec.weights}: file not found")
        entry = zoo_model(spec.model)
        if spec.pretrained and spec.weights is None and entry is not None and not (entry.hub or entry.timm_pretrained):
            raise WeightsError(f"{dotted}: {entry.name} has no hub copy of its weights for `pretrained: true`: download "
                               f"{entry.weights_file} from {entry.weights_from} and give `{dotted}.weights`")


def check_pixels(cfg: RunConfig, entries: list[SlideEntry], stages: set[str]) -> None:
    """Before any task runs: features-only slides (no slide file) cannot go through a stage that reads pixels.
    Raises ValueError naming the stage and the slides. Heatmaps simply leave such slides out."""
    without = [e.slide_id for e in entries if not e.has_pixels]
    if not without:
        return
    named = f"{len(without)} features-only slide(s) without a slide_path ({', '.join(without[:5])}{' …' if len(without) > 5 else ''})"
    for name in ("distill", "student_features"):
        if name in stages:
            raise ValueError(f"stage {name} needs the slide files (pixels), and slides.csv has {named}: the strategies "
                             f"{[s for s in cfg.mil.strategies if s != 'teacher']} need the distilled student; on a "
                             "features-only cohort set `mil.strategies: [teacher]`, or give those slides their slide_path")
    if "mil" in stages and "end2end" in cfg.mil.strategies:
        raise ValueError(f"strategy end2end re-reads tiles (pixels), and slides.csv has {named}: "
                         "set `mil.strategies: [teacher]`, or give those slides their slide_path")


def check_run(cfg: RunConfig, stages: set[str], entries: list[SlideEntry]) -> None:
    """Before any task: the encoders have weights, and no features-only slide meets a stage that reads pixels."""
    check_encoders(cfg, stages, entries)
    check_pixels(cfg, entries, stages)


STAGES = StageTable(_STAGES, ref="pipelines.stages.table:STAGES", check=check_run, warm_up="wsi.tissue_qc:warm_up")
