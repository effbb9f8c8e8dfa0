"""The student's fidelity where the teacher's CLAMs look: on every training-fold slide, the tiles the fold's
teacher CLAM attends to most, student features against teacher features.

The card's held-out metrics are label-free: clusters of the teacher's features stand in for "rare tissue".
This is the check with the labels' help, after stage 2: the tiles that decide a slide for the teacher's
CLAM (its top ``mil.k_sample`` attended tiles, the ones its instance loss trains on), scored on the slides
each CLAM was trained on — never its test slides. A student faithful on average but not there changes
the teacher's diagnosis (the Reuse row), and this says where.
"""

from __future__ import annotations

import numpy as np

from pipelines.config import RunConfig
from pipelines.engine.run_dir import RunPaths
from pipelines.manifest import SlideEntry


def attended_fidelity(entries: list[SlideEntry], cfg: RunConfig, paths: RunPaths) -> dict | None:
    """Per slide and overall: R² and cosine of the student's features on the teacher CLAMs' top-attended tiles.

    R² is ``1 − mean squared error / the teacher's variance per tile over the cohort`` (as the card's
    per-cluster R²: the error in units of the teacher's whole spread). A slide in the training folds of
    several CLAMs is scored on each one's top tiles, averaged. None without student features or teacher CLAMs.
    """
    from features.store import open_store
    from mil.attention import slide_attention
    from mil.strategies import FoldJob, clam_file, load_clam
    from pipelines.stages.features import student_label
    from pipelines.stages.mil import cohort_splits

    model_dir = paths.root / "models" / "mil"
    slides, classes, splits = cohort_splits(entries, cfg)
    files = [clam_file(model_dir, FoldJob("teacher", s.fold)) for s in splits]
    student = student_label(cfg)
    if not all(f.exists() for f in files) or not all(has_store(paths, student, s.slide_id) for s in slides):
        return None
    clams = [load_clam(cfg.mil, f, len(classes), device="cpu") for f in files]
    in_training = {s.slide_id: [i for i, split in enumerate(splits) if s.slide_id in split.train] for s in slides}
    label_of = {s.slide_id: s.label for s in slides}
    total = np.zeros(0)
    sum_sq, count = 0.0, 0
    per_slide = []
    for slide_id, folds in in_training.items():
        teacher, _ = open_store(paths.root, cfg.features.teacher.label, slide_id).load(np.float32)
        total = teacher.sum(0, dtype=np.float64) + (total if total.size else 0)
        sum_sq, count = sum_sq + float((teacher.astype(np.float64) ** 2).sum()), count + len(teacher)
        if not folds or len(teacher) == 0:
            continue
        predicted, _ = open_store(paths.root, student, slide_id).load(np.float32)
        errors, cosines = [], []
        for fold in folds:
            attention = slide_attention(clams[fold], teacher).raw
            top = np.argsort(-attention, kind="stable")[:cfg.mil.k_sample]
            t, p = teacher[top].astype(np.float64), predicted[top].astype(np.float64)
            errors.append(float(((p - t) ** 2).sum(1).mean()))
            cosines.append(float(((p * t).sum(1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(t, axis=1) + 1e-12)).mean()))
        per_slide.append({"slide_id": slide_id, "label": label_of[slide_id], "folds": len(folds),
                          "mse": float(np.mean(errors)), "cosine": round(float(np.mean(cosines)), 4)})
    if not per_slide:
        return None
    variance = sum_sq / count - float(((total / count) ** 2).sum())  # the teacher's variance per tile, all dimensions
    for row in per_slide:
        row["r2"] = round(1 - row.pop("mse") / variance, 4)
    worst = min(per_slide, key=lambda r: r["r2"])
    by_class = {c: [r for r in per_slide if r["label"] == c] for c in classes}
    return {"top_k": cfg.mil.k_sample, "n_slides": len(per_slide),
            "mean_r2": round(float(np.mean([r["r2"] for r in per_slide])), 4),
            "mean_cosine": round(float(np.mean([r["cosine"] for r in per_slide])), 4),
            "worst_r2": worst["r2"], "worst_slide": worst["slide_id"],
            "by_class": {c: {"n_slides": len(rows), "mean_r2": round(float(np.mean([r["r2"] for r in rows])), 4),
                             "worst_r2": min(r["r2"] for r in rows)} for c, rows in by_class.items() if rows},
            "slides": per_slide}


def has_store(paths: RunPaths, label: str, slide_id: str) -> bool:
    from features.store import store_path

    return store_path(paths.root, label, slide_id).exists()


def attended_fidelity_line(result: dict | None, target: float) -> list[str]:
    """The line under the results table; a WARNING when a slide's attended tiles fall below ``target`` R²."""
    if result is None:
        return []
    classes = ", ".join(f"{c} {v['mean_r2']:.3f} (worst {v['worst_r2']:.3f})" for c, v in result["by_class"].items())
    low = [r["slide_id"] for r in result["slides"] if r["r2"] < target]
    return [f"Student fidelity on the teacher CLAMs' top {result['top_k']} attended tiles of their training slides: "
            f"R² mean {result['mean_r2']:.3f}, by class {classes}; worst slide {result['worst_r2']:.3f} "
            f"(`{result['worst_slide']}`), cosine mean {result['mean_cosine']:.3f}"
            + (f" — WARNING: {len(low)} slide(s) below R² {target} (`distill.rare_r2_target`) on the tiles that decide "
               f"them: {', '.join(low[:5])}{', …' if len(low) > 5 else ''}" if low else ".")]
