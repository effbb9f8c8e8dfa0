"""EFCM stage 2: CLAM on teacher features (baseline), Reuse, Retrain — per fold, with predictions and metrics.

*teacher*: CLAM trained and tested on teacher features. *reuse*: that fold's teacher CLAM, unchanged,
applied to the student's projected (teacher-space) features. *retrain*: a new CLAM trained and
tested on the student's features. *end2end*: encoder and CLAM fine-tuned together, one row per
fine-tuning strategy in ``mil.finetune``. Every strategy sees the same folds.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from features.store import save_safetensors
from mil.splits import Split
from mil.train import BagFn, MILConfig, build_clam, metrics, predict, train_clam


@dataclass(frozen=True)
class SlideLabel:
    slide_id: str
    case_id: str
    label: str
    split: str | None = None


@dataclass
class End2endInputs:
    """What End2end needs besides bags: the distilled student, its input spec, and a way to read tiles.

    ``teacher`` / ``teacher_input``: the teacher encoder module and its input spec, for ``fpt`` (which
    fine-tunes the frozen teacher through a side network) — None when no FPT row is configured.
    """

    student: object  # torch module: uint8-derived input → teacher-space features
    student_input: dict  # {"size", "mean", "std", "resize", "interpolation"}
    tiles: object  # mil.end2end.TileFn
    n_rows: object  # slide id → number of tiles
    teacher: object | None = None
    teacher_input: dict | None = None
    teacher_tiles: object | None = None  # tiles as the teacher reads them (default: ``tiles``)


def end2end_row(finetune: str) -> str:
    """The results-table strategy name of an End2end run: ``end2end`` for full fine-tuning, else ``end2end:<name>``."""
    return "end2end" if finetune == "full" else f"end2end:{finetune}"


def strategy_rows(cfg: MILConfig) -> list[str]:
    """Every row of the results table, in order: End2end expands into one row per fine-tuning strategy."""
    rows = []
    for strategy in cfg.strategies:
        rows.extend([end2end_row(name) for name in cfg.finetune] if strategy == "end2end" else [strategy])
    return rows


ROW_KINDS = ("teacher", "retrain", "reuse")  # the rows that are not End2end


@dataclass(frozen=True)
class FoldJob:
    """One restartable unit of stage 2: a results row (or a CLAM another row starts from) on one fold.

    ``teacher`` and ``retrain`` train a CLAM (on teacher / student features); ``reuse`` applies the
    fold's teacher CLAM to student features; ``end2end`` fine-tunes encoder + CLAM from the fold's
    Retrain CLAM (FPT: from the teacher's).
    """

    kind: Literal["teacher", "retrain", "reuse", "end2end"]
    fold: int
    finetune: str | None = None  # End2end only

    @property
    def row(self) -> str:
        return end2end_row(self.finetune) if self.kind == "end2end" else self.kind

    @property
    def key(self) -> str:
        """Task key: ``teacher.fold0``, ``end2end-lora.fold3`` (file-name safe)."""
        return f"{self.row.replace(':', '-')}.fold{self.fold}"

    @property
    def features(self) -> str:
        """Whose stored features it reads: ``teacher`` or ``student``."""
        return "teacher" if self.kind == "teacher" or (self.kind == "end2end" and self.finetune == "fpt") else "student"

    @property
    def needs(self) -> list[FoldJob]:
        """The fold jobs whose CLAM this one starts from or applies."""
        if self.kind == "reuse" or (self.kind == "end2end" and self.finetune == "fpt"):
            return [FoldJob("teacher", self.fold)]
        if self.kind == "end2end":
            return [FoldJob("retrain", self.fold)]
        return []

    @classmethod
    def from_key(cls, key: str) -> FoldJob:
        row, _, fold = key.rpartition(".fold")
        if row.startswith("end2end"):
            finetune = "full" if row == "end2end" else row.split("-", 1)[1]
            return cls("end2end", int(fold), finetune)
        return cls(row, int(fold))


def row_features(row: str) -> str:
    """Whose features a results row's CLAM reads: ``teacher`` (teacher, End2end FPT) or ``student``."""
    return FoldJob.from_key(f"{row.replace(':', '-')}.fold0").features


def fold_jobs(cfg: MILConfig, n_folds: int) -> list[FoldJob]:
    """Every job of stage 2, fold by fold: the CLAMs other rows start from first (whether or not their own
    rows are asked for), then the other rows in the config's order."""
    rows = strategy_rows(cfg)
    jobs = []
    for fold in range(n_folds):
        wanted = [FoldJob(row, fold) if row in ROW_KINDS else FoldJob("end2end", fold, row.partition(":")[2] or "full")
                  for row in rows]
        needed = {dep for job in wanted for dep in job.needs} | {j for j in wanted if j.kind in ("teacher", "retrain")}
        bases = [j for j in (FoldJob("teacher", fold), FoldJob("retrain", fold)) if j in needed]
        jobs += bases + [j for j in wanted if j not in bases]
    return jobs


def job_files(model_dir: Path, job: FoldJob) -> list[Path]:
    """The model files a job leaves for later jobs, heatmaps and bundles: its CLAM, End2end's encoder too."""
    if job.kind == "reuse":
        return []
    files = [clam_file(model_dir, job)]
    if job.kind == "end2end":
        stem = files[0].with_name(f"fold_{job.fold}")
        suffix = {"lora": "_student.adapter.safetensors", "fpt": "_fpt.safetensors"}.get(job.finetune, "_student.safetensors")
        files.append(stem.with_name(stem.name + suffix))
    return files


def clam_file(model_dir: Path, job: FoldJob) -> Path:
    """Where a job's CLAM is saved (teacher/retrain: the CLAM later rows start from)."""
    if job.kind in ("teacher", "retrain"):
        return model_dir / job.kind / f"fold_{job.fold}.safetensors"
    if job.kind == "end2end":
        return model_dir / job.row.replace(":", "_") / f"fold_{job.fold}_clam.safetensors"
    raise ValueError(f"{job.key}: reuse saves no CLAM of its own (it applies the teacher's)")


def load_clam(cfg: MILConfig, path: Path, n_classes: int, device: str | None = None):
    """A saved CLAM, rebuilt from the config and its safetensors (no pickle), in eval mode on ``device``
    (default ``cfg.device``); its input dimension is read from the weights."""
    from safetensors.torch import load_file

    from features.encoders import pick_device

    if not path.exists():
        raise FileNotFoundError(f"{path}: the fold's CLAM is missing; rerun the mil stage (--force mil)")
    state = load_file(str(path))
    model = build_clam(cfg, state["fc.0.weight"].shape[1], n_classes)
    model.load_state_dict(state)
    return model.to(pick_device(device or cfg.device)).eval()


ProgressFn = Callable[..., None]  # progress(done=…, total=…, unit="epoch") from a long loop


def run_fold_job(job: FoldJob, split: Split, classes: list[str], labels: dict[str, int], cfg: MILConfig,
                 bags: dict[str, BagFn], dims: dict[str, int], model_dir: Path, end2end: End2endInputs | None = None,
                 progress: ProgressFn | None = None) -> dict:
    """Train or apply one job's CLAM on its fold; returns its prediction rows, metrics row and history."""
    seed = cfg.seed * 100 + split.fold
    n_classes = len(classes)
    history: list[dict] = []
    cost = _no_cost()
    if job.kind in ("teacher", "retrain"):
        bag = bags[job.features]
        model, history = train_clam(cfg, bag, split.train, split.val, labels, dims[job.features], n_classes, seed,
                                    on_epoch=progress)
        save_safetensors(model.state_dict(), clam_file(model_dir, job))
    elif job.kind == "reuse":
        model, bag = load_clam(cfg, clam_file(model_dir, job.needs[0]), n_classes), bags["student"]
    else:
        if end2end is None:
            raise ValueError("strategy 'end2end' needs the distilled student and the slides' tiles")
        start = load_clam(cfg, clam_file(model_dir, job.needs[0]), n_classes)
        model, bag, cost, history = _end2end_fold(cfg, end2end, job, start, bags[job.features], split, labels, seed,
                                                  model_dir, progress)
    probs = predict(model, bag, split.test)
    y_test = np.array([labels[s] for s in split.test])
    clam_params = sum(p.numel() for p in model.parameters())
    fold_metrics = {"strategy": job.row, "fold": split.fold, **metrics(y_test, probs, n_classes),
                    "trainable_params": int(clam_params + cost["encoder_trainable_params"]), **cost}
    predictions = []
    for slide_id, p in zip(split.test, probs):
        row = {"strategy": job.row, "fold": split.fold, "slide_id": slide_id, "label": classes[labels[slide_id]],
               "prediction": classes[int(p.argmax())]}
        row.update({f"p_{c}": round(float(v), 6) for c, v in zip(classes, p)})
        predictions.append(row)
    return {"job": job.key, "row": job.row, "fold": split.fold, "classes": classes, "clam_params": int(clam_params),
            "predictions": predictions, "metrics": fold_metrics, "history": history,
            "split": {"train": split.train, "val": split.val, "test": split.test}}


COST_KEYS = ("encoder_trainable_params", "encoder_trainable_pct", "train_peak_mb", "s_per_epoch")


def _no_cost() -> dict:
    """Rows that train CLAM only: no encoder parameter trains (training cost not measured)."""
    return {"encoder_trainable_params": 0, "encoder_trainable_pct": 0.0, "train_peak_mb": None, "s_per_epoch": None}


def _end2end_fold(cfg: MILConfig, inputs: End2endInputs, job: FoldJob, start_clam, stored_bag: BagFn, split: Split,
                  labels: dict[str, int], seed: int, model_dir: Path, progress: ProgressFn | None):
    """Joint training from the fold's CLAM, the epoch chosen on the fold's validation slides; test bags are
    recomputed with the chosen encoder."""
    from mil.end2end import embed_bag, save_encoder, train_end2end

    finetune = job.finetune
    if finetune == "fpt" and inputs.teacher is None:
        raise ValueError("fine-tuning 'fpt' needs the teacher encoder in End2endInputs")
    encoder, spec = (inputs.teacher, inputs.teacher_input) if finetune == "fpt" else (inputs.student, inputs.student_input)
    tiles = (inputs.teacher_tiles or inputs.tiles) if finetune == "fpt" else inputs.tiles
    out = clam_file(model_dir, job)
    scratch = out.with_name(f"fold_{split.fold}_bags")  # the re-embedded training bags, removed when done
    shutil.rmtree(scratch, ignore_errors=True)
    tuned, clam, history = train_end2end(cfg, encoder, spec, start_clam, stored_bag, tiles, split.train, labels,
                                         k_tiles=cfg.end2end_k_tiles, epochs=cfg.end2end_epochs,
                                         student_lr=cfg.end2end_student_lr, finetune=finetune,
                                         finetune_options=cfg.finetune_options.get(finetune), seed=seed,
                                         val_ids=split.val, n_rows=inputs.n_rows,
                                         refresh_dir=scratch if cfg.end2end_refresh else None,
                                         attended=cfg.end2end_attended, cache_bytes=cfg.bag_cache_mb * 2**20, on_step=progress)
    shutil.rmtree(scratch, ignore_errors=True)
    save_safetensors(clam.state_dict(), out)
    stem = out.with_name(f"fold_{split.fold}")
    save_encoder(tuned, finetune, stem.with_name(stem.name + ("_fpt" if finetune == "fpt" else "_student")))
    def fresh(slide_id: str) -> np.ndarray:  # test bags re-embedded one at a time, as predict asks for them
        return embed_bag(tuned, spec, tiles, slide_id, inputs.n_rows(slide_id))

    last = history[-1]
    cost = {"encoder_trainable_params": last["trainable_params"],
            "encoder_trainable_pct": round(100 * last["trainable_params"] / last["encoder_params"], 3),
            "train_peak_mb": max(h["peak_mb"] for h in history),
            "s_per_epoch": round(float(np.mean([h["seconds"] for h in history])), 2)}
    return clam, fresh, cost, history


def summarise(fold_metrics: list[dict], strategies: list[str]) -> list[dict]:
    """Mean ± std over folds of ACC, balanced ACC and AUC per strategy (NaN folds left out of AUC)."""
    rows = []
    for strategy in strategies:
        folds = [m for m in fold_metrics if m["strategy"] == strategy]
        row = {"strategy": strategy, "folds": len(folds), "trainable_params": folds[0]["trainable_params"] if folds else 0}
        for key in COST_KEYS:  # the same every fold for counts; mean for time and memory
            values = [m[key] for m in folds if m.get(key) is not None]
            row[key] = round(float(np.mean(values)), 3) if values else None
        for key in ("acc", "bacc", "auc"):
            values = np.array([m[key] for m in folds if not math.isnan(m[key])])
            row[f"{key}_mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{key}_std"] = float(values.std()) if len(values) else math.nan
        rows.append(row)
    return rows
