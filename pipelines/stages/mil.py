"""The ``mil`` stage (EFCM stage 2): one restartable task per results row and fold.

Each task reads bags lazily from the Zarr stores (an LRU cache with a byte budget,
``mil.bag_cache_mb``), so its memory does not grow with the cohort, and writes its CLAM
(``models/mil/…``) and its predictions and metrics (``results/folds/<key>.json``). The ``results``
stage gathers the fold files into the results table. Every task computes the same folds from the
same slides, so rows stay comparable fold by fold.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from pipelines.config import RunConfig
from pipelines.engine.run_dir import RunPaths, write_json
from pipelines.engine.task_context import progress_callback
from pipelines.manifest import FoldPayload, SlideEntry
from wsi.slide import SlidePool, SlideSource


def n_folds(cfg: RunConfig, entries: list[SlideEntry]) -> int:
    """One fold from slides.csv's split column when it has one, else ``mil.folds``."""
    return 1 if any(e.split for e in entries) else cfg.mil.folds


def mil_keys(cfg: RunConfig, entries: list[SlideEntry]) -> list[str]:
    """The keys of the ``mil`` stage's tasks, e.g. ``teacher.fold0``, ``reuse.fold0``, ``end2end-lora.fold3``."""
    from mil.strategies import fold_jobs

    return [job.key for job in fold_jobs(cfg.mil, n_folds(cfg, entries))]


def mil_needs(cfg: RunConfig, key: str) -> list[str]:
    """Keys of the ``mil`` tasks whose CLAM this one starts from or applies."""
    from mil.strategies import FoldJob

    return [job.key for job in FoldJob.from_key(key).needs]


def mil_key_inputs(cfg: RunConfig, key: str) -> list:
    """What a fold task's fingerprint covers beyond CLAM's training fields: its key and, for End2end, its own settings."""
    from mil.strategies import FoldJob

    job = FoldJob.from_key(key)
    inputs: list = [key]
    if job.kind == "end2end":
        m = cfg.mil
        inputs.append({"k_tiles": m.end2end_k_tiles, "epochs": m.end2end_epochs, "student_lr": m.end2end_student_lr,
                       "refresh": m.end2end_refresh, "attended": m.end2end_attended, "options": m.finetune_options.get(job.finetune, {})})
    return inputs


def mil_fingerprint_stages(cfg: RunConfig, key: str) -> tuple[str, ...]:
    """Upstream stages whose fingerprints a fold task's depends on: a teacher CLAM does not care how the student was made."""
    from mil.strategies import FoldJob

    job = FoldJob.from_key(key)
    return ("features",) if job.kind == "teacher" else ("features", "student_features")


def cohort_splits(entries: list[SlideEntry], cfg: RunConfig):
    """(slides with labels, class names, folds) of the slides a stage-2 task runs on; the same for every task."""
    from mil.splits import csv_split, kfold_splits
    from mil.strategies import SlideLabel

    labelled = [e for e in entries if e.label]
    if len(labelled) < len(entries):
        missing = [e.slide_id for e in entries if not e.label][:5]
        raise ValueError(f"slides without a label (e.g. {missing}): the mil stage needs a `label` for every slide")
    mcfg = cfg.mil
    classes = mcfg.classes or sorted({e.label for e in labelled})
    unknown = sorted({e.label for e in labelled} - set(classes))
    if unknown:
        raise ValueError(f"labels {unknown} are not in mil.classes {classes}")
    slides = [SlideLabel(e.slide_id, e.case_id or e.slide_id, e.label, e.split) for e in labelled]
    if any(s.split for s in slides):
        splits = csv_split([(s.slide_id, s.case_id, s.label, s.split) for s in slides])
    else:
        splits = kfold_splits([(s.slide_id, s.case_id, s.label) for s in slides], mcfg.folds, mcfg.val_fraction, mcfg.seed)
    return slides, classes, splits


def fold_file(paths: RunPaths, key: str) -> Path:
    return paths.root / "results" / "folds" / f"{key}.json"


def fold_artifacts(paths: RunPaths, key: str) -> list[Path]:
    """What a fold task must leave for it to be up to date: its models, then its fold file (written last)."""
    from mil.strategies import FoldJob, job_files

    return [*job_files(paths.root / "models" / "mil", FoldJob.from_key(key)), fold_file(paths, key)]


def bag_reader(paths: RunPaths, label: str, precisions: dict[str, str | None] | None = None):
    """slide id → that slide's stored features (float16), read from its Zarr store; each store's precision is
    noted in ``precisions`` (a cohort's stores must not mix them unseen: :func:`pipelines.stages.precision_mix`)."""
    from features.store import open_store

    def read(slide_id: str) -> np.ndarray:
        store = open_store(paths.root, label, slide_id)
        if precisions is not None:
            precisions[slide_id] = store.attrs.get("precision")
        features, _ = store.load(np.float16)
        if len(features) == 0:
            raise ValueError(f"{slide_id}: no tiles, so no features for {label}: give it tissue or drop it")
        return features

    return read


def mil_fold_stage(payload: FoldPayload, cfg: RunConfig, paths: RunPaths) -> dict:
    """Train and test one results row on one fold; write its CLAM and ``results/folds/<key>.json``."""
    from features.store import open_store
    from mil.bags import BagCache
    from mil.strategies import FoldJob, run_fold_job
    from pipelines.stages.distill import precision_mix
    from pipelines.stages.features import student_label

    job = FoldJob.from_key(payload.key)
    slides, classes, splits = cohort_splits(payload.entries, cfg)
    split = splits[job.fold]
    labels = {s.slide_id: classes.index(s.label) for s in slides}
    labels_of = {"teacher": cfg.features.teacher.label, "student": student_label(cfg)}
    needed = {job.features} | ({"student"} if job.kind == "reuse" else set())
    precisions: dict[str, dict[str, str | None]] = {kind: {} for kind in labels_of}
    cache = BagCache(lambda key: bag_reader(paths, labels_of[key[0]], precisions[key[0]])(key[1]),
                     cfg.mil.bag_cache_mb * 2**20)
    bags = {kind: (lambda slide_id, kind=kind: cache((kind, slide_id))) for kind in needed}
    kinds = needed | ({"teacher"} if job.kind == "reuse" else set())  # Reuse builds the teacher's CLAM
    dims = {kind: open_store(paths.root, labels_of[kind], slides[0].slide_id).attrs["dim"] for kind in kinds}
    end2end = (end2end_inputs(paths, cfg, job.finetune == "fpt", slides[0].slide_id,
                              {e.slide_id: e.slide_path for e in payload.entries if e.slide_path is not None})
               if job.kind == "end2end" else None)
    result = run_fold_job(job, split, classes, labels, cfg.mil, bags, dims, paths.root / "models" / "mil", end2end,
                          progress_callback())
    write_json(fold_file(paths, payload.key), result)
    m = result["metrics"]
    return {"n_slides": len(slides), "folds": len(splits), "acc": m["acc"], "auc": m["auc"],
            "bag_reads": cache.reads, "bag_cache_hits": cache.hits,
            "warnings": [note for kind, seen in precisions.items() if (note := precision_mix(seen, f"the {kind} features"))]}


def fpt_teacher(paths: RunPaths, cfg: RunConfig, reference_slide: str):
    """The teacher FPT fine-tunes (fp32, CPU), checked to be the model that wrote the run's teacher features."""
    from features.encoders import create_encoder
    from features.extract import check_same_encoder
    from features.store import open_store

    big = create_encoder(cfg.features.teacher.model_copy(update={"device": "cpu", "precision": "fp32"}),
                         field="features.teacher")
    store = open_store(paths.root, cfg.features.teacher.label, reference_slide)
    check_same_encoder(big, store.attrs, f"features/{cfg.features.teacher.label}/{reference_slide}.zarr")
    return big


class SlideTileReader:
    """Tiles of a run's slides by row of their tile grid (and of their feature bags), through a SlidePool."""

    def __init__(self, paths: RunPaths, cfg: RunConfig, slide_paths: dict[str, Path], max_open: int = 8,
                 input_size: int | None = None):
        self.paths, self.cfg, self.backend = paths, cfg, cfg.slides.backend
        self.slide_paths = slide_paths  # where each slide is now (slides.csv): a slide moved since its tissue task
        self.input_size = input_size  # read for a model of this input size (Encoder.read_at_input), else as tiled
        self.pool = SlidePool([], max_open=max_open)
        self._grids: OrderedDict[str, object] = OrderedDict()

    def grid(self, slide_id: str):
        from pipelines.stages.features import slide_grid

        if slide_id not in self.pool.sources:
            meta = json.loads(self.paths.tissue_meta(slide_id).read_text())
            path = self.slide_paths.get(slide_id) or Path(meta["slide_path"])
            self.pool.sources[slide_id] = SlideSource(slide_id, path, meta["mpp"], self.backend)
        if slide_id not in self._grids:
            self._grids[slide_id] = slide_grid(self.paths, self.cfg, slide_id)  # the rows of its feature bags
            if len(self._grids) > 64:  # coordinates only, but bounded all the same
                self._grids.popitem(last=False)
        self._grids.move_to_end(slide_id)
        return self._grids[slide_id]

    def tiles(self, slide_id: str, rows: np.ndarray) -> np.ndarray:
        """uint8 (k, H, W, 3) tiles at those rows of the slide's grid."""
        grid = self.grid(slide_id)
        return np.stack([self.pool.read_tile(slide_id, *grid.coords[r], grid.plan, self.input_size) for r in rows])

    def n_rows(self, slide_id: str) -> int:
        return len(self.grid(slide_id).coords)


def end2end_inputs(paths: RunPaths, cfg: RunConfig, with_teacher: bool, reference_slide: str,
                   slide_paths: dict[str, Path]):
    """The distilled student (trainable) and a tile reader over the run's slides, for End2end (FPT: the teacher too)."""
    from distill.model import load_student
    from mil.strategies import End2endInputs

    encoder, _ = load_student(paths.student_dir, device="cpu")
    reader = SlideTileReader(paths, cfg, slide_paths,
                             input_size=encoder.input_size if encoder.read_at_input else None)
    teacher = teacher_input = teacher_tiles = None
    if with_teacher:  # FPT fine-tunes the (frozen) teacher through a side network, on the tiles as the teacher reads them
        big = fpt_teacher(paths, cfg, reference_slide)
        teacher, teacher_input = big.model, {"size": big.input_size, "mean": big.mean, "std": big.std,
                                                 "resize": big.resize, "interpolation": big.interpolation}
        teacher_tiles = SlideTileReader(paths, cfg, slide_paths).tiles
    return End2endInputs(encoder.model, {"size": encoder.input_size, "mean": encoder.mean, "std": encoder.std,
                                         "resize": encoder.resize, "interpolation": encoder.interpolation},
                         reader.tiles, reader.n_rows, teacher, teacher_input, teacher_tiles)
