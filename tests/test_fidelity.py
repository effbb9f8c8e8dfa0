"""Fidelity where it matters: per-cluster metrics that see a rare tissue the average hides, stratified held-out
tiles, hard-example draws, the card's verdict, End2end's attended tiles and LoRA's head rate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.config import DistillConfig
from distill.fidelity import TileClusters, fidelity, stratified_sample, subset_fidelity
from distill.sampling import TileErrors, epoch_draws
from distill.trainer import verdict


def _two_tissues(n_common=950, n_rare=50, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    common = rng.normal(0, 1, (n_common, dim)) + 3 * np.sin(np.arange(dim))
    rare = rng.normal(0, 1, (n_rare, dim)) + 3 * np.cos(np.arange(dim))
    return np.concatenate([common, rare]), np.r_[np.zeros(n_common, bool), np.ones(n_rare, bool)]


def test_a_student_that_collapses_the_rare_tissue_looks_fine_on_average_but_not_per_cluster():
    target, rare = _two_tissues()
    rng = np.random.default_rng(1)
    prediction = target + 0.3 * rng.normal(size=target.shape)
    prediction[rare] = target[~rare].mean(axis=0) + 0.3 * rng.normal(size=(rare.sum(), target.shape[1]))  # rare → common
    clusters, labels = TileClusters.fit(target, 4, seed=0)
    np.testing.assert_array_equal(clusters.assign(target), labels)
    metrics = fidelity(prediction, target, labels)
    assert metrics["cosine"] > 0.9 and metrics["r2"] > 0.5  # the average hides it
    assert metrics["worst_cluster_r2"] < 0  # the rare cluster's error exceeds the teacher's whole spread
    rare_cluster = np.bincount(labels[rare]).argmax()
    assert metrics["worst_cluster"] == rare_cluster
    assert metrics["balanced_r2"] < metrics["r2"]
    # the overall R² is the tile-weighted mean of the cluster R²s
    sizes = {c: v["n"] for c, v in metrics["clusters"].items()}
    weighted = sum(sizes[c] * v["r2"] for c, v in metrics["clusters"].items()) / len(target)
    assert weighted == pytest.approx(metrics["r2"], abs=1e-4)
    assert subset_fidelity(prediction, target, rare)["r2"] < 0 < subset_fidelity(prediction, target, ~rare)["r2"]
    faithful = fidelity(target + 0.05 * rng.normal(size=target.shape), target, labels)
    assert faithful["worst_cluster_r2"] > 0.9


def test_stratified_held_out_tiles_score_the_rare_cluster_and_weights_restore_the_mix():
    labels = np.r_[np.zeros(900, int), np.ones(80, int), np.full(20, 2)]
    keep, weights = stratified_sample(labels, 150, seed=0)
    assert len(keep) == 150 and np.all(np.diff(keep) > 0)
    assert list(np.bincount(labels[keep])) == [65, 65, 20]  # the rare cluster gives all its tiles
    np.testing.assert_allclose([weights[labels[keep] == c].sum() for c in range(3)], [900, 80, 20])
    np.testing.assert_array_equal(keep, stratified_sample(labels, 150, seed=0)[0])  # seeded
    rng = np.random.default_rng(0)
    target = rng.normal(size=(1000, 8)) + labels[:, None]
    prediction = target + rng.normal(size=target.shape) * (0.2 + 0.6 * (labels[:, None] == 2))
    full, sampled = fidelity(prediction, target, labels), fidelity(prediction[keep], target[keep], labels[keep], weights)
    assert sampled["r2"] == pytest.approx(full["r2"], abs=0.03)
    assert sampled["cosine"] == pytest.approx(full["cosine"], abs=0.01)


def test_hard_example_draws_favour_the_tiles_with_high_loss():
    errors = TileErrors(100)
    rng = np.random.default_rng(0)
    uniform = epoch_draws(100, 10_000, None, errors, 1.0, rng)  # nothing seen yet: every tile typical
    assert np.bincount(uniform, minlength=100).min() > 50
    errors.update(np.arange(100), np.r_[np.full(90, 0.1), np.full(10, 0.5)])
    draws = epoch_draws(100, 10_000, None, errors, 1.0, np.random.default_rng(0))
    counts = np.bincount(draws, minlength=100)
    assert counts[90:].mean() > 4 * counts[:90].mean()
    capped = np.bincount(epoch_draws(100, 10_000, None, errors, 4.0, np.random.default_rng(0)), minlength=100)
    assert counts[:90].min() > 0 and capped[:90].sum() > 0  # clipped: no tile starves
    assert np.array_equal(epoch_draws(100, 50, None, errors, 0.0, np.random.default_rng(3)),
                          np.random.default_rng(3).integers(0, 100, 50))  # off: the old uniform draws
    errors.update(np.array([0]), np.array([np.nan]))  # a diverged tile counts as the hardest, not as unseen
    assert errors.errors[0] == 0.5 and errors.factors(1.0)[0] == errors.factors(1.0)[95]


def test_the_card_verdict_says_whether_the_rare_tissue_was_learned_and_what_to_do():
    cfg = DistillConfig(rare_r2_target=0.8)
    good = verdict({"worst_cluster_r2": 0.86, "worst_cluster": 3}, cfg, 20, 19)
    assert good["faithful"] is True and "0.860" in good["message"]
    short = verdict({"worst_cluster_r2": 0.41, "worst_cluster": 7}, cfg, 5, 5)  # best at the ceiling: still improving
    assert short["faithful"] is False and "raise distill.epochs" in short["message"] and "#7" in short["message"]
    stuck = verdict({"worst_cluster_r2": 0.41, "worst_cluster": 7}, cfg, 20, 9)
    assert "stopped improving (best epoch 9 of 20)" in stuck["message"] and "larger student" in stuck["message"]
    judged = verdict({"worst_cluster_r2": 0.9, "worst_cluster": 2}, cfg, 20, 20, [2, 5])
    assert "#2, #5 scored on tiles held out from training slides" in judged["message"]
    assert verdict({"cosine": 0.9}, cfg, 5, 5)["faithful"] is None


def test_end2end_re_reads_the_bags_most_attended_tiles():
    from mil.clam import CLAM
    from mil.end2end import pick_rows

    torch.manual_seed(0)
    clam = CLAM(16, 2, dropout=0.0)
    bag = torch.randn(500, 16)
    with torch.no_grad():
        attention = clam.embed(bag)[1][0]
    top8 = set(torch.topk(attention, 8).indices.tolist())
    rows = pick_rows(clam, bag, 1, 16, 0.5, np.random.default_rng(0))
    assert len(rows) == 16 == len(set(rows.tolist())) and top8 <= set(rows.tolist())
    assert clam.training  # left as it was
    random_only = pick_rows(clam, bag, 1, 16, 0.0, np.random.default_rng(0))
    assert len(top8 & set(random_only.tolist())) < 8
    assert len(pick_rows(clam, bag[:5], 1, 16, 0.5, np.random.default_rng(0))) == 5  # a bag smaller than k


def test_lora_trains_the_distilled_head_slower_than_its_adapters():
    from timm import create_model

    from distill.student import DistilledStudent
    from distill.transscan import StudentBackbone, create_projector
    from mil.finetune import create_finetune

    backbone = StudentBackbone(create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0))
    student = DistilledStudent(backbone, create_projector("linear", backbone.channels, 32), 32)
    strategy = create_finetune("lora")
    student = strategy.prepare(student)
    groups = strategy.param_groups(student, 1e-3)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-5)]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in strategy.trainable(student))
    assert all(".lora_" in n for n, p in student.named_parameters() if any(p is q for q in groups[0]["params"]))


def test_a_rare_tissue_absent_from_the_held_out_slides_is_held_out_from_training_tiles():
    from distill.pools import RARE_HELD_OUT_TILES, top_up_rare_clusters

    train = np.r_[np.zeros(500, int), np.ones(40, int), np.full(10, 2)]  # cluster 1: a focus on training slides only
    val = np.r_[np.zeros(60, int), np.full(3, 2)]
    moved = top_up_rare_clusters(train, val, seed=0)
    counts = np.bincount(train[moved], minlength=3)
    assert counts[0] == 0  # enough held-out tiles already
    assert counts[1] == RARE_HELD_OUT_TILES  # 8 of its 40
    assert counts[2] == 2  # a small cluster gives at most a fifth of its tiles
    np.testing.assert_array_equal(moved, top_up_rare_clusters(train, val, seed=0))


def test_the_live_display_shows_the_distillations_held_out_scores():
    from pipelines.live import progress_text

    assert progress_text({"done": 3, "total": 20, "unit": "epoch", "val_cosine": 0.95, "worst_cluster_r2": 0.7}) == \
        " (epoch 3/20, held-out cosine 0.950, worst cluster R² 0.700)"
    assert progress_text({"done": 3, "total": 20, "unit": "epoch", "worst_cluster_r2": None}) == " (epoch 3/20)"


def test_reuse_agreement_compares_the_teacher_clams_on_teacher_and_student_features_slide_by_slide():
    from pipelines.stages.results import reuse_agreement, student_fidelity_lines

    def row(strategy, slide, p_tumor):
        return {"strategy": strategy, "fold": 0, "slide_id": slide, "p_normal": 1 - p_tumor, "p_tumor": p_tumor,
                "prediction": "tumor" if p_tumor >= 0.5 else "normal"}

    predictions = [row("teacher", "a", 0.9), row("reuse", "a", 0.8), row("teacher", "b", 0.1), row("reuse", "b", 0.15),
                   row("teacher", "c", 0.95), row("reuse", "c", 0.3), row("retrain", "c", 0.9)]
    agreement = reuse_agreement(predictions, ["normal", "tumor"])
    assert agreement["n_slides"] == 3 and agreement["n_same_class"] == 2
    assert agreement["worst_slide"] == "c" and agreement["worst_abs_diff"] == pytest.approx(0.65)
    assert agreement["mean_abs_diff"] == pytest.approx((0.1 + 0.05 + 0.65) / 3, abs=1e-4)
    (line,) = student_fidelity_lines(None, agreement)
    assert "2 of 3" in line and "WARNING: 1 slide(s) change class" in line
    assert reuse_agreement([row("teacher", "a", 0.9)], ["normal", "tumor"]) is None  # no Reuse row


def test_how_tiles_are_cached_or_loaded_does_not_rerun_the_distillation():
    from pipelines.config import RunConfig
    from pipelines.engine.plan import config_values
    from pipelines.stages.table import STAGES

    values = lambda distill: config_values(RunConfig.model_validate({"distill": distill}), STAGES["distill"].config)  # noqa: E731
    assert values({}) == values({"tile_cache_mb": 0, "num_workers": 1})
    assert values({}) != values({"hard_mining": 1.0}) and values({}) != values({"student": {"model": "resnet18"}})
