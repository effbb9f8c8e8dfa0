"""Distillation (EFCM stage 1): TransScan, the FPD loss, a real short distillation, kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from distill.config import DistillConfig
from distill.model import build_student, load_student
from distill.student import FPDLoss
from distill.trainer import SlideTiles, train
from distill.transscan import SelectiveKernelScan, TransScan, create_projector
from features.encoders import EncoderConfig, create_encoder
from features.store import open_store
from pipelines.engine.cluster import machine_cores
from wsi.slide import open_slide
from wsi.tiling import TilingConfig, read_tile, tile_grid
from wsi.tissue import TissueConfig, mask_slide

CLI = [sys.executable, "-m", "pipelines.cli"]


def test_transscan_shapes_and_gradient_flow():
    torch.manual_seed(0)
    projector = TransScan(96, 384, width=64, heads=4)
    grid = torch.randn(3, 96, 7, 7, requires_grad=True)
    out = projector(grid)
    assert out.shape == (3, 384)
    out.pow(2).mean().backward()
    assert grid.grad is not None and grid.grad.abs().sum() > 0
    for name, p in projector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    weights = projector.scan.last_weights  # (B, branches, C): a softmax over receptive fields per channel
    assert weights.shape == (3, 2, 64)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3, 64))
    assert SelectiveKernelScan(32, dilations=(1, 2, 3))(torch.randn(2, 32, 5, 5)).shape == (2, 32, 5, 5)
    for kind in ("linear", "mlp"):
        assert create_projector(kind, 96, 384)(torch.randn(2, 96, 4, 4)).shape == (2, 384)
    with pytest.raises(ValueError, match="unknown projector"):
        create_projector("conv", 96, 384)


def test_fpd_loss_is_zero_for_identical_inputs_and_positive_otherwise():
    teacher = torch.randn(8, 64) * 3 + 1
    loss = FPDLoss(cosine_weight=0.5)
    whitened = torch.nn.functional.layer_norm(teacher, (64,))
    assert loss(whitened, teacher).item() == pytest.approx(0.0, abs=1e-5)
    assert loss(whitened + 0.1 * torch.randn(8, 64), teacher).item() > 1e-4
    raw = FPDLoss(whiten=False)
    assert raw(teacher, teacher).item() == 0.0 and raw(teacher * 1.1, teacher).item() > 0


def test_stats_head_dewhitens_each_tile_with_its_own_mean_and_scale():
    from timm import create_model

    from distill.student import DistilledStudent, feature_stats
    from distill.transscan import StudentBackbone, create_projector

    torch.manual_seed(0)
    backbone = StudentBackbone(create_model("resnet18", pretrained=False, num_classes=0))
    student = DistilledStudent(backbone, create_projector("linear", backbone.channels, 64), 64, stats_head=True).eval()
    teacher = torch.randn(16, 64) * torch.linspace(0.5, 2.0, 16)[:, None] + torch.linspace(-1, 1, 16)[:, None]
    student.set_target_stats(teacher)
    x = torch.randn(4, 3, 64, 64)
    whitened, stats = student.outputs(x)
    # zero-initialised head: every tile starts at the pool's average mean and std
    torch.testing.assert_close(stats, torch.zeros(4, 2))
    pooled = feature_stats(teacher).mean(dim=0)
    torch.testing.assert_close(student(x), whitened * pooled[1].exp() + pooled[0])
    # a head that predicts a tile's own stats gives back that tile's teacher vector from its whitened form
    loss = FPDLoss()
    wanted = (feature_stats(teacher) - student.stats_center) / student.stats_scale
    exact = torch.nn.functional.layer_norm(teacher, (64,))
    assert loss(exact, teacher, wanted, student).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(exact, teacher, torch.zeros_like(wanted), student).item() > 1e-3
    back = (exact * (wanted * student.stats_scale + student.stats_center)[:, 1:].exp()
            + (wanted * student.stats_scale + student.stats_center)[:, :1])
    torch.testing.assert_close(back, teacher, atol=1e-3, rtol=1e-3)
    # without the head the pool's averages stand in (the fallback)
    plain = DistilledStudent(backbone, create_projector("linear", backbone.channels, 64), 64)
    plain.set_target_stats(teacher)
    assert plain.stats_head is None and plain.target_std.item() == pytest.approx(feature_stats(teacher)[:, 1].exp().mean().item(), rel=1e-5)


def test_cluster_balanced_draws_favour_rare_tissue_without_labels():
    from distill.fidelity import TileClusters
    from distill.pools import draw_weights

    rng = np.random.default_rng(0)
    common = rng.normal(0, 1, (950, 32)) + 3 * np.sin(np.arange(32))  # one abundant kind of tissue
    rare = rng.normal(0, 1, (50, 32)) + 3 * np.cos(np.arange(32))  # a small focus of another
    targets = np.concatenate([common, rare]).astype(np.float16)
    cfg = DistillConfig(balance_clusters=8, seed=3)
    _, labels = TileClusters.fit(targets, cfg.balance_clusters, cfg.seed)
    weights = draw_weights(labels, cfg)
    assert weights.shape == (1000,) and weights.sum() == pytest.approx(1.0)
    assert weights[950:].min() > weights[:950].max()  # each tile of the focus is drawn more often than any other
    assert 1.5 * 0.05 < weights[950:].sum() < 0.5  # well above its 5 % share of the tiles, and no takeover
    np.testing.assert_array_equal(labels, TileClusters.fit(targets, cfg.balance_clusters, cfg.seed)[1])  # seeded
    assert draw_weights(labels, cfg.model_copy(update={"balance": "none"})) is None


def test_a_student_card_from_before_the_head_and_the_input_reads_still_loads(tmp_path):
    """Cards written before distill.dewhiten_head, read_at_input and balance: the student has no stats head
    and reads the tiling's tiles, as it was trained."""
    from features.store import save_safetensors

    cfg = DistillConfig(student={"model": "resnet18", "input_size": 64}, projector="linear", dewhiten_head=False)
    student, data_cfg = build_student(cfg, 32)
    save_safetensors(student.state_dict(), tmp_path / "student.safetensors")
    old = {k: v for k, v in cfg.model_dump(mode="json").items()
           if k not in ("dewhiten_head", "stats_weight", "read_at_input", "balance", "balance_clusters")}
    card = {"config": old, "teacher_dim": 32, "student": cfg.student.model_dump(mode="json"), "input_size": 64,
            "mean": list(data_cfg["mean"]), "std": list(data_cfg["std"])}
    (tmp_path / "student.json").write_text(json.dumps(card))
    encoder, _ = load_student(tmp_path, device="cpu")
    assert encoder.model.stats_head is None and not encoder.read_at_input
    tiles = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.inference_mode():
        torch.testing.assert_close(encoder(tiles), student.eval()(encoder.preprocess(tiles)))


@pytest.fixture(scope="module")
def teacher_tiles(cohort):
    """Tiles of the four demo slides with features of a ViT-S/16 teacher (random weights, fixed seed)."""
    torch.manual_seed(0)
    teacher = create_encoder(EncoderConfig(model="vit_small", seed=0))
    slides = []
    for name in ("demo_000.svs", "demo_001.svs", "demo_002.tif", "demo_003.svs"):
        with open_slide(cohort / name) as slide:
            tissue, _ = mask_slide(slide, TissueConfig(preset="bwh_biopsy", area_reference_mpp=0.25))
            grid = tile_grid(slide.dimensions, slide.mpp, slide.level_downsamples, tissue, TilingConfig(target_mpp=1.0, patch_size=128))
            tiles = torch.from_numpy(np.stack([read_tile(slide, x, y, grid.plan) for x, y in grid.coords]))
            feats = torch.cat([teacher(tiles[i:i + 64]) for i in range(0, len(tiles), 64)]).numpy().astype(np.float16)
            slides.append(SlideTiles(name.split(".")[0], cohort / name, slide.mpp, grid.plan, grid.coords, feats))
    return slides, teacher.dim


def test_short_distillation_raises_held_out_similarity_and_round_trips(teacher_tiles, tmp_path):
    slides, dim = teacher_tiles
    cfg = DistillConfig(student={"model": "resnet18", "input_size": 96}, projector="transscan", projector_width=64,
                        epochs=10, tiles_per_epoch=256, batch_size=32, lr=1e-3, warmup_epochs=0.5, num_workers=0,
                        val_fraction=0.25, seed=1, patience=20)
    card = train(slides, dim, cfg, tmp_path / "student", fingerprint="fp")
    initial, best = card["metrics"]["initial"], card["metrics"]["best"]
    assert len(card["data"]["val_slides"]) == 1  # one of four slides held out
    # measured (seed 1): held-out cosine −0.08 → 0.94 and R² −3.96 → 0.52 after 10 epochs of 256 tiles
    assert best["cosine"] >= 0.9 and best["cosine"] > initial["cosine"] + 0.5
    assert best["r2"] >= 0.35 and best["r2"] > initial["r2"] + 1.0
    assert card["params"]["projector"] < card["params"]["backbone"]

    encoder, loaded_card = load_student(tmp_path / "student")
    assert encoder.dim == dim and loaded_card["fingerprint"] == "fp"
    model, _ = build_student(cfg, dim)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(tmp_path / "student" / "student.safetensors")))
    model.eval()
    tiles = torch.randint(0, 255, (4, 128, 128, 3), dtype=torch.uint8)
    with torch.inference_mode():
        direct = model(encoder.preprocess(tiles))
    torch.testing.assert_close(encoder(tiles), direct)


def _run_until_distill(cohort, tmp_path, epochs: int) -> tuple[list[str], str]:
    (tmp_path / "slides.csv").write_text("slide_path,slide_id\n" + "".join(
        f"{cohort / n},{n.split('.')[0]}\n" for n in ("demo_000.svs", "demo_001.svs", "demo_002.tif", "demo_003.svs")))
    (tmp_path / "run.yaml").write_text(
        "tissue: {preset: bwh_biopsy, area_reference_mpp: 0.25}\n"
        "tiling: {target_mpp: 1.0, patch_size: 128}\n"
        "features: {teacher: {model: resnet18, input_size: 96, seed: 0}, num_workers: 0}\n"
        f"distill: {{student: {{model: resnet18, input_size: 64}}, projector: linear, epochs: {epochs}, "
        "tiles_per_epoch: 128, batch_size: 32, num_workers: 0, precision: fp32}\n")
    cmd = [*CLI, "run", str(tmp_path / "slides.csv"), "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out"),
           "--until", "student_features"]
    return cmd, str(tmp_path / "out")


def test_killed_distillation_resumes_from_its_checkpoint_and_student_features_follow(cohort, tmp_path):
    cmd, out = _run_until_distill(cohort, tmp_path, epochs=8)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = tmp_path / "out" / "models" / "student" / "checkpoint" / "state.pt"
    deadline = time.time() + 300
    while time.time() < deadline and not state.exists():
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = torch.load(state, weights_only=True)
    epochs_before = json.loads(saved["progress"])["epoch"]
    assert 1 <= epochs_before < 8
    # one file per epoch: its weights, the best epoch's and the optimiser can never come from different epochs
    assert {"model", "best_model", "optimizer", "scheduler"} <= set(saved)
    assert not list(state.parent.glob("*.safetensors"))

    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    card = json.loads((tmp_path / "out" / "models" / "student" / "student.json").read_text())
    assert card["metrics"]["resumed_from_epoch"] >= epochs_before
    assert [h["epoch"] for h in card["history"]][:2] == [0, 1]  # the epochs before the kill are kept
    assert card["metrics"]["epochs_run"] > epochs_before
    assert card["metrics"]["best"]["cosine"] > card["metrics"]["initial"]["cosine"]
    store = open_store(tmp_path / "out", "student_resnet18", "demo_001")
    teacher = open_store(tmp_path / "out", "resnet18-random-seed0", "demo_001")
    assert store.features.shape == teacher.features.shape  # teacher-space features, same tiles
    np.testing.assert_array_equal(store.coords, teacher.coords)
    assert store.attrs["distilled_from"] == "resnet18-random-seed0"
    status = subprocess.run([*CLI, "status", out, "--json"], capture_output=True, text=True)
    report = json.loads(status.stdout)
    assert report["cohort"]["mil"]["status"] == "pending"  # unlabelled cohort, and --until student_features
    assert report["cohort"]["distill"]["status"] == "done"
    distill_state = json.loads((tmp_path / "out" / "state" / "distill" / "_cohort.json").read_text())
    assert distill_state["torch_threads"] == machine_cores()  # a cohort stage runs alone: every core
    assert {row["student_features"]["status"] for row in report["slides"].values()} == {"done"}

    # --force distill retrains from scratch: the finished run's checkpoint has the same fingerprint, yet is not resumed
    forced = subprocess.run([*cmd[:-1], "distill", "--force", "distill"], capture_output=True, text=True)  # --until distill
    assert forced.returncode == 0, forced.stderr
    again = json.loads((tmp_path / "out" / "models" / "student" / "student.json").read_text())
    assert again["metrics"]["resumed_from_epoch"] is None
    assert [h["epoch"] for h in again["history"]] == list(range(again["metrics"]["epochs_run"] + 1))
