"""Same model everywhere: seeded random encoders, fingerprints that follow the weights, no silent random teacher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from features.encoders import EncoderConfig, NoWeightsError, WeightsError, build_backbone, create_encoder, weights_digest
from features.store import open_store
from pipelines.config import RunConfig
from pipelines.engine.cluster import machine_cores
from pipelines.engine.plan import build_plan
from pipelines.engine.run_dir import RunPaths
from pipelines.manifest import read_manifest
from pipelines.stages.table import STAGES, check_encoders

CLI = [sys.executable, "-m", "pipelines.cli"]
# a small, fast teacher with random weights chosen explicitly (seed), on 128-px tiles at 1 µm/px; fp32, the precision
# End2end's FPT fine-tunes at, so its outputs can be compared with the stored features
RUN_CONFIG = {
    "tissue": {"preset": "bwh_biopsy", "area_reference_mpp": 0.25},
    "tiling": {"target_mpp": 1.0, "patch_size": 128},
    "features": {"teacher": {"model": "vit_tiny", "pool": "mean", "seed": 0, "input_size": 112, "precision": "fp32",
                             "model_kwargs": {"img_size": 112}},
                 "num_workers": 0, "batch_size": 16},
    "heatmaps": {"overlap": 0.5},
}


def test_random_weights_depend_on_the_seed_alone_and_leave_the_global_rng_alone():
    cfg = EncoderConfig(model="vit_tiny", seed=3, model_kwargs={"depth": 2})
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first, _, _ = build_backbone(cfg)
    assert torch.equal(torch.random.get_rng_state(), before)  # the build drew from its own stream
    torch.rand(1000)  # whatever the process did before
    second, _, _ = build_backbone(cfg)
    assert weights_digest(first) == weights_digest(second)
    other, _, _ = build_backbone(cfg.model_copy(update={"seed": 4}))
    assert weights_digest(other) != weights_digest(first)
    assert create_encoder(cfg).digest == weights_digest(first.eval())


def test_random_weights_are_the_same_whatever_the_cpu_instruction_set():
    """torch's own samplers differ between its default and AVX2 kernels; the encoders' weights must not."""
    code = ("import torch; from features.encoders import EncoderConfig, build_backbone, weights_digest; "
            "print(*[weights_digest(build_backbone(EncoderConfig(model=m, seed=0, **kw))[0]) for m, kw in "
            "[('vit_tiny', {'model_kwargs': {'depth': 2}}), ('resnet18', {})]]); "
            "torch.manual_seed(0); print(hash(torch.empty(4096).normal_().numpy().tobytes()))")
    runs = {}
    for capability in ("default", "avx2"):
        result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": capability},
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        runs[capability] = result.stdout.split("\n")
    assert runs["default"][0] == runs["avx2"][0]  # the same ViT and ResNet weights
    if "avx2" in Path("/proc/cpuinfo").read_text():
        assert runs["default"][1] != runs["avx2"][1], "torch's sampler should differ between the two kernels"


def test_random_weights_are_explicit_and_labelled():
    with pytest.raises(NoWeightsError, match=r"features.teacher: 'vit_tiny' has no weights.*weights.*pretrained: true.*seed: 0"):
        create_encoder(EncoderConfig(model="vit_tiny"), field="features.teacher")
    assert EncoderConfig(model="vit_small", seed=0).label == "vit_small-random-seed0"
    assert EncoderConfig(model="vit_small", seed=0, pretrained=True).label == "vit_small"  # the seed only names random weights
    assert EncoderConfig(model="vit_small", seed=0).weights_source() == "random (seed 0)"
    assert EncoderConfig(model="vit_small", weights="/w.safetensors").weights_source() == "local file /w.safetensors"
    # a student without weights or seed starts from the stage's seed (distill.seed)
    student = EncoderConfig(model="vit_tiny", model_kwargs={"depth": 1})
    a, _, _ = build_backbone(student, default_seed=5)
    b, _, _ = build_backbone(student.model_copy(update={"seed": 5}))
    assert weights_digest(a) == weights_digest(b)


def test_distilled_student_initialisation_is_seeded_from_the_config():
    from distill.config import DistillConfig
    from distill.model import build_student

    cfg = DistillConfig.model_validate({"student": {"model": "vit_tiny", "input_size": 32,
                                                    "model_kwargs": {"img_size": 32, "depth": 1}}, "seed": 2})
    torch.manual_seed(0)
    first, _ = build_student(cfg, 64)
    torch.manual_seed(99)
    second, _ = build_student(cfg, 64)
    assert weights_digest(first) == weights_digest(second)  # backbone and projector alike
    third, _ = build_student(cfg.model_copy(update={"seed": 3}), 64)
    assert weights_digest(third) != weights_digest(first)


def _features_fingerprint(cfg: RunConfig, csv_path: Path, tmp_path: Path) -> str:
    tasks = build_plan(STAGES, read_manifest(csv_path), cfg, RunPaths(tmp_path / "plan"))
    return next(t.fingerprint for t in tasks.values() if t.stage == "features")


def test_fingerprints_follow_the_seed_and_the_weights_file_content(cohort, tmp_path):
    csv_path = tmp_path / "slides.csv"
    csv_path.write_text(f"slide_path,slide_id\n{cohort / 'demo_002.tif'},s1\n")
    base = RunConfig.model_validate(RUN_CONFIG)
    seeded = _features_fingerprint(base, csv_path, tmp_path)
    reseeded = base.model_copy(deep=True)
    reseeded.features.teacher.seed = 1
    assert _features_fingerprint(reseeded, csv_path, tmp_path) != seeded
    assert _features_fingerprint(base, csv_path, tmp_path) == seeded

    weights = tmp_path / "teacher.safetensors"
    weights.write_bytes(b"A" * 64)
    with_file = base.model_copy(deep=True)
    with_file.features.teacher.weights = weights
    first = _features_fingerprint(with_file, csv_path, tmp_path)
    weights.write_bytes(b"B" * 64)  # other weights, same size and path
    os.utime(weights, (1e9, 1e9))
    replaced = _features_fingerprint(with_file, csv_path, tmp_path)
    assert replaced != first
    os.utime(weights, (2e9, 2e9))  # touched (or copied back): same content, same fingerprint
    assert _features_fingerprint(with_file, csv_path, tmp_path) == replaced


def test_no_weights_stops_a_run_before_any_task(cohort, tmp_path):
    csv_path = tmp_path / "slides.csv"
    csv_path.write_text(f"slide_path,slide_id\n{cohort / 'demo_002.tif'},s1\n")
    out = tmp_path / "out"
    result = subprocess.run([*CLI, "run", str(csv_path), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "features.teacher: 'vit_base' has no weights" in message
    assert "pretrained: true" in message and "seed: 0" in message and ".weights:" in message
    assert not (out / "state").exists() and not (out / "tissue").exists()  # nothing ran, nothing was written

    default = RunConfig()
    check_encoders(default, {"tissue", "tiles", "qc"})  # stages that build no encoder need no weights
    with pytest.raises(NoWeightsError):
        check_encoders(default, {"tissue", "tiles", "features"})
    missing = default.model_copy(deep=True)
    missing.features.teacher.weights = tmp_path / "nowhere.safetensors"
    with pytest.raises(WeightsError, match="features.teacher.weights: .*nowhere.safetensors: file not found"):
        check_encoders(missing, {"features"})


def _run_features(cohort: Path, tmp_path: Path, name: str, n_ids: int = 4) -> Path:
    """One slide under ``n_ids`` ids, tissue → features on a local cluster of two worker processes."""
    folder = tmp_path / name
    folder.mkdir()
    rows = "".join(f"{cohort / 'demo_002.tif'},s{i}\n" for i in range(1, n_ids + 1))
    (folder / "slides.csv").write_text("slide_path,slide_id\n" + rows)
    (folder / "run.yaml").write_text(yaml.safe_dump(RUN_CONFIG))
    out = folder / "out"
    result = subprocess.run([*CLI, "run", str(folder / "slides.csv"), "--config", str(folder / "run.yaml"),
                             "--out", str(out), "--until", "features", "--workers", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def two_runs(cohort, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("determinism")
    return _run_features(cohort, tmp, "first"), _run_features(cohort, tmp, "second")


LABEL = "vit_tiny-random-seed0"


def test_every_worker_and_every_run_computes_the_same_features(two_runs):
    first, second = two_runs
    pids = {json.loads((first / "state" / "features" / f"s{i}.json").read_text())["pid"] for i in range(1, 5)}
    assert len(pids) >= 2, "the four slides should have been spread over both workers"
    reference = open_store(first, LABEL, "s1")
    assert len(reference) > 10
    raw = np.asarray(reference.features[:])
    assert reference.attrs["weights"] == "random (seed 0)" and len(reference.attrs["weights_sha256"]) == 64
    for run in (first, second):
        for i in range(1, 5):
            store = open_store(run, LABEL, f"s{i}")
            assert np.asarray(store.features[:]).tobytes() == raw.tobytes(), (run.name, i)  # byte for byte
            assert store.attrs["weights_sha256"] == reference.attrs["weights_sha256"]
    states = [json.loads((run / "state" / "features" / "s1.json").read_text()) for run in two_runs]
    assert states[0]["fingerprint"] == states[1]["fingerprint"]
    # the precision is recorded; torch runs on the one core each of the two workers owns
    assert reference.attrs["precision"] == states[0]["meta"]["precision"] == "fp32"
    assert {json.loads((first / "state" / "features" / f"s{i}.json").read_text())["torch_threads"] for i in range(1, 5)} == {1}


def test_a_one_slide_run_gives_its_model_task_every_core(cohort, tmp_path):
    out = _run_features(cohort, tmp_path, "one", n_ids=1)
    state = json.loads((out / "state" / "features" / "s1.json").read_text())
    assert state["torch_threads"] == machine_cores()
    assert json.loads((out / "state" / "tissue" / "s1.json").read_text())["torch_threads"] is None  # no torch there


def test_heatmap_overlap_pass_and_fpt_rebuild_the_teacher_that_made_the_stored_features(two_runs):
    from features.extract import TileDataset, check_same_encoder
    from pipelines.config import load_config
    from pipelines.stages.heatmaps import _encoder, embed
    from pipelines.stages.mil import fpt_teacher
    from pipelines.stages.tiles import load_tiles

    out = two_runs[0]
    paths = RunPaths(out)
    cfg = load_config(paths.config)
    entry = read_manifest(paths.manifest)[0]
    store = open_store(out, LABEL, entry.slide_id)
    stored, coords = store.load(np.float32)
    meta = json.loads(paths.tissue_meta(entry.slide_id).read_text())
    plan = load_tiles(paths, entry.slide_id).plan

    overlap_encoder = _encoder(cfg, paths, "teacher", None, None)  # what the heatmaps' second pass uses, in this process
    again = embed(entry, cfg, meta, overlap_encoder, coords, plan)
    np.testing.assert_allclose(again, stored, atol=2e-3, rtol=2e-3)  # equal up to the store's float16

    big = fpt_teacher(paths, cfg, entry.slide_id)  # what End2end's FPT row fine-tunes
    assert big.digest == store.attrs["weights_sha256"]
    tiles = torch.stack([TileDataset(meta["slide_path"], coords, plan)[i][0] for i in range(16)])
    np.testing.assert_allclose(big(tiles).numpy(), stored[:16], atol=2e-3, rtol=2e-3)

    other = create_encoder(cfg.features.teacher.model_copy(update={"seed": 1}))
    with pytest.raises(ValueError, match="came from other weights"):
        check_same_encoder(other, store.attrs, "features/x.zarr")


def test_moving_the_weights_or_changing_device_reruns_nothing(cohort, tmp_path):
    """Same weights content at another path, on another device: every task keeps its fingerprint; new content
    changes the features (and, through them, everything after) but not tissue or tiles."""
    csv_path = tmp_path / "slides.csv"
    csv_path.write_text(f"slide_path,slide_id\n{cohort / 'demo_002.tif'},s1\n")

    def fingerprints(weights: Path, device: str) -> dict[str, str]:
        cfg = RunConfig.model_validate(RUN_CONFIG)
        cfg.features.teacher = cfg.features.teacher.model_copy(update={"weights": weights, "device": device, "seed": None})
        tasks = build_plan(STAGES, read_manifest(csv_path), cfg, RunPaths(tmp_path / "plan"))
        return {t.stage: t.fingerprint for t in tasks.values() if t.fingerprint}

    first = tmp_path / "a" / "pytorch_model.bin"
    first.parent.mkdir()
    first.write_bytes(b"W" * 128)
    moved = tmp_path / "scratch" / "copy.bin"
    moved.parent.mkdir()
    moved.write_bytes(first.read_bytes())
    before = fingerprints(first, "cuda:0")
    assert {"tissue", "tiles", "features"} <= set(before)
    assert fingerprints(moved, "cuda:1") == before
    moved.write_bytes(b"V" * 128)
    after = fingerprints(moved, "cuda:1")
    assert after["features"] != before["features"]
    assert (after["tissue"], after["tiles"]) == (before["tissue"], before["tiles"])


def test_a_zoo_teacher_records_its_licence_and_warns_about_the_tile_scale(cohort, tmp_path):
    """UNI (reduced, random weights) on 1 µm/px tiles: trained at 0.5, so every slide's features task warns; the
    store records the model, its version and its non-commercial licence, and its own preprocessing."""
    cfg = {**RUN_CONFIG, "features": {"teacher": {"model": "uni", "seed": 0, "precision": "fp32", "input_size": 112,
                                                  "model_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}},
                                      "num_workers": 0, "batch_size": 16}}
    (tmp_path / "slides.csv").write_text(f"slide_path,slide_id\n{cohort / 'demo_002.tif'},s1\n")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    result = subprocess.run([*CLI, "run", str(tmp_path / "slides.csv"), "--config", str(tmp_path / "run.yaml"),
                             "--out", str(tmp_path / "out"), "--until", "features", "--workers", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    state = json.loads((tmp_path / "out" / "state" / "features" / "s1.json").read_text())
    assert any("trained on 0.5 µm/px tiles" in w for w in state["warnings"]), state["warnings"]
    attrs = open_store(tmp_path / "out", "uni-random-seed0", "s1").attrs
    assert attrs["provenance"]["licence"] == "CC-BY-NC-ND-4.0" and attrs["provenance"]["non_commercial"]
    assert (attrs["input_size"], attrs["interpolation"], attrs["mean"]) == (112, "bilinear", [0.485, 0.456, 0.406])
