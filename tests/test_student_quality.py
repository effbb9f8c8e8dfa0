"""EFCM's promise on a demo cohort: the student distilled with the README's settings lives in the teacher's
space (held-out cosine and R²), so the teacher's own CLAMs work on its features (Reuse ≈ Teacher)."""

from __future__ import annotations

import csv
import json


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
