"""EFCM stage 2: CLAM on teacher features (baseline), Reuse, Retrain — per fold, with predictions and metrics.

*teacher*: CLAM trained and tested on teacher features. *reuse*: that fold's teacher CLAM, unchanged,
applied to the student's projected (teacher-space) features. *retrain*: a new CLAM trained and
tested on the student's features. Every strategy sees the same folds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.store import save_safetensors
from mil.splits import Split
from mil.train import BagFn, MILConfig, metrics, predict, train_clam


@dataclass(frozen=True)
class SlideLabel:
    slide_id: str
    case_id: str
    label: str
    split: str | None = None


@dataclass
class StrategyResult:
    predictions: list[dict]  # one row per strategy × fold × test slide
    fold_metrics: list[dict]  # one row per strategy × fold
    clam_params: int



@dataclass
class End2endInputs:
    """What End2end needs besides bags: the distilled student, its input spec, and a way to read tiles."""

    student: object  # torch module: uint8-derived input → teacher-space features
    student_input: dict  # {"size", "mean", "std"}
    tiles: object  # mil.end2end.TileFn
    n_rows: object  # slide id → number of tiles


def run_strategies(slides: list[SlideLabel], splits: list[Split], classes: list[str], cfg: MILConfig,
                   teacher_bag: BagFn, student_bag: BagFn | None, teacher_dim: int, student_dim: int | None,
                   model_dir: Path, end2end: End2endInputs | None = None) -> StrategyResult:
    """Train and test every configured strategy on every fold; CLAM weights go to ``model_dir/<strategy>/fold_<k>``."""
    labels = {s.slide_id: classes.index(s.label) for s in slides}
    predictions, fold_metrics, clam_params = [], [], 0
    for split in splits:
        seed = cfg.seed * 100 + split.fold
        y_test = np.array([labels[s] for s in split.test])
        teacher_model = retrain_model = None
        for strategy in cfg.strategies:
            if strategy in ("reuse", "retrain", "end2end") and student_bag is None:
                raise ValueError(f"strategy {strategy!r} needs student features")
            if strategy == "end2end" and end2end is None:
                raise ValueError("strategy 'end2end' needs the distilled student and the slides' tiles")
            if strategy in ("teacher", "reuse") and teacher_model is None:
                teacher_model, _ = train_clam(cfg, teacher_bag, split.train, split.val, labels, teacher_dim, len(classes), seed)
                save_safetensors(teacher_model.state_dict(), model_dir / "teacher" / f"fold_{split.fold}.safetensors")
            if strategy == "teacher":
                model, bag = teacher_model, teacher_bag
            elif strategy == "reuse":
                model, bag = teacher_model, student_bag
            elif strategy == "retrain" or retrain_model is None:
                retrain_model, _ = train_clam(cfg, student_bag, split.train, split.val, labels, student_dim, len(classes), seed)
                save_safetensors(retrain_model.state_dict(), model_dir / "retrain" / f"fold_{split.fold}.safetensors")
                model, bag = retrain_model, student_bag
            if strategy == "end2end":
                model, bag = _end2end_fold(cfg, end2end, retrain_model, student_bag, split, labels, seed,
                                           model_dir / "end2end" / f"fold_{split.fold}")
            clam_params = sum(p.numel() for p in model.parameters())
            trainable = clam_params + (sum(p.numel() for p in end2end.student.parameters()) if strategy == "end2end" else 0)
            probs = predict(model, bag, split.test)
            fold_metrics.append({"strategy": strategy, "fold": split.fold, **metrics(y_test, probs, len(classes)),
                                 "trainable_params": int(trainable)})
            for slide_id, p in zip(split.test, probs):
                row = {"strategy": strategy, "fold": split.fold, "slide_id": slide_id, "label": classes[labels[slide_id]],
                       "prediction": classes[int(p.argmax())]}
                row.update({f"p_{c}": round(float(v), 6) for c, v in zip(classes, p)})
                predictions.append(row)
    return StrategyResult(predictions, fold_metrics, clam_params)


def _end2end_fold(cfg: MILConfig, inputs: End2endInputs, retrain_model, student_bag: BagFn, split: Split,
                  labels: dict[str, int], seed: int, out: Path):
    """Joint training from the fold's Retrain CLAM; test bags are recomputed with the fine-tuned student."""
    from mil.end2end import embed_bag, train_end2end

    student, clam, _ = train_end2end(cfg, inputs.student, inputs.student_input, retrain_model, student_bag, inputs.tiles,
                                     split.train, labels, k_tiles=cfg.end2end_k_tiles, epochs=cfg.end2end_epochs,
                                     student_lr=cfg.end2end_student_lr, method=cfg.finetune, seed=seed)
    save_safetensors(clam.state_dict(), out.with_name(out.name + "_clam.safetensors"))
    save_safetensors(student.state_dict(), out.with_name(out.name + "_student.safetensors"))
    fresh = {s: embed_bag(student, inputs.student_input, inputs.tiles, s, inputs.n_rows(s)) for s in split.test}
    return clam, fresh.__getitem__


def summarise(fold_metrics: list[dict], strategies: list[str]) -> list[dict]:
    """Mean ± std over folds of ACC, balanced ACC and AUC per strategy (NaN folds left out of AUC)."""
    rows = []
    for strategy in strategies:
        folds = [m for m in fold_metrics if m["strategy"] == strategy]
        row = {"strategy": strategy, "folds": len(folds), "trainable_params": folds[0]["trainable_params"] if folds else 0}
        for key in ("acc", "bacc", "auc"):
            values = np.array([m[key] for m in folds if not math.isnan(m[key])])
            row[f"{key}_mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{key}_std"] = float(values.std()) if len(values) else math.nan
        rows.append(row)
    return rows
