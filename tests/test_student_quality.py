"""EFCM's promise on a demo cohort: the student distilled with the README's settings lives in the teacher's
space (held-out cosine and R²), so the teacher's own CLAMs work on its features (Reuse ≈ Teacher)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import yaml

from conftest import TEACHER_RUN_CONFIG
from pipelines.cli import DEMO_CONFIG


def test_readme_student_matches_the_teacher_and_its_clams_transfer(teacher_run, tmp_path):
    folder, teacher_out, first = teacher_run
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "out"
    shutil.copytree(teacher_out, out)  # the teacher's features and CLAMs are reused, not recomputed
    distill = {**yaml.safe_load(DEMO_CONFIG)["distill"], "precision": "fp32"}  # the README's student, as a CPU without bf16 runs it
    config = {**TEACHER_RUN_CONFIG, "distill": distill, "mil": {**TEACHER_RUN_CONFIG["mil"], "strategies": ["teacher", "reuse"]},
              "heatmaps": {"slides": "none"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(folder / "slides.csv"), "--config",
                             str(tmp_path / "run.yaml"), "--out", str(out)], capture_output=True, text=True, timeout=900)
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
