"""EFCM's promise on a demo cohort with focal tumours: the student distilled with the README's settings lives in
the teacher's space where it matters — on the rare tumour tiles, not only on average — so the teacher's own
CLAMs work on its features (Reuse ≈ Teacher), and its card says whether it learned the rare tissue."""

from __future__ import annotations

import csv
import json

import numpy as np

from distill.fidelity import subset_fidelity
from features.store import open_store
from wsi.demo_cohort import tumour_tiles

TUMOUR_R2 = 0.6  # measured: see test_the_card_scores_every_tissue_cluster_and_gives_a_verdict


def truth_fidelity(folder, out) -> tuple[dict, dict]:
    """Student vs teacher features on the tiles whose centre lies in the truth's tumour mask, and on the others."""
    preds, targets, tumour = [], [], []
    for row in csv.DictReader((folder / "slides.csv").open()):
        teacher, coords = open_store(out, "vit_small-random-seed0", row["slide_id"]).load(np.float32)
        student, _ = open_store(out, "student_vit_tiny", row["slide_id"]).load(np.float32)
        size = json.loads((out / "tiles" / f"{row['slide_id']}.json").read_text())["level0_size"]
        preds.append(student), targets.append(teacher), tumour.append(tumour_tiles(folder / row["slide_path"], coords, size))
    p, t, rare = np.concatenate(preds), np.concatenate(targets), np.concatenate(tumour)
    return subset_fidelity(p, t, rare), subset_fidelity(p, t, ~rare)


def test_readme_student_matches_the_teacher_and_its_clams_transfer(student_run):
    _, teacher_out, out, result = student_run
    assert result.returncode == 0, result.stderr[-3000:]
    for state in (out / "state" / "features").glob("*.json"):  # the teacher's work was not redone
        assert json.loads(state.read_text())["finished"] == json.loads((teacher_out / "state" / "features" / state.name).read_text())["finished"]
    card = json.loads((out / "models" / "student" / "student.json").read_text())
    best = card["metrics"]["best"]
    assert card["precision"] == "fp32" and card["read_at_input"] and card["dewhiten_head"]
    assert best["cosine"] >= 0.85 and best["r2"] >= 0.6, best  # on the held-out slides
    summary = {r["strategy"]: r for r in csv.DictReader((out / "results" / "summary.csv").open())}
    teacher, reuse = float(summary["teacher"]["acc_mean"]), float(summary["reuse"]["acc_mean"])
    assert reuse >= teacher - 0.05, summary
    assert float(summary["reuse"]["auc_mean"]) >= float(summary["teacher"]["auc_mean"]) - 0.05, summary


def test_the_card_scores_every_tissue_cluster_and_gives_a_verdict(student_run):
    folder, _, out, result = student_run
    assert result.returncode == 0, result.stderr[-3000:]
    card = json.loads((out / "models" / "student" / "student.json").read_text())
    best, fidelity = card["metrics"]["best"], card["fidelity"]
    assert card["metrics"]["selected_by"] == "balanced_r2"
    assert {"balanced_r2", "worst_cluster_r2", "worst_decile_cosine"} <= set(best)
    assert best["worst_cluster_r2"] <= best["balanced_r2"] and best["worst_decile_cosine"] <= best["cosine"]
    assert fidelity["n_clusters"] == 16 and sum(c["n"] for c in fidelity["clusters"].values()) == card["data"]["val_tiles"]
    verdict = fidelity["verdict"]
    assert verdict["faithful"] == (best["worst_cluster_r2"] >= verdict["target"]) and verdict["message"]
    assert all("worst_cluster_r2" in h for h in card["history"][1:])  # every epoch scored per cluster
    # the truth's tumour tiles (no label reached the distillation): the student reproduces them, not only the rest
    tumour, other = truth_fidelity(folder, out)
    assert tumour["n"] >= 20 and tumour["r2"] >= TUMOUR_R2, (tumour, other)
    report = (out / "results" / "summary.md").read_text()
    assert "worst cluster R²" in report and "Reuse agreement" in report
    agreement = json.loads((out / "results" / "reuse_agreement.json").read_text())
    assert agreement["n_slides"] == 24 and agreement["class_agreement"] >= 0.9, agreement
    assert (verdict["faithful"] is False) == ("warning" in result.stdout + result.stderr and "NOT faithful" in result.stdout + result.stderr)


def test_the_teacher_clams_attended_tiles_are_scored_on_their_training_slides(student_run):
    """After stage 2, the tiles that decide each slide for the teacher's CLAMs (their top-k attention) are scored:
    the student reproduces them on both classes, and no CLAM is asked about its own test slides."""
    _, _, out, result = student_run
    assert result.returncode == 0, result.stderr[-3000:]
    attended = json.loads((out / "results" / "attended_fidelity.json").read_text())
    assert attended["n_slides"] == 24 and set(attended["by_class"]) == {"normal", "tumor"}
    assert all(1 <= s["folds"] <= 3 for s in attended["slides"])  # 4 folds: each slide is one fold's test slide
    assert attended["worst_r2"] == min(c["worst_r2"] for c in attended["by_class"].values()) <= attended["mean_r2"]
    assert attended["by_class"]["tumor"]["mean_r2"] >= TUMOUR_R2, attended["by_class"]
    assert "top 8 attended tiles" in (out / "results" / "summary.md").read_text()
