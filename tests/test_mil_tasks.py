"""Stage 2 at cohort scale: one task per results row and fold, on a features-only cohort (imported CLAM-layout
h5 features, no slide files), killed with SIGKILL mid-way and resumed; progress reports; lazy bags."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

CLI = [sys.executable, "-m", "pipelines.cli"]
CONFIG = """\
features:
  teacher: {model: uni}
mil:
  strategies: [teacher]
  folds: 4
  val_fraction: 0.17
  max_epochs: 15
  min_epochs: 15
runner:
  n_workers: 2
"""


def wsi(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def imported_run(folder: Path) -> tuple[Path, Path, Path]:
    """A features-only cohort (24 slides, 64-d) imported into a fresh run directory: (slides.csv, config, out)."""
    from features.synthetic import write_feature_cohort

    csv_path = write_feature_cohort(folder / "cohort", 24, dim=64, tiles=(150, 300), positive_share=0.3, shift=3.0, seed=3)
    (folder / "run.yaml").write_text(CONFIG)
    out = folder / "run"
    result = wsi("import-features", folder / "cohort", "--out", out, "--encoder", "uni")
    assert result.returncode == 0, result.stderr
    return csv_path, folder / "run.yaml", out


def states(out: Path, stage: str) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "state" / stage).glob("*.json"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    csv_path, config, out = imported_run(tmp_path_factory.mktemp("reference"))
    result = wsi("run", csv_path, "--config", config, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "29 tasks: 29 done" in result.stderr  # features check × 24, mil 4 folds, results
    return out


def test_features_only_cohort_trains_and_reports_without_slide_files(reference, tmp_path):
    assert not (reference / "tissue").exists() and not (reference / "tiles").exists()  # no pixels were touched
    report = wsi("report", reference)
    assert report.returncode == 0 and "Teacher baseline" in report.stdout
    assert "features imported" in report.stdout
    with (reference / "results" / "summary.csv").open(newline="") as f:
        (teacher,) = list(csv.DictReader(f))
    assert float(teacher["auc_mean"]) >= 0.9 and int(teacher["folds"]) == 4
    status = json.loads(wsi("status", reference, "--json").stdout)
    assert status["cohort"]["mil"] | {"tasks": None} == {"status": "done", "error": "", "done": 4, "total": 4, "tasks": None}
    assert {row["features"]["status"] for row in status["slides"].values()} == {"done"}
    # the stages that need pixels are refused up front, naming the stage and the slides
    (tmp_path / "all.yaml").write_text(CONFIG.replace("strategies: [teacher]", "strategies: [teacher, retrain]"))
    refused = wsi("run", reference.parent / "cohort" / "slides.csv", "--config", tmp_path / "all.yaml", "--out", reference)
    assert refused.returncode == 2 and "stage distill needs the slide files" in refused.stderr
    assert "slide_0000" in refused.stderr


def test_reimporting_features_changes_their_fingerprint_not_the_teacher_config(reference, tmp_path):
    import shutil

    from pipelines.config import RunConfig, load_config
    from pipelines.engine.plan import build_plan
    from pipelines.engine.run_dir import RunPaths
    from pipelines.manifest import read_manifest
    from pipelines.stages.table import STAGES

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    entries, cfg = read_manifest(out / "manifest.csv"), load_config(out / "run.yaml")
    fps = lambda c: {t.key: t.fingerprint for t in build_plan(STAGES, entries, c, RunPaths(out)).values() if t.stage == "features"}  # noqa: E731
    before = fps(cfg)
    other = RunConfig.model_validate({**cfg.model_dump(mode="json"), "features": {"teacher": {"model": "uni", "precision": "fp32"}}})
    assert fps(other) == before  # the teacher's settings built nothing here
    time.sleep(0.01)
    assert wsi("import-features", reference.parent / "cohort", "--out", out, "--encoder", "uni").returncode == 0
    after = fps(cfg)
    assert all(after[k] != before[k] for k in before)  # re-imported: what used them reruns


def test_fold_tasks_come_after_the_tasks_they_need_whatever_the_row_order(tmp_path):
    from pipelines.config import RunConfig
    from pipelines.engine.plan import build_plan
    from pipelines.engine.run_dir import RunPaths
    from pipelines.manifest import SlideEntry
    from pipelines.stages.table import STAGES

    entries = [SlideEntry(f"s{i}", tmp_path / f"s{i}.svs", i + 2, "tumor" if i % 2 else "normal") for i in range(8)]
    cfg = RunConfig.model_validate({"mil": {"strategies": ["reuse", "end2end", "retrain", "teacher"],
                                            "finetune": ["lora", "fpt"], "folds": 2}})
    plan = build_plan(STAGES, entries, cfg, RunPaths(tmp_path / "out"))
    order = list(plan)
    assert all(order.index(d) < order.index(tid) for tid, t in plan.items() for d in t.deps)
    keys = [t.key for t in plan.values() if t.stage == "mil"]
    assert keys[:5] == ["teacher.fold0", "retrain.fold0", "reuse.fold0", "end2end-lora.fold0", "end2end-fpt.fold0"]
    assert plan["mil/reuse.fold1"].deps[-1] == "mil/teacher.fold1" and plan["mil/end2end-lora.fold1"].deps[-1] == "mil/retrain.fold1"
    assert plan["mil/end2end-fpt.fold0"].deps[-1] == "mil/teacher.fold0"
    assert set(plan["results/_cohort"].deps) == {tid for tid in plan if tid.startswith("mil/")}


def test_sigkill_between_fold_tasks_resumes_them_and_matches_an_uninterrupted_run(reference, tmp_path):
    csv_path, config, out = imported_run(tmp_path)
    proc = subprocess.Popen([*CLI, "run", str(csv_path), "--config", str(config), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        done = [k for k, s in states(out, "mil").items() if s.get("status") == "done"] if (out / "state").exists() else []
        if len(done) >= 2:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {k: s for k, s in states(out, "mil").items() if s["status"] == "done"}
    assert 2 <= len(before) < 4, "the kill must land between fold tasks"
    fold_bytes = {k: (out / "results" / "folds" / f"{k}.json").read_bytes() for k in before}

    resumed = wsi("run", csv_path, "--config", config, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{24 + len(before)} up-to-date" in resumed.stderr  # the feature checks and the finished folds
    after = states(out, "mil")
    for key, state in before.items():
        assert after[key] == state, f"{key} finished before the kill and must not rerun"
        assert (out / "results" / "folds" / f"{key}.json").read_bytes() == fold_bytes[key]
    # CLAM training is seeded per fold and runs on one thread per task either way: the same numbers exactly
    for name in ("predictions.csv", "fold_metrics.csv", "summary.csv"):
        assert (out / "results" / name).read_text() == (reference / "results" / name).read_text(), name


def test_progress_is_written_throttled_and_shown(tmp_path):
    from rich.progress import Progress

    from pipelines.engine.plan import Task
    from pipelines.engine.run_dir import RunPaths
    from pipelines.engine.state import read_state
    from pipelines.engine.task import ProgressWriter
    from pipelines.live import LiveTasks, progress_text
    from pipelines.stages.table import STAGES

    paths = RunPaths(tmp_path)
    writer = ProgressWriter(paths, "mil", "teacher.fold0", {"status": "running", "fingerprint": "f"}, interval=60)
    writer(done=1, total=50, unit="epoch", val_loss=0.7)
    writer(done=2, total=50, unit="epoch")  # within the interval: not written
    state = read_state(paths, "mil", "teacher.fold0")
    assert state["status"] == "running" and state["progress"]["done"] == 1 and state["progress"]["val_loss"] == 0.7
    writer(done=50, total=50, unit="epoch")  # the last one always is
    assert read_state(paths, "mil", "teacher.fold0")["progress"]["done"] == 50
    assert progress_text({"done": 12, "total": 200, "unit": "epoch"}) == " (epoch 12/200)" and progress_text(None) == ""
    task = Task(STAGES["mil"], "mil", "teacher.fold0", scope="fold", status="running")
    with Progress(transient=True, disable=True) as progress:
        live = LiveTasks(progress, tmp_path)
        live.watch({task.id: task})
        live.poll()
        (row,) = [t for t in progress.tasks if t.description.startswith("mil/teacher.fold0")]
        assert row.completed == 50 and row.total == 50
        task.status = "done"
        live.poll()
        assert not progress.tasks


def test_bag_cache_keeps_its_byte_budget():
    from mil.bags import BagCache

    reads = []

    def read(key):
        reads.append(key)
        return np.zeros((100, 10), np.float32)  # 4,000 bytes

    cache = BagCache(read, budget_bytes=10_000)  # room for two bags
    for key in ["a", "b", "a", "c", "a", "b"]:
        assert cache(key).shape == (100, 10)
    assert reads == ["a", "b", "c", "b"] and len(cache) == 2 and cache.bytes <= 10_000
    assert (cache.reads, cache.hits) == (4, 2)
    none = BagCache(read, budget_bytes=0)
    none("a"), none("a")
    assert len(none) == 0 and none.reads == 2


def test_stores_of_one_cohort_at_two_precisions_are_reported_not_mixed_unseen(reference, tmp_path):
    """``precision: auto`` resolves per worker (bf16 on one machine, fp32 on another): the MIL tasks name the mix."""
    import shutil

    import zarr

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    stores = sorted((out / "features").glob("*/*.zarr"))
    for i, store in enumerate(stores):
        zarr.open_group(str(store), mode="r+").attrs["precision"] = "bf16" if i < 3 else "fp32"
    result = wsi("run", reference.parent / "cohort" / "slides.csv", "--config", reference.parent / "run.yaml", "--out", out)
    assert result.returncode == 0, result.stderr
    warnings = [w for s in states(out, "mil").values() for w in s["warnings"]]
    assert len(warnings) == 4 and all("computed at 2 precisions: fp32 (21 slides" in w and "bf16 (3 slides" in w
                                      for w in warnings), warnings
    from pipelines.stages.distill import precision_mix

    assert precision_mix({"a": "fp32", "b": "fp32"}, "x") is None
