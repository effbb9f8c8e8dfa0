"""EFCM stage 2: CLAM on teacher features (baseline), Reuse, Retrain — per fold, with predictions and metrics.

*teacher*: CLAM trained and tested on teacher features. *reuse*: that fold's teacher CLAM, unchanged,
applied to the student's projected (teacher-space) features. *retrain*: a new CLAM trained and
tested on the student's features. *end2end*: encoder and CLAM fine-tuned together, one row per
fine-tuning strategy in ``mil.finetune``. Every strategy sees the same folds.
"""

from __future__ import annotations

import functools
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
    """What End2end needs besides bags: the distilled student, its input spec, and a way to read tiles.

    ``teacher`` / ``teacher_input``: the teacher encoder module and its input spec, for ``fpt`` (which
    fine-tunes the frozen teacher through a side network) — None when no FPT row is configured.
    """

    student: object  # torch module: uint8-derived input → teacher-space features
    student_input: dict  # {"size", "mean", "std"}
    tiles: object  # mil.end2end.TileFn
    n_rows: object  # slide id → number of tiles
    teacher: object | None = None
    teacher_input: dict | None = None


def end2end_row(finetune: str) -> str:
    """The results-table strategy name of an End2end run: ``end2end`` for full fine-tuning, else ``end2end:<name>``."""
    return "end2end" if finetune == "full" else f"end2end:{finetune}"


def strategy_rows(cfg: MILConfig) -> list[str]:
    """Every row of the results table, in order: End2end expands into one row per fine-tuning strategy."""
    rows = []
    for strategy in cfg.strategies:
        rows.extend([end2end_row(name) for name in cfg.finetune] if strategy == "end2end" else [strategy])
    return rows


def run_strategies(slides: list[SlideLabel], splits: list[Split], classes: list[str], cfg: MILConfig,
                   teacher_bag: BagFn, student_bag: BagFn | None, teacher_dim: int, student_dim: int | None,
                   model_dir: Path, end2end: End2endInputs | None = None) -> StrategyResult:
    """Train and test every configured strategy on every fold; CLAM weights go to ``model_dir/<strategy>/fold_<k>``."""
    labels = {s.slide_id: classes.index(s.label) for s in slides}
    predictions, fold_metrics, clam_params = [], [], 0
    for split in splits:
        seed = cfg.seed * 100 + split.fold
        y_test = np.array([labels[s] for s in split.test])
        trained: dict[str, object] = {}
        fold_clam = functools.partial(_fold_clam, trained, cfg, split, labels, len(classes), seed, model_dir,
                                      {"teacher": (teacher_bag, teacher_dim), "retrain": (student_bag, student_dim)})
        for strategy in cfg.strategies:
            if strategy in ("reuse", "retrain", "end2end") and student_bag is None:
                raise ValueError(f"strategy {strategy!r} needs student features")
            if strategy == "end2end" and end2end is None:
                raise ValueError("strategy 'end2end' needs the distilled student and the slides' tiles")
            runs = []
            if strategy == "teacher":
                runs.append((strategy, fold_clam("teacher"), teacher_bag, _no_cost()))
            elif strategy == "reuse":
                runs.append((strategy, fold_clam("teacher"), student_bag, _no_cost()))
            elif strategy == "retrain":
                runs.append((strategy, fold_clam("retrain"), student_bag, _no_cost()))
            else:
                for name in cfg.finetune:
                    on_teacher = name == "fpt"  # FPT fine-tunes the teacher: from its CLAM, over its stored features
                    start = fold_clam("teacher" if on_teacher else "retrain")
                    model, bag, cost = _end2end_fold(cfg, end2end, name, start, teacher_bag if on_teacher else student_bag,
                                                     split, labels, seed, model_dir / end2end_row(name).replace(":", "_")
                                                     / f"fold_{split.fold}")
                    runs.append((end2end_row(name), model, bag, cost))
            for row_name, model, bag, cost in runs:
                clam_params = sum(p.numel() for p in model.parameters())
                probs = predict(model, bag, split.test)
                fold_metrics.append({"strategy": row_name, "fold": split.fold, **metrics(y_test, probs, len(classes)),
                                     "trainable_params": int(clam_params + cost["encoder_trainable_params"]), **cost})
                for slide_id, p in zip(split.test, probs):
                    row = {"strategy": row_name, "fold": split.fold, "slide_id": slide_id,
                           "label": classes[labels[slide_id]], "prediction": classes[int(p.argmax())]}
                    row.update({f"p_{c}": round(float(v), 6) for c, v in zip(classes, p)})
                    predictions.append(row)
    return StrategyResult(predictions, fold_metrics, clam_params)


def _fold_clam(trained: dict, cfg: MILConfig, split: Split, labels: dict[str, int], n_classes: int, seed: int,
               model_dir: Path, inputs: dict, kind: str):
    """The fold's CLAM on teacher (``teacher``) or student (``retrain``) features: trained once, saved, kept in ``trained``."""
    if kind not in trained:
        bag, dim = inputs[kind]
        trained[kind], _ = train_clam(cfg, bag, split.train, split.val, labels, dim, n_classes, seed)
        save_safetensors(trained[kind].state_dict(), model_dir / kind / f"fold_{split.fold}.safetensors")
    return trained[kind]


COST_KEYS = ("encoder_trainable_params", "encoder_trainable_pct", "train_peak_mb", "s_per_epoch")


def _no_cost() -> dict:
    """Rows that train CLAM only: no encoder parameter trains (training cost not measured)."""
    return {"encoder_trainable_params": 0, "encoder_trainable_pct": 0.0, "train_peak_mb": None, "s_per_epoch": None}


def _end2end_fold(cfg: MILConfig, inputs: End2endInputs, finetune: str, start_clam, stored_bag: BagFn, split: Split,
                  labels: dict[str, int], seed: int, out: Path):
    """Joint training from the fold's CLAM; test bags are recomputed with the fine-tuned encoder."""
    from mil.end2end import embed_bag, save_encoder, train_end2end

    if finetune == "fpt" and inputs.teacher is None:
        raise ValueError("fine-tuning 'fpt' needs the teacher encoder in End2endInputs")
    encoder, spec = (inputs.teacher, inputs.teacher_input) if finetune == "fpt" else (inputs.student, inputs.student_input)
    tuned, clam, history = train_end2end(cfg, encoder, spec, start_clam, stored_bag, inputs.tiles, split.train, labels,
                                         k_tiles=cfg.end2end_k_tiles, epochs=cfg.end2end_epochs,
                                         student_lr=cfg.end2end_student_lr, finetune=finetune,
                                         finetune_options=cfg.finetune_options.get(finetune), seed=seed)
    save_safetensors(clam.state_dict(), out.with_name(out.name + "_clam.safetensors"))
    save_encoder(tuned, finetune, out.with_name(out.name + "_student" if finetune != "fpt" else out.name + "_fpt"))
    fresh = {s: embed_bag(tuned, spec, inputs.tiles, s, inputs.n_rows(s)) for s in split.test}
    last = history[-1]
    cost = {"encoder_trainable_params": last["trainable_params"],
            "encoder_trainable_pct": round(100 * last["trainable_params"] / last["encoder_params"], 3),
            "train_peak_mb": max(h["peak_mb"] for h in history),
            "s_per_epoch": round(float(np.mean([h["seconds"] for h in history])), 2)}
    return clam, fresh.__getitem__, cost


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
