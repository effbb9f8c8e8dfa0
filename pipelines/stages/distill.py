"""The distill stage: EFCM stage 1, the student distilled from the teacher's stored features."""

from __future__ import annotations

import json
import logging

import numpy as np

from pipelines.config import RunConfig
from pipelines.engine.run_dir import RunPaths
from pipelines.engine.task_context import TASK_FINGERPRINT, TASK_FORCED, progress_callback
from pipelines.manifest import SlideEntry
from pipelines.stages.tiles import load_tiles

log = logging.getLogger(__name__)


def distill_stage(entries: list[SlideEntry], cfg: RunConfig, paths: RunPaths) -> dict:
    """EFCM stage 1: distil the student from the teacher's stored features (labels unused)."""
    from distill.trainer import SlideTiles, train
    from features.store import open_store
    from features.zoo import provenance

    dcfg = cfg.distill
    use = [e for e in entries if not (dcfg.exclude_test and e.split == "test")]
    if not use:
        raise ValueError("no slides to distil on (all are in the test split)")
    teacher = cfg.features.teacher.label
    rng = np.random.default_rng(dcfg.seed)
    per_slide = -(-(dcfg.max_train_tiles + dcfg.max_val_tiles) // len(use))  # bounded memory: sample before loading
    slides, dim, digests, precisions = [], None, {}, {}
    for entry in use:
        store = open_store(paths.root, teacher, entry.slide_id)
        digests.setdefault(store.attrs.get("weights_sha256"), entry.slide_id)
        precisions[entry.slide_id] = store.attrs.get("precision")
        if len(store) == 0:
            continue
        rows = np.sort(rng.choice(len(store), min(per_slide, len(store)), replace=False))
        meta = json.loads(paths.tissue_meta(entry.slide_id).read_text())
        slides.append(SlideTiles(entry.slide_id, entry.slide_path, meta["mpp"], load_tiles(paths, entry.slide_id).plan,
                                 store.coords[rows], np.asarray(store.features.oindex[rows, :], dtype=np.float16),
                                 cfg.slides.backend))
        dim = store.attrs["dim"]
    if not slides:
        raise ValueError("no teacher features to distil from (every slide has zero tiles)")
    if len(digests) > 1:  # targets from several models would mix feature spaces
        raise ValueError(f"the teacher stores come from {len(digests)} different models (e.g. slides "
                         f"{', '.join(digests.values())}): rerun the features stage (--force features)")
    if TASK_FORCED.get():  # --force distill: start over, never resume from the last run's checkpoint
        import shutil

        shutil.rmtree(paths.student_dir / "checkpoint", ignore_errors=True)
    report = progress_callback()
    on_epoch = None if report is None else (lambda record: report(done=record["epoch"], total=dcfg.epochs, unit="epoch",
                                                                  val_cosine=record.get("cosine"),
                                                                  worst_cluster_r2=record.get("worst_cluster_r2")))
    card = train(slides, dim, dcfg, paths.student_dir, fingerprint=TASK_FINGERPRINT.get() or "", on_epoch=on_epoch,
                 teacher={"label": teacher, "dim": dim, "spec": cfg.features.teacher.model_dump(mode="json"),
                          "weights": cfg.features.teacher.weights_source(),
                          "weights_sha256": next(iter(digests)), "provenance": provenance(cfg.features.teacher.model),
                          "random_weights": cfg.features.teacher.random_weights})
    best, verdict = card["metrics"]["best"], card["fidelity"]["verdict"]
    return {"n_slides": len(slides), "val_cosine": best.get("cosine"), "val_r2": best.get("r2"),
            "worst_cluster_r2": best.get("worst_cluster_r2"), "balanced_r2": best.get("balanced_r2"),
            "faithful": verdict["faithful"], "epochs_run": card["metrics"]["epochs_run"],
            "initial_cosine": card["metrics"]["initial"].get("cosine"), "precision": card["precision"],
            "loader": card["loader"],
            "warnings": [*([f"student: {verdict['message']}"] if verdict["faithful"] is False else []),
                         *filter(None, [precision_mix(precisions, "the teacher features distilled from")])]}


def precision_mix(precisions: dict[str, str | None], what: str) -> str | None:
    """A warning when a cohort's feature stores were computed at more than one precision (slide id → the precision
    its store records; ``auto`` resolves per worker: bf16 on one machine, fp32 on another), else None. One model's
    features differ slightly between precisions, so a CLAM or a student trained across them learns a shift."""
    groups: dict[str, list[str]] = {}
    for slide_id, precision in precisions.items():
        groups.setdefault(precision or "unrecorded", []).append(slide_id)
    if len(groups) < 2:
        return None
    parts = ", ".join(f"{p} ({len(ids)} slides, e.g. {ids[0]})" for p, ids in sorted(groups.items(), key=lambda g: -len(g[1])))
    return (f"{what} were computed at {len(groups)} precisions: {parts}; set the encoder's precision explicitly "
            "(not auto) and rerun the features (--force features) to make them one")


