"""A lab's deployment path: export a trained run's teacher and student rows as bundles, predict a *new* demo
cohort (another seed) without labels and with them, and resume a SIGKILLed prediction run to the same bytes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import geojson
import pytest
import yaml
from conftest import write_glass_slide

from pipelines.deploy.bundle import BundleError, load_bundle

CLI = [sys.executable, "-m", "pipelines.cli"]
SMALL_MAPS = {"heatmaps": {"width": 512, "top_k": 1}}  # cheap pictures: the test is about predictions and files


def wsi(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def states(out: Path, stage: str) -> dict[str, dict]:
    folder = out / "state" / stage
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")} if folder.exists() else {}


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def bundles(student_run, tmp_path_factory) -> dict[str, Path]:
    _, _, run, result = student_run
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path_factory.mktemp("bundles")
    for row in ("teacher", "reuse"):
        made = wsi("export-model", run, "--strategy", row, "--dest", folder / row)
        assert made.returncode == 0, made.stderr
    return {row: folder / row for row in ("teacher", "reuse")}


@pytest.fixture(scope="module")
def new_cohort(cohort, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(folder, slides.csv with labels and cases, slides.csv with neither) of the 4 session demo slides (seed 7):
    slides no model has seen (the training cohort is seed 3)."""
    folder = tmp_path_factory.mktemp("new_cohort")
    rows = read_csv(cohort / "slides.csv")
    for r in rows:
        r["slide_path"] = str(cohort / r["slide_path"])
    labelled, unlabelled = folder / "slides.csv", folder / "unlabelled.csv"
    glass = {"slide_path": str(write_glass_slide(folder / "glass.svs")), "slide_id": "glass"}  # no tissue: no tiles
    for path, fields, extra in ((labelled, list(rows[0]), []), (unlabelled, ["slide_path", "slide_id"], [glass])):
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows + extra)
    (folder / "predict.yaml").write_text(yaml.safe_dump(SMALL_MAPS))
    return folder, labelled, unlabelled


def test_bundles_hold_only_safetensors_and_json_and_refuse_a_changed_file(bundles, student_run, tmp_path):
    _, _, run, _ = student_run
    teacher, student = (json.loads((bundles[row] / "bundle.json").read_text()) for row in ("teacher", "reuse"))
    for row, meta in (("teacher", teacher), ("reuse", student)):
        names = {p.relative_to(bundles[row]).as_posix() for p in bundles[row].rglob("*") if p.is_file()}
        assert names == {"bundle.json", "card.md", *meta["files"]}
        assert all(n.endswith((".json", ".md", ".safetensors")) for n in names)
        assert meta["clam"]["folds"] == [0, 1, 2, 3] and meta["classes"] == ["normal", "tumor"]
        assert meta["settings"]["tiling"]["target_mpp"] == 0.5 and meta["settings"]["tissue"]["preset"] == "bwh_biopsy"
        assert meta["card"]["training_cohort"]["n_slides"] == 24 and meta["card"]["cv"]["folds"] == 4
        assert meta["card"]["encoder_patches_per_s"] > 0 and meta["card"]["fingerprints"]["mil/teacher.fold0"]
    assert teacher["encoder"]["kind"] == "teacher" and "encoder/student.safetensors" not in teacher["files"]
    assert teacher["encoder"]["spec"]["model"] == "vit_small" and teacher["encoder"]["random_weights"]
    assert student["encoder"]["kind"] == "student" and student["card"]["fingerprints"]["distill"]
    # the student bundle's CLAMs are the teacher's (Reuse), byte for byte
    assert student["files"]["clam/fold_2.safetensors"] == teacher["files"]["clam/fold_2.safetensors"]
    encoder = load_bundle(bundles["reuse"]).encoder(device="cpu", precision="fp32")
    assert encoder.read_at_input and encoder.input_size == 112
    damaged = tmp_path / "damaged"
    shutil.copytree(bundles["reuse"], damaged)
    with (damaged / "clam" / "fold_1.safetensors").open("r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match="fold_1.safetensors: its sha256 differs"):
        load_bundle(damaged)
    # an end2end:lora bundle: the frozen student + the fold's adapter file, loaded onto it
    import torch

    from mil.finetune.lora import inject_lora, save_adapter
    from pipelines.deploy.bundle import sha256_file

    lora = tmp_path / "lora"
    shutil.copytree(bundles["reuse"], lora)
    tuned = load_bundle(lora).encoder(device="cpu", precision="fp32")
    inject_lora(tuned.model, rank=2)
    with torch.no_grad():
        for name, p in tuned.model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    save_adapter(tuned.model, lora / "encoder" / "adapter.safetensors")
    meta = json.loads((lora / "bundle.json").read_text())
    meta["encoder"]["adapter"] = "encoder/adapter.safetensors"
    meta["files"]["encoder/adapter.safetensors"] = sha256_file(lora / "encoder" / "adapter.safetensors")
    (lora / "bundle.json").write_text(json.dumps(meta))
    adapted = load_bundle(lora).encoder(device="cpu", precision="fp32")
    tiles = torch.randint(0, 255, (3, 112, 112, 3), dtype=torch.uint8)
    assert torch.allclose(adapted(tiles), tuned(tiles), atol=1e-5) and not torch.allclose(adapted(tiles), encoder(tiles), atol=1e-3)

    again = wsi("export-model", run, "--strategy", "retrain", "--dest", tmp_path / "nope")
    assert again.returncode == 2 and "'retrain' is not a row of this run" in again.stderr


def check_viewer(out: Path, labelled: bool) -> None:
    """`wsi-pipeline view` on a predict run: its predictions (correct or not once labelled) and heatmap layer."""
    from pipelines.viewer.content import ViewerContent
    from pipelines.viewer.run_index import load_run

    content = ViewerContent(load_run(out))
    document = json.loads(content.get("api/slides")[0])
    assert document["run"]["kind"] == "predict" and document["run"]["strategies"] == ["predict"]
    expected = {r["slide_id"]: r for r in read_csv(out / "predictions.csv")}
    for slide in document["slides"]:
        shown, row = slide["predictions"]["predict"], expected[slide["id"]]
        assert (shown["prediction"] or "") == row["prediction"]
        assert shown["correct"] == (row["prediction"] == row["label"] if labelled and row["prediction"] else None)
    assert "predict" in next(s for s in document["slides"] if s["id"] == "demo_001")["heatmaps"]
    assert content.get("heatmap/predict/demo_001_files/9/0_0.png")[0][:4] == b"\x89PNG"


def test_teacher_bundle_predicts_new_slides_without_then_with_labels(bundles, new_cohort, tmp_path):
    folder, labelled, unlabelled = new_cohort
    out = tmp_path / "teacher_predictions"
    first = wsi("predict", unlabelled, "--model", bundles["teacher"], "--out", out, "--config", folder / "predict.yaml")
    assert first.returncode == 0, first.stderr[-3000:]
    rows = read_csv(out / "predictions.csv")
    assert [r["slide_id"] for r in rows] == [f"demo_{i:03d}" for i in range(4)] + ["glass"]
    assert rows[-1]["prediction"] == "" and rows[-1]["n_tiles"] == "0"  # a slide without tiles: done, no prediction
    assert json.loads((out / "heatmaps" / "glass" / "heatmap.json").read_text())["n_tiles"] == 0
    rows = rows[:-1]
    assert "label" not in rows[0] and not (out / "metrics.md").exists()
    assert all(abs(float(r["p_normal"]) + float(r["p_tumor"]) - 1) < 1e-4 for r in rows)
    assert json.loads((out / "heatmaps" / "demo_001" / "heatmap.json").read_text())["overlap"] == 0.0  # teacher: one pass
    status = wsi("status", out, "--json")
    assert status.returncode == 0 and {"embed", "predict", "predict_heatmaps"} <= set(json.loads(status.stdout)["stages"])

    check_viewer(out, labelled=False)

    predicted_before = {k: v for k, v in states(out, "predict").items() if k != "glass"}
    second = wsi("predict", labelled, "--model", bundles["teacher"], "--out", out, "--config", folder / "predict.yaml")
    assert second.returncode == 0, second.stderr[-3000:]
    assert {k: v for k, v in states(out, "predict").items() if k != "glass"} == predicted_before  # labels: the table only
    metrics = {r["level"]: r for r in read_csv(out / "metrics.csv")}
    assert float(metrics["slide"]["auc"]) >= 0.9, metrics
    check_viewer(out, labelled=True)
    assert [r["prediction"] for r in read_csv(out / "predictions.csv")] == [r["prediction"] for r in rows]
    assert not (out / "cases.csv").exists()  # one slide per case: no case table
    paired = folder / "paired.csv"  # demo_000 and demo_002 (both normal) from one patient
    paired.write_text(labelled.read_text().replace("patient_002", "patient_000"))
    third = wsi("predict", paired, "--model", bundles["teacher"], "--out", out, "--config", folder / "predict.yaml")
    assert third.returncode == 0 and {k: v for k, v in states(out, "predict").items() if k != "glass"} == predicted_before
    cases = {r["case_id"]: r for r in read_csv(out / "cases.csv")}
    assert len(cases) == 3 and cases["patient_000"]["n_slides"] == "2" and cases["patient_000"]["label"] == "normal"
    by_slide = {r["slide_id"]: float(r["p_tumor"]) for r in read_csv(out / "predictions.csv")}
    assert abs(float(cases["patient_000"]["p_tumor"]) - (by_slide["demo_000"] + by_slide["demo_002"]) / 2) < 1e-5
    report = wsi("report", out)
    assert report.returncode == 0 and "| slide | 4 |" in report.stdout and "| case | 3 |" in report.stdout
    fourth = wsi("predict", unlabelled, "--model", bundles["teacher"], "--out", out, "--config", folder / "predict.yaml")
    assert fourth.returncode == 0 and not (out / "metrics.md").exists() and not (out / "cases.csv").exists()  # no stale tables

    wrong = folder / "wrong.csv"
    wrong.write_text(labelled.read_text().replace("tumor", "tumour", 1))
    refused = wsi("predict", wrong, "--model", bundles["teacher"], "--out", tmp_path / "refused")
    assert refused.returncode == 2 and "labels not among the bundle's classes" in refused.stderr and "line 3" in refused.stderr
    bad = folder / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tiling": {"target_mpp": 1.0}}))
    refused = wsi("predict", labelled, "--model", bundles["teacher"], "--out", tmp_path / "refused", "--config", bad)
    assert refused.returncode == 2 and "tiling" in refused.stderr and "from the bundle" in refused.stderr


def test_student_bundle_resumes_a_sigkilled_prediction_to_identical_results(bundles, new_cohort, tmp_path):
    folder, labelled, _ = new_cohort
    args = [labelled, "--model", bundles["reuse"], "--config", folder / "predict.yaml"]
    reference = tmp_path / "reference"
    done = wsi("predict", *args, "--out", reference)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = {r["level"]: r for r in read_csv(reference / "metrics.csv")}
    assert float(metrics["slide"]["auc"]) >= 0.9, metrics

    out = tmp_path / "killed"
    proc = subprocess.Popen([*CLI, "predict", *map(str, args), "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not [s for s in states(out, "predict_heatmaps").values() if s.get("status") == "done"]:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its local cluster, like a power cut
    proc.wait()
    before = {stage: {k: s for k, s in states(out, stage).items() if s["status"] == "done"} for stage in ("embed", "predict_heatmaps")}
    assert 1 <= len(before["predict_heatmaps"]) < 4, "the kill must land while heatmaps are drawn"
    resumed = wsi("predict", *args, "--out", out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for stage, finished in before.items():
        after = states(out, stage)
        assert all(after[k] == s for k, s in finished.items()), f"{stage} tasks done before the kill reran"
    assert (out / "predictions.csv").read_bytes() == (reference / "predictions.csv").read_bytes()
    for slide in (reference / "heatmaps").iterdir():
        for name in ("tiles.csv", "tiles.geojson", "tissue.geojson"):
            assert (out / "heatmaps" / slide.name / name).read_bytes() == (slide / name).read_bytes(), (slide.name, name)

    meta = json.loads((reference / "heatmaps" / "demo_001" / "heatmap.json").read_text())
    assert meta["overlap"] == 0.5 and meta["folds"] == [0, 1, 2, 3]  # a cheap student: CLAM's overlapping second pass
    width, height = json.loads((reference / "tissue" / "demo_001.json").read_text())["dimensions"]
    for name in ("tiles.geojson", "tissue.geojson"):
        collection = geojson.loads((reference / "heatmaps" / "demo_001" / name).read_text())
        assert collection.is_valid, collection.errors()
        points = list(geojson.utils.coords(collection))
        assert points and all(0 <= x <= width and 0 <= y <= height for x, y in points)
    outline = geojson.loads((reference / "heatmaps" / "demo_001" / "tissue.geojson").read_text())
    assert outline["features"][0]["geometry"]["type"] == "MultiPolygon"
