"""The installed ``wsi-pipeline`` command end to end, on good slides mixed with every kind of bad one."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import corrupt_jpeg_tiles, tissue_tile_indices, write_glass_slide, write_latin1_description
from PIL import Image

from pipelines.config import RunConfig, load_config

CLI = [sys.executable, "-m", "pipelines.cli"]


def wsi(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def mixed_cohort(cohort, tmp_path_factory) -> Path:
    """Two good demo slides plus one of each failure the issue lists, and a CSV naming them all."""
    folder = tmp_path_factory.mktemp("mixed")
    for name in ("demo_000.svs", "demo_002.tif"):
        shutil.copy(cohort / name, folder / name)
    (folder / "notes.svs").write_text("not a slide\n")
    truncated = folder / "truncated.svs"
    shutil.copy(cohort / "demo_001.svs", truncated)
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 3)
    shutil.copy(cohort / "demo_003.svs", folder / "corrupt.svs")
    corrupt_jpeg_tiles(folder / "corrupt.svs", level=-1)  # the level the tissue mask reads
    write_glass_slide(folder / "nompp.tif", flavour="generic", mpp=None)
    write_glass_slide(folder / "glass.svs")
    shutil.copy(cohort / "demo_001.svs", folder / "partly.svs")
    corrupt_jpeg_tiles(folder / "partly.svs", level=0, indices=tissue_tile_indices(cohort / "demo_001.svs", 3))
    write_latin1_description(cohort / "demo_003.svs", folder / "latin1.svs")
    rows = ["slide_path,slide_id,label", "demo_000.svs,good_svs,normal", "missing.svs,missing,tumor",
            "notes.svs,not_a_slide,normal", "truncated.svs,truncated,tumor", "corrupt.svs,corrupt_jpeg,tumor",
            "nompp.tif,no_mpp,normal", "glass.svs,no_tissue,normal", "demo_002.tif,good_tif,normal",
            "partly.svs,partly_corrupt,tumor", "latin1.svs,latin1,tumor"]
    (folder / "slides.csv").write_text("\n".join(rows) + "\n")
    (folder / "run.yaml").write_text("tissue:\n  preset: bwh_biopsy\n  area_reference_mpp: 0.25\n"
                                     "features:\n  teacher:\n    model: vit_tiny\n    seed: 0\n")
    return folder


@pytest.fixture(scope="module")
def mixed_run(mixed_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    result = wsi("run", mixed_cohort / "slides.csv", "--config", mixed_cohort / "run.yaml", "--out", out, "--until", "features")
    wsi("run", mixed_cohort / "slides.csv", "--config", mixed_cohort / "run.yaml", "--out", out, "--until", "qc")  # + QC
    return result, out


def _state(out: Path, stage: str, slide_id: str) -> dict:
    return json.loads((out / "state" / stage / f"{slide_id}.json").read_text())


def test_good_slides_complete_despite_bad_ones(mixed_run):
    result, out = mixed_run
    assert result.returncode == 1, result.stdout + result.stderr  # incomplete run
    assert "5 failed" in result.stderr and "10 skipped" in result.stderr  # tissue failed; tiles, features skipped
    for slide_id in ("good_svs", "good_tif"):
        assert _state(out, "tissue", slide_id)["status"] == "done"
        assert _state(out, "tiles", slide_id)["status"] == "done"
        coords = np.load(out / "tiles" / f"{slide_id}.coords.npy")
        meta = json.loads((out / "tiles" / f"{slide_id}.json").read_text())
        assert coords.ndim == 2 and coords.shape[1] == 2 and len(coords) == meta["n_tiles"] > 10
        assert meta["target_mpp"] == 0.5 and meta["patch_size"] == 256
        assert Image.open(out / "tissue" / f"{slide_id}.jpg").size[0] > 100
    assert json.loads((out / "tiles" / "good_tif.json").read_text())["read_size"] == 256  # 20× slide
    assert json.loads((out / "tiles" / "good_svs.json").read_text())["read_size"] == 512  # 40× slide
    assert yaml.safe_load((out / "run.yaml").read_text())["tissue"]["preset"] == "bwh_biopsy"
    RunConfig.model_validate(yaml.safe_load((out / "run.yaml").read_text()))
    assert not list(out.rglob("*.tmp")), "no temporary files left behind"


@pytest.mark.parametrize("slide_id, reason", [
    ("missing", "file not found ["),
    ("not_a_slide", "not a readable slide"),
    ("truncated", "truncated"),
    ("corrupt_jpeg", "cannot read region"),
    ("no_mpp", "no mpp found"),
])
def test_each_bad_slide_is_reported_with_its_reason(mixed_run, slide_id, reason):
    result, out = mixed_run
    state = _state(out, "tissue", slide_id)
    assert state["status"] == "failed"
    if slide_id != "truncated":  # the truncation point decides whether opening or reading fails
        assert reason in state["error"]
    line = {"missing": 3, "not_a_slide": 4, "truncated": 5, "corrupt_jpeg": 6, "no_mpp": 7}[slide_id]
    assert f"(slides.csv line {line}, column slide_path)" in state["error"]
    assert state["traceback"].startswith("Traceback")
    assert _state(out, "tiles", slide_id)["status"] == "skipped"
    assert slide_id in result.stderr + result.stdout
    assert not (out / "tiles" / f"{slide_id}.json").exists()


def test_a_few_corrupt_tiles_are_left_out_and_odd_metadata_reported(mixed_run, mixed_cohort):
    """Three undecodable level-0 tiles under the tissue: the teacher's features read, which checks every tile
    (``slides.verify_tiles: features``), leaves exactly them out of the store, counted in its state and QC; the tiles
    stage, asked to check instead (``tiles``), leaves out the same three. A Latin-1 description: read, and said so;
    the failed slides are QC rows with their reasons."""
    import csv

    from features.store import open_store
    from pipelines.engine.run_dir import RunPaths
    from pipelines.manifest import SlideEntry
    from pipelines.stages.tiles import tiles_stage
    from pipelines.stages.tissue import tissue_stage

    result, out = mixed_run
    config = load_config(out / "run.yaml")
    features = _state(out, "features", "partly_corrupt")
    assert features["status"] == "done" and config.tile_check() == "features"
    store = open_store(out, config.features.teacher.label, "partly_corrupt")
    checked = store.attrs["tile_check"]  # the store says what its read found
    assert checked["n_unreadable_tiles"] == features["meta"]["n_unreadable_tiles"] == 3
    assert all(t["level"] == 0 and "cannot read region" in t["error"] for t in checked["unreadable_tiles"])
    bad = {(t["x"], t["y"]) for t in checked["unreadable_tiles"]}
    grid = {tuple(c) for c in np.load(out / "tiles" / "partly_corrupt.coords.npy").tolist()}  # not checked: every tile
    stored = {tuple(c) for c in store.coords.tolist()}
    assert len(bad) == 3 and bad <= grid and stored == grid - bad and checked["n_read"] == len(grid)
    assert len(stored) == features["meta"]["n_tiles"] == len(store.sharpness) > 30
    assert not (out / "tiles" / "partly_corrupt.sharpness.npy").exists()

    # the tiles stage asked to check: the same three, out of the grid itself
    in_tiles = RunConfig.model_validate({**config.model_dump(), "slides": {**config.slides.model_dump(), "verify_tiles": "tiles"}})
    elsewhere = RunPaths(out.parent / "checked_in_tiles")
    entry = SlideEntry("partly_corrupt", mixed_cohort / "partly.svs", line=2)
    tissue_stage(entry, in_tiles, elsewhere)
    meta = tiles_stage(entry, in_tiles, elsewhere)
    assert meta["n_unreadable_tiles"] == 3 and {(t["x"], t["y"]) for t in meta["unreadable_tiles"]} == bad
    assert {tuple(c) for c in np.load(elsewhere.tile_coords("partly_corrupt")).tolist()} == stored
    np.testing.assert_allclose(np.load(elsewhere.tile_sharpness("partly_corrupt")), store.sharpness, rtol=1e-5)
    rows = {r["slide_id"]: r for r in csv.DictReader((out / "qc" / "slides.csv").open())}
    assert rows["partly_corrupt"]["n_unreadable_tiles"] == "3" and "left out of the features" in rows["partly_corrupt"]["warnings"]
    assert rows["partly_corrupt"]["n_tiles"] == str(len(stored)) and rows["partly_corrupt"]["blurred_fraction"] != ""
    assert rows["latin1"]["status"] == "ok" and "not UTF-8 (byte 0xe4" in rows["latin1"]["warnings"]
    assert rows["good_svs"]["n_unreadable_tiles"] == "0" and rows["good_svs"]["mpp_detail"]
    assert rows["no_mpp"]["status"] == "failed tissue" and "no mpp found" in rows["no_mpp"]["warnings"]
    assert rows["corrupt_jpeg"]["status"] == "failed tissue" and "slides.max_unreadable_fraction" in rows["corrupt_jpeg"]["warnings"]
    assert "missing" in rows and "not_a_slide" in rows
    report = json.loads(wsi("status", out, "--json").stdout)
    assert "left out of the features" in report["slides"]["partly_corrupt"]["features"]["warnings"][0]
    assert "not UTF-8" in report["slides"]["latin1"]["tissue"]["warnings"][0]
    assert "warning (features): 3 of" in " ".join(wsi("status", out).stdout.split())


def test_slide_without_tissue_gives_empty_tiles_and_a_warning(mixed_run):
    result, out = mixed_run
    assert _state(out, "tiles", "no_tissue")["status"] == "done"
    assert np.load(out / "tiles" / "no_tissue.coords.npy").shape == (0, 2)
    assert any("no tissue" in w for w in _state(out, "tissue", "no_tissue")["warnings"])
    summary = " ".join(result.stderr.split())
    assert "1 slide(s) with no tissue: no_tissue" in summary  # the closing summary names it


def test_csv_errors_stop_before_any_work(tmp_path):
    (tmp_path / "slides.csv").write_bytes(b"slide_path,slide_id\na.svs,x\nb.svs,x\n")
    result = wsi("run", tmp_path / "slides.csv", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert "line 3, column slide_id: duplicate id 'x'" in result.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "bad.yaml").write_text("tiling:\n  patch: 3\n")
    result = wsi("run", tmp_path / "slides.csv", "--config", tmp_path / "bad.yaml")
    assert result.returncode == 2 and "tiling.patch: unknown field" in result.stderr


def test_init_writes_a_config_that_loads(tmp_path):
    result = wsi("init", tmp_path / "run.yaml")
    assert result.returncode == 0
    assert RunConfig.model_validate(yaml.safe_load((tmp_path / "run.yaml").read_text())) == RunConfig()
    assert wsi("init", tmp_path / "run.yaml").returncode == 2  # refuses to overwrite
    assert wsi("init", tmp_path / "run.yaml", "--force").returncode == 0


def test_demo_then_run_on_the_demo_cohort_with_relative_paths(tmp_path):
    result = wsi("demo", "demo", "--n-slides", 6, "--size", 4096, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "demo").glob("demo_*.svs"))) == 5 and (tmp_path / "demo" / "demo_002.tif").exists()
    config = tmp_path / "demo" / "run.yaml"  # this test is about the commands: short training will do (suite time)
    settings = yaml.safe_load(config.read_text())
    assert settings["distill"]["epochs"] == 20
    settings["distill"].update(epochs=2, tiles_per_epoch=128)
    settings["mil"].update(max_epochs=6, min_epochs=2, end2end_epochs=1)
    config.write_text(yaml.safe_dump(settings))
    run = wsi("run", "demo/slides.csv", "--config", "demo/run.yaml", "--out", "runs/demo", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    # tissue, tiles, features, student_features, heatmaps × 6 slides; qc, distill, results; mil: 3 folds × 4 rows
    assert "45 tasks: 45 done" in run.stderr
    for slide_id in ("demo_000", "demo_001"):
        assert (tmp_path / "runs" / "demo" / "tissue" / f"{slide_id}.jpg").exists()
        assert len(np.load(tmp_path / "runs" / "demo" / "tiles" / f"{slide_id}.coords.npy")) > 0
    status = wsi("status", "runs/demo", "--json", cwd=tmp_path)  # from the run's own copy of the manifest
    assert status.returncode == 0, status.stdout
    assert {c["status"] for row in json.loads(status.stdout)["slides"].values() for c in row.values()} == {"done"}
    elsewhere = wsi("status", tmp_path / "runs" / "demo", "--json", cwd=tmp_path / "demo")
    assert elsewhere.returncode == 0
    again = wsi("run", "demo/slides.csv", "--config", "demo/run.yaml", "--out", "runs/demo", cwd=tmp_path)
    assert "45 up-to-date" in again.stderr
    assert (tmp_path / "runs" / "demo" / "heatmaps" / "teacher" / "demo_001" / "tiles.geojson").exists()
    e2e = wsi("heatmaps", "runs/demo", "--strategy", "end2end", "--slide", "demo_001", "--top-k", "1", cwd=tmp_path)
    assert e2e.returncode == 0, e2e.stderr  # End2end: the fold's fine-tuned student re-embeds the slide's tiles
    meta = json.loads((tmp_path / "runs" / "demo" / "heatmaps" / "end2end" / "demo_001" / "heatmap.json").read_text())
    assert meta["strategy"] == "end2end" and meta["n_tiles"] == len(np.load(tmp_path / "runs/demo/tiles/demo_001.coords.npy"))
    wrong = wsi("heatmaps", "runs/demo", "--strategy", "retrain", "--adapter", "a.safetensors", "--slide", "demo_001",
                cwd=tmp_path)
    assert wrong.returncode == 1 and "--adapter is for the end2end:lora row" in wrong.stderr
    report = wsi("report", "runs/demo", cwd=tmp_path)
    assert report.returncode == 0
    for row in ("Teacher baseline", "Reuse", "Retrain", "End2end"):
        assert row in report.stdout
    assert "| features | 6 |" in report.stdout and "| mil | 12 |" in report.stdout  # stage costs
    assert "| results | 1 |" in report.stdout
    feature_state = json.loads((tmp_path / "runs" / "demo" / "state" / "features" / "demo_000.json").read_text())
    assert feature_state["peak_rss_mb"] > 100 and feature_state["meta"]["n_tiles"] > 0
    with (tmp_path / "runs" / "demo" / "results" / "summary.csv").open(newline="") as f:
        summary = list(csv.DictReader(f))
    assert [r["strategy"] for r in summary] == ["teacher", "reuse", "retrain", "end2end"]
    for row in summary:  # every row has real metrics: ACC and balanced ACC on every fold, AUC where defined
        assert all(math.isfinite(float(row[k])) for k in ("acc_mean", "bacc_mean", "auc_mean")), row
    # End2end's bundle: one fold (each fold tuned its own student), that fold's fine-tuned student and CLAM
    exported = wsi("export-model", "runs/demo", "--strategy", "end2end", "--dest", "bundle", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    from safetensors.torch import load_file

    from pipelines.deploy.bundle import load_bundle

    bundle = load_bundle(tmp_path / "bundle")
    (fold,) = bundle.meta["clam"]["folds"]
    tuned = load_file(str(tmp_path / "runs/demo/models/mil/end2end" / f"fold_{fold}_student.safetensors"))
    encoder = bundle.encoder(device="cpu", precision="fp32")
    assert all((encoder.model.state_dict()[k] == v).all() for k, v in tuned.items())
    assert bundle.clams("cpu")[0].state_dict()["fc.0.weight"].equal(
        load_file(str(tmp_path / "runs/demo/models/mil/end2end" / f"fold_{fold}_clam.safetensors"))["fc.0.weight"])


def test_help_is_fast_and_does_not_import_torch():
    start = time.perf_counter()
    assert wsi("--help").returncode == 0
    assert time.perf_counter() - start < 5
    code = "import sys, pipelines.cli, pipelines.engine.runner, pipelines.status; print('torch' in sys.modules)"
    probe = subprocess.run([sys.executable, "-c", code],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "False"


def test_readme_commands_are_what_ci_runs():
    root = Path(__file__).parents[1]
    ci = (root / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in (root / "README.md").read_text()
