"""The ``mil`` cohort stage (EFCM stage 2 + evaluation) and the results table ``wsi-pipeline report`` prints."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from pipelines.config import RunConfig
from pipelines.engine.run_dir import RunPaths, write_json, write_text
from pipelines.engine.state import read_state
from pipelines.manifest import SlideEntry


def _rate(paths: RunPaths, stage: str, entries: list[SlideEntry]) -> float | None:
    """Patches per second of an extraction stage over the cohort (tiles / seconds from its task states)."""
    tiles = seconds = 0.0
    for entry in entries:
        meta = (read_state(paths, stage, entry.slide_id) or {}).get("meta", {})
        tiles += meta.get("n_tiles", 0)
        seconds += meta.get("seconds", 0.0)
    return round(tiles / seconds, 2) if seconds else None


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def results_stage(entries: list[SlideEntry], cfg: RunConfig, paths: RunPaths) -> dict:
    """Gather the ``mil`` tasks' fold files into ``results/``: predictions, fold metrics, the summary table."""
    from features.encoders import count_parameters
    from mil.strategies import FoldJob, row_features, strategy_rows, summarise
    from pipelines.stages.attended_fidelity import attended_fidelity, attended_fidelity_line
    from pipelines.stages.features import student_label
    from pipelines.stages.mil import fold_file, mil_keys

    rows = strategy_rows(cfg.mil)
    folds = [json.loads(fold_file(paths, key).read_text()) for key in mil_keys(cfg, entries)
             if FoldJob.from_key(key).row in rows]
    folds.sort(key=lambda f: (f["fold"], rows.index(f["row"])))  # fold by fold, rows in the table's order
    predictions = [p for f in folds for p in f["predictions"]]
    fold_metrics = [f["metrics"] for f in folds]
    classes = folds[0]["classes"]
    n_folds = len({f["fold"] for f in folds})
    summary = summarise(fold_metrics, rows)
    teacher_label, student = cfg.features.teacher.label, student_label(cfg)
    card_path = paths.student_dir / "student.json"
    student_params = json.loads(card_path.read_text())["params"]["total"] if card_path.exists() else None
    teacher_rate, student_rate = _rate(paths, "features", entries), _rate(paths, "student_features", entries)
    teacher_params = count_parameters(cfg.features.teacher) if not imported_features(paths, cfg, entries) else None
    clam_params = {f["row"]: f["clam_params"] for f in folds}
    for row in summary:
        on_student = row_features(row["strategy"]) == "student"
        row.update({"features": student if on_student else teacher_label,
                    "clam_params": clam_params.get(row["strategy"]),
                    "encoder_params": student_params if on_student else teacher_params,
                    "encoder_patches_per_s": student_rate if on_student else teacher_rate})
    results = paths.root / "results"
    write_text(results / "predictions.csv", csv_text(predictions))
    write_text(results / "fold_metrics.csv", csv_text(fold_metrics))
    write_text(results / "summary.csv", csv_text(summary))
    agreement = reuse_agreement(predictions, classes)
    card = json.loads(card_path.read_text()) if card_path.exists() and student_params is not None else None
    attended = attended_fidelity(entries, cfg, paths) if card is not None else None
    fidelity_lines = student_fidelity_lines(card, agreement) + attended_fidelity_line(attended, cfg.distill.rare_r2_target)
    write_text(results / "summary.md", results_markdown(summary, classes, n_folds,
                                                        encoder_notes(cfg, paths, entries) + fidelity_lines))
    if agreement is not None:
        write_json(results / "reuse_agreement.json", agreement)
    if attended is not None:
        write_json(results / "attended_fidelity.json", attended)
    warnings = [line for line in fidelity_lines if "WARNING" in line]  # an unfaithful student: the distill task's
    return {"n_slides": len({p["slide_id"] for p in predictions}), "folds": n_folds, "summary": summary,
            "reuse_agreement": agreement, "attended_fidelity": None if attended is None else
            {k: v for k, v in attended.items() if k != "slides"}, "warnings": warnings}


def reuse_agreement(predictions: list[dict], classes: list[str]) -> dict | None:
    """How well the student stands in for the teacher under the teacher's own CLAMs: per test slide, the
    teacher CLAM's probabilities on teacher features vs on student features (the Reuse row).

    Label-free in what it measures (agreement, not accuracy): the mean and the worst slide's largest
    probability difference, and the share of slides whose predicted class is the same.
    """
    by_slide = {(p["fold"], p["slide_id"]): p for p in predictions if p["strategy"] == "teacher"}
    pairs = [(by_slide[(p["fold"], p["slide_id"])], p) for p in predictions
             if p["strategy"] == "reuse" and (p["fold"], p["slide_id"]) in by_slide]
    if not pairs:
        return None
    gaps = [max(abs(float(t[f"p_{c}"]) - float(r[f"p_{c}"])) for c in classes) for t, r in pairs]
    worst = max(range(len(pairs)), key=gaps.__getitem__)
    same = sum(t["prediction"] == r["prediction"] for t, r in pairs)
    return {"n_slides": len(pairs), "n_same_class": same, "class_agreement": round(same / len(pairs), 4),
            "mean_abs_diff": round(sum(gaps) / len(gaps), 4), "worst_abs_diff": round(gaps[worst], 4),
            "worst_slide": pairs[worst][0]["slide_id"]}


def student_fidelity_lines(card: dict | None, agreement: dict | None) -> list[str]:
    """The student card's fidelity where it matters and the Reuse agreement, as lines under the results table."""
    lines = []
    if card is not None:
        best = card["metrics"]["best"]
        verdict = card.get("fidelity", {}).get("verdict", {})
        worst = best.get("worst_cluster_r2")
        lines.append(f"Student fidelity (held-out tiles, best epoch {card['metrics']['best_epoch']} of "
                     f"{card['metrics']['epochs_run']}): cosine {best['cosine']:.3f}, R² {best['r2']:.3f}"
                     + ("" if worst is None else f", cluster-balanced R² {best['balanced_r2']:.3f}, worst cluster R² "
                                                 f"{worst:.3f}, worst-decile cosine {best['worst_decile_cosine']:.3f}")
                     + (f" — {verdict['message']}." if verdict.get("message") else "."))
    if agreement is not None:
        n, same = agreement["n_slides"], agreement["n_same_class"]
        lines.append(f"Reuse agreement (the teacher's CLAMs on teacher vs student features): the same class on {same} of "
                     f"{n} test slides ({agreement['class_agreement']:.0%}), probability difference mean "
                     f"{agreement['mean_abs_diff']:.3f}, worst {agreement['worst_abs_diff']:.3f} (`{agreement['worst_slide']}`)"
                     + (f" — WARNING: {n - same} slide(s) change class under the student's features, so the student "
                        f"misses some of what the teacher's CLAMs use." if same < n else "."))
    return lines


def imported_features(paths: RunPaths, cfg: RunConfig, entries: list[SlideEntry]) -> bool:
    """Whether the run's teacher features were imported (``import-features``) rather than extracted."""
    from features.store import open_store

    try:
        return "imported_from" in open_store(paths.root, cfg.features.teacher.label, entries[0].slide_id).attrs
    except (FileNotFoundError, ValueError):
        return False


def _pm(row: dict, key: str) -> str:
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    return "n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def encoder_notes(cfg: RunConfig, paths: RunPaths | None = None, entries: list[SlideEntry] = ()) -> list[str]:
    """Lines under the results table that say where the encoders' weights came from (random ones loudly)."""
    teacher = cfg.features.teacher
    if paths is not None and entries and imported_features(paths, cfg, entries):
        return [f"Teacher `{teacher.label}`: features imported (`wsi-pipeline import-features`), not extracted by this run."]
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
    root = RunPaths(Path(out)).root
    path = root / "results" / "summary.md"
    if not path.exists() and (root / "predictions.csv").exists():  # a prediction run (`wsi-pipeline predict`)
        with (root / "predictions.csv").open(newline="") as f:
            counts: dict[str, int] = {}
            for row in csv.DictReader(f):
                counts[row["prediction"]] = counts.get(row["prediction"], 0) + 1
        head = f"{sum(counts.values())} slides predicted: " + ", ".join(f"{n} {c}" for c, n in sorted(counts.items())) + "\n"
        metrics = root / "metrics.md"
        head += ("\n" + metrics.read_text()) if metrics.exists() else "(no labels in slides.csv: no metrics)\n"
        return head + "\nStage costs (from the task states):\n\n" + stage_costs(out)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no results yet; run the pipeline through the mil stage")
    return path.read_text() + "\nStage costs (from the task states; peak RSS of the task's worker process and its loaders):\n\n" + stage_costs(out)
