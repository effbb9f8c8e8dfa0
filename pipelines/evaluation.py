"""The ``mil`` cohort stage (EFCM stage 2 + evaluation) and the results table ``wsi-pipeline report`` prints."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from pipelines.artifacts import RunPaths, write_text
from pipelines.config import RunConfig
from pipelines.manifest import SlideEntry
from pipelines.state import read_state


def _rate(paths: RunPaths, stage: str, entries: list[SlideEntry]) -> float | None:
    """Patches per second of an extraction stage over the cohort (tiles / seconds from its task states)."""
    tiles = seconds = 0.0
    for entry in entries:
        meta = (read_state(paths, stage, entry.slide_id) or {}).get("meta", {})
        tiles += meta.get("n_tiles", 0)
        seconds += meta.get("seconds", 0.0)
    return round(tiles / seconds, 2) if seconds else None


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


def _end2end_inputs(paths: RunPaths, cfg: RunConfig, reference_slide: str):
    """The distilled student (trainable) and a tile reader over the run's slides, for End2end."""
    from distill.model import load_student
    from mil.strategies import End2endInputs
    from pipelines.stages import load_tiles
    from wsi.slide import open_slide
    from wsi.tiling import read_tile

    encoder, _ = load_student(paths.student_dir, device="cpu")
    student = encoder.model
    handles: dict[str, tuple] = {}

    def source(slide_id: str):
        if slide_id not in handles:
            meta = json.loads(paths.tissue_meta(slide_id).read_text())
            grid = load_tiles(paths, slide_id)
            handles[slide_id] = (open_slide(meta["slide_path"], slide_id=slide_id, backend=cfg.slides.backend,
                                            mpp=meta["mpp"]), grid)
        return handles[slide_id]

    def tiles(slide_id: str, rows: np.ndarray) -> np.ndarray:
        slide, grid = source(slide_id)
        return np.stack([read_tile(slide, *map(int, grid.coords[r]), grid.plan) for r in rows])

    teacher = teacher_input = None
    if "fpt" in cfg.mil.finetune:  # FPT fine-tunes the (frozen) teacher through a side network
        big = fpt_teacher(paths, cfg, reference_slide)
        teacher, teacher_input = big.model, {"size": big.input_size, "mean": big.mean, "std": big.std}
    return End2endInputs(student, {"size": encoder.input_size, "mean": encoder.mean, "std": encoder.std}, tiles,
                         lambda slide_id: len(source(slide_id)[1].coords), teacher, teacher_input)


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def mil_stage(entries: list[SlideEntry], cfg: RunConfig, paths: RunPaths) -> dict:
    """Train and evaluate CLAM for every strategy and fold; write predictions, metrics and the results table."""
    from features.encoders import count_parameters
    from features.store import open_store
    from mil.splits import csv_split, kfold_splits
    from mil.strategies import SlideLabel, run_strategies, strategy_rows, summarise

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

    teacher_label, student_label = cfg.features.teacher.label, f"student_{cfg.distill.student.label}"
    cache: dict[tuple[str, str], np.ndarray] = {}

    def bag_of(label: str):
        def bag(slide_id: str) -> np.ndarray:
            key = (label, slide_id)
            if key not in cache:
                features, _ = open_store(paths.root, label, slide_id).load(np.float16)
                if len(features) == 0:
                    raise ValueError(f"{slide_id}: no tiles, so no features for {label}: give it tissue or drop it")
                cache[key] = features
            return cache[key]
        return bag

    teacher_dim = open_store(paths.root, teacher_label, slides[0].slide_id).attrs["dim"]
    needs_student = any(s in ("reuse", "retrain", "end2end") for s in mcfg.strategies)
    student_dim = open_store(paths.root, student_label, slides[0].slide_id).attrs["dim"] if needs_student else None
    end2end = _end2end_inputs(paths, cfg, slides[0].slide_id) if "end2end" in mcfg.strategies else None
    result = run_strategies(slides, splits, classes, mcfg, bag_of(teacher_label), bag_of(student_label) if needs_student else None,
                            teacher_dim, student_dim, paths.root / "models" / "mil", end2end)
    summary = summarise(result.fold_metrics, strategy_rows(mcfg))
    card_path = paths.student_dir / "student.json"
    student_params = json.loads(card_path.read_text())["params"]["total"] if card_path.exists() else None
    teacher_rate, student_rate = _rate(paths, "features", entries), _rate(paths, "student_features", entries)
    teacher_params = count_parameters(cfg.features.teacher)
    for row in summary:
        on_student = row["strategy"] in ("reuse", "retrain") or (row["strategy"].startswith("end2end")
                                                                   and row["strategy"] != "end2end:fpt")
        row.update({"features": student_label if on_student else teacher_label,
                    "clam_params": result.clam_params,
                    "encoder_params": student_params if on_student else teacher_params,
                    "encoder_patches_per_s": student_rate if on_student else teacher_rate})
    results = paths.root / "results"
    write_text(results / "predictions.csv", _csv_text(result.predictions))
    write_text(results / "fold_metrics.csv", _csv_text(result.fold_metrics))
    write_text(results / "summary.csv", _csv_text(summary))
    write_text(results / "summary.md", results_markdown(summary, classes, len(splits), encoder_notes(cfg)))
    return {"n_slides": len(slides), "folds": len(splits), "summary": summary, "warnings": []}


def _pm(row: dict, key: str) -> str:
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    return "n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def encoder_notes(cfg: RunConfig) -> list[str]:
    """Lines under the results table that say where the encoders' weights came from (random ones loudly)."""
    teacher = cfg.features.teacher
    lines = [f"Teacher `{teacher.label}`: weights {teacher.weights_source()}."]
    if any(s in ("reuse", "retrain", "end2end") for s in cfg.mil.strategies):
        lines.append(f"Student `{cfg.distill.student.label}` distilled from it, initialised from "
                     f"{cfg.distill.student.weights_source(cfg.distill.seed)} weights.")
    if teacher.random_weights:
        lines.append("**The teacher has random weights: its features mean nothing clinically; these figures test "
                     "the machinery, not a diagnostic model.**")
    return lines


def results_markdown(summary: list[dict], classes: list[str], folds: int, notes: list[str] = ()) -> str:
    """The table a user takes to a paper."""
    names = {"teacher": "Teacher baseline (CLAM on teacher)", "reuse": "Reuse (teacher CLAM on student)",
             "retrain": "Retrain (CLAM on student)", "end2end": "End2end (student + CLAM, full fine-tuning)",
             "end2end:fpt": "End2end FPT (frozen teacher + side network + CLAM)"}
    legend = ("Encoder trainable: parameters of the encoder that train (% of the encoder); train peak MB: weights + "
              "gradients + Adam states + saved activations of one End2end step; s/epoch: End2end training time.")
    header = ("| strategy | features | ACC | balanced ACC | AUC | trainable params | encoder trainable | train peak MB "
              "| s/epoch | encoder params | encoder patches/s |")
    lines = [f"Classes: {', '.join(classes)}; {folds} fold(s); mean ± std over folds. {legend}", "", header,
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary:
        rate = row.get("encoder_patches_per_s")
        params = row.get("encoder_params")
        name = names.get(row["strategy"]) or (f"End2end ({row['strategy'].split(':', 1)[1]} fine-tuning)"
                                              if row["strategy"].startswith("end2end:") else row["strategy"])
        tuned = row.get("encoder_trainable_params")
        tuned = f"{int(tuned):,} ({row['encoder_trainable_pct']:.2f} %)" if tuned else "0"
        lines.append(f"| {name} | `{row['features']}` | {_pm(row, 'acc')} | {_pm(row, 'bacc')} | {_pm(row, 'auc')} | "
                     f"{row['trainable_params']:,} | {tuned} | {_or_na(row.get('train_peak_mb'), ',.0f')} | "
                     f"{_or_na(row.get('s_per_epoch'), '.1f')} | {f'{params:,}' if params else 'n/a'} | {rate if rate else 'n/a'} |")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _or_na(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def stage_costs(out: Path) -> str:
    """Per stage: tasks done, total and mean seconds, and the largest peak memory of a task (worker + loaders)."""
    root = RunPaths(Path(out)).root / "state"
    lines = ["| stage | tasks done | total s | mean s/task | max peak RSS MB |", "|---|---|---|---|---|"]
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []:
        states = [json.loads(f.read_text()) for f in folder.glob("*.json")]
        done = [st for st in states if st.get("status") == "done" and "duration_s" in st]
        if not done:
            continue
        total = sum(st["duration_s"] for st in done)
        peak = max((st.get("peak_rss_mb") or 0) for st in done)
        lines.append(f"| {folder.name} | {len(done)} | {total:.1f} | {total / len(done):.2f} | {peak:.0f} |")
    return "\n".join(lines) + "\n"


def read_report(out: Path) -> str:
    """The results table, then what each stage cost."""
    path = RunPaths(Path(out)).root / "results" / "summary.md"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no results yet; run the pipeline through the mil stage")
    return path.read_text() + "\nStage costs (from the task states; peak RSS of the task's worker process and its loaders):\n\n" + stage_costs(out)
