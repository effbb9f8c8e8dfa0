"""The configured device reaches every model stage: encoders, CLAM training, End2end, heatmaps' CLAM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import features.encoders as encoders
from features.encoders import EncoderConfig, create_encoder, pick_device
from mil.clam import CLAM
from mil.train import MILConfig, model_device, predict, train_clam


@pytest.fixture()
def requested(monkeypatch):
    """Every device string asked of pick_device."""
    calls: list[str] = []

    def recording(device: str):
        calls.append(device)
        return pick_device(device)

    monkeypatch.setattr(encoders, "pick_device", recording)
    return calls


def test_auto_is_cuda_only_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto").type == "cuda"
    assert pick_device("cpu").type == "cpu" and pick_device("cuda:1") == torch.device("cuda", 1)


def _bags():
    rng = np.random.default_rng(0)
    return {f"s{i}": rng.normal(i % 2, 1, (20, 16)).astype(np.float32) for i in range(6)}, {f"s{i}": i % 2 for i in range(6)}


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_clam_and_end2end_train_on_the_configured_device(requested, device):
    from mil.end2end import embed_bag, train_end2end

    bags, labels = _bags()
    cfg = MILConfig(device=device, max_epochs=2, min_epochs=0, k_sample=2)
    model, _ = train_clam(cfg, bags.__getitem__, ["s0", "s1", "s2", "s3"], ["s4", "s5"], labels, 16, 2, seed=0)
    assert requested == [device] and model_device(model) == pick_device(device)
    assert predict(model, bags.__getitem__, ["s4"]).shape == (1, 2)

    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16))
    spec = {"size": 8, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    tiles = lambda slide_id, rows: np.full((len(rows), 8, 8, 3), 128, np.uint8)  # noqa: E731
    tuned, clam, _ = train_end2end(cfg, student, spec, CLAM(16, 2, k_sample=2), bags.__getitem__, tiles,
                                   ["s0", "s1", "s2", "s3"], labels, k_tiles=4, epochs=1, student_lr=1e-3)
    assert requested == [device, device]
    assert model_device(tuned) == model_device(clam) == pick_device(device)
    assert embed_bag(tuned, spec, tiles, "s0", 20).shape == (20, 16)


def test_encoders_run_where_their_config_says(requested):
    encoder = create_encoder(EncoderConfig(model="vit_tiny", seed=0, device="cpu", input_size=32,
                                           model_kwargs={"img_size": 32, "depth": 1}))
    assert requested == ["cpu"] and encoder.device.type == "cpu"
    assert next(encoder.model.parameters()).device.type == "cpu"
    assert encoder(torch.zeros(2, 32, 32, 3, dtype=torch.uint8)).shape == (2, 192)


def test_local_cluster_gives_each_gpu_a_worker_with_a_gpu_resource(monkeypatch):
    from pipelines.config import RunConfig
    from pipelines.engine.cluster import local_gpus, local_worker_specs

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    cfg = RunConfig.model_validate({"runner": {"gpus": 2}})
    gpus = local_gpus(cfg)
    assert gpus == ["2", "5"]  # the parent's visible devices, one per worker
    specs = local_worker_specs(cfg, n_tasks=10, gpus=gpus)
    assert specs["gpu-1"]["options"]["env"] == {"CUDA_VISIBLE_DEVICES": "5"}
    assert specs["gpu-0"]["options"]["resources"] == {"GPU": 1} and specs["gpu-0"]["options"]["nthreads"] == 1
    assert all(s["options"]["resources"] == {"CPU": 1} for name, s in specs.items() if name.startswith("cpu-"))
    assert "resources" not in local_worker_specs(cfg, 10, [])["cpu-0"]["options"]  # CPU-only: no resources at all
    assert all(s["options"]["host"] == "127.0.0.1" for s in specs.values())
    assert local_gpus(RunConfig.model_validate({"runner": {"gpus": 0}})) == []


def test_model_tasks_run_on_the_gpu_worker_and_slide_tasks_on_cpu_workers(cohort, tmp_path):
    """A GPU worker (here without a real GPU: its tasks fall back to the CPU) takes every model task."""
    import json
    import subprocess
    import sys

    import yaml

    (tmp_path / "slides.csv").write_text(f"slide_path,slide_id\n{cohort / 'demo_002.tif'},a\n{cohort / 'demo_000.svs'},b\n")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "tissue": {"preset": "bwh_biopsy", "area_reference_mpp": 0.25}, "tiling": {"target_mpp": 1.0, "patch_size": 128},
        "features": {"teacher": {"model": "vit_tiny", "seed": 0, "input_size": 64, "model_kwargs": {"img_size": 64, "depth": 2}},
                     "num_workers": 0},
        "runner": {"gpus": 1, "n_workers": 1}}))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(tmp_path / "slides.csv"), "--config",
                             str(tmp_path / "run.yaml"), "--out", str(out), "--until", "features"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    state = lambda stage, key: json.loads((out / "state" / stage / f"{key}.json").read_text())  # noqa: E731
    assert {state("features", k)["worker"] for k in "ab"} == {"gpu-0"}
    assert {state("tissue", k)["worker"] for k in "ab"} | {state("tiles", k)["worker"] for k in "ab"} == {"cpu-0"}
