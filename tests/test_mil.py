"""CLAM (SB/MB) faithful parts, case-level splits, and training that learns the demo cohort's labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mil.clam import CLAM, SmoothTop1SVM
from mil.splits import csv_split, kfold_splits
from mil.train import MILConfig, metrics, predict, train_clam


@pytest.mark.parametrize("multi_branch", [False, True])
@pytest.mark.parametrize("n_patches", [3, 500])  # fewer than k_sample, and many
def test_clam_shapes_and_instance_loss(multi_branch, n_patches):
    torch.manual_seed(0)
    model = CLAM(384, 3, k_sample=8, multi_branch=multi_branch, subtyping=True)
    feats = torch.randn(n_patches, 384)
    out = model(feats, label=1)
    assert out["logits"].shape == (1, 3)
    assert out["attention"].shape == ((3 if multi_branch else 1), n_patches)
    assert out["instance_loss"].ndim == 0 and out["instance_loss"].item() > 0
    (out["logits"].sum() + out["instance_loss"]).backward()
    assert model.instance_classifiers[1].weight.grad.abs().sum() > 0  # in-class instance classifier trained
    assert model.instance_classifiers[0].weight.grad.abs().sum() > 0  # out-of-class negatives (subtyping)
    assert "instance_loss" not in model(feats)


def test_clam_dimensions_follow_the_reference():
    sb = CLAM(1024, 2, size="small")
    assert sb.fc[0].weight.shape == (512, 1024) and sb.attention.a[0].weight.shape == (256, 512)
    assert CLAM(1024, 2, size="big").attention.a[0].weight.shape == (384, 512)
    mb = CLAM(1024, 4, multi_branch=True)
    assert len(mb.classifiers) == 4 and mb.attention.c.weight.shape == (4, 256)
    no_subtype = CLAM(16, 3, subtyping=False)
    no_subtype(torch.randn(20, 16), label=0)["instance_loss"].backward()
    assert no_subtype.instance_classifiers[2].weight.grad is None  # only the true class's classifier


def test_smooth_top1_svm():
    loss = SmoothTop1SVM(alpha=1.0, tau=1.0)
    confident = loss(torch.tensor([[10.0, -10.0]]), torch.tensor([0]))
    wrong = loss(torch.tensor([[-10.0, 10.0]]), torch.tensor([0]))
    assert 0 <= confident.item() < 1e-3 and wrong.item() > 20
    even = loss(torch.zeros(1, 2), torch.tensor([1]))
    assert even.item() == pytest.approx(np.log(1 + np.e), rel=1e-5)  # τ·log(e^0 + e^α)


def test_kfold_splits_never_leak_a_case_and_stratify():
    rows = [(f"s{i}", f"case{i // 2}", "tumor" if (i // 2) % 2 else "normal") for i in range(40)]  # 2 slides per case
    splits = kfold_splits(rows, k=5, val_fraction=0.1, seed=3)
    case_of = {s: c for s, c, _ in rows}
    label_of = {s: lab for s, _, lab in rows}
    tested = []
    for split in splits:
        parts = [set(case_of[s] for s in part) for part in (split.train, split.val, split.test)]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
        assert {label_of[s] for s in split.test} == {"tumor", "normal"}
        assert split.val and set(split.train) | set(split.val) | set(split.test) == set(case_of)
        tested += split.test
    assert sorted(tested) == sorted(case_of)  # every slide tested exactly once
    with pytest.raises(ValueError, match="5 folds need between 2 and 3 cases"):
        kfold_splits(rows[:6], k=5, val_fraction=0.1, seed=0)
    with pytest.raises(ValueError, match="rarest label has 2 case"):
        kfold_splits(rows[:8], k=3, val_fraction=0.1, seed=0)


def test_csv_split_column_is_used_and_checked():
    rows = [("a", "c1", "x", "train"), ("b", "c2", "y", "train"), ("c", "c3", "x", "test"), ("d", "c4", "y", "val")]
    (split,) = csv_split(rows)
    assert split.train == ["a", "b"] and split.val == ["d"] and split.test == ["c"]
    with pytest.raises(ValueError, match="appear in both"):
        csv_split(rows + [("e", "c1", "x", "test")])


def test_training_learns_a_planted_signal_and_metrics():
    rng = np.random.default_rng(0)
    bags, labels = {}, {}
    for i in range(24):
        label = i % 2
        feats = rng.normal(0, 1, (int(rng.integers(5, 60)), 32)).astype(np.float32)
        if label:
            feats[: max(2, len(feats) // 5), :4] += 3.0  # a few "tumour" patches carry the signal
        bags[f"s{i}"], labels[f"s{i}"] = feats, label
    ids = list(bags)
    cfg = MILConfig(max_epochs=30, min_epochs=5, patience=10, lr=1e-3)
    model, history = train_clam(cfg, bags.__getitem__, ids[:16], ids[16:20], labels, 32, 2, seed=0)
    assert history[0]["epoch"] == 1 and len(history) >= 5
    probs = predict(model, bags.__getitem__, ids[20:])
    result = metrics(np.array([labels[s] for s in ids[20:]]), probs, 2)
    assert result["auc"] == 1.0 and result["acc"] >= 0.75
    assert np.isnan(metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.4, 0.6]]), 2)["auc"])
    three = metrics(np.array([0, 1, 2]), np.eye(3), 3)
    assert three["auc"] == 1.0 and three["bacc"] == 1.0


def test_end2end_updates_the_student_and_reads_only_k_tiles_per_step():
    import psutil

    from distill.config import DistillConfig
    from distill.model import build_student
    from mil.clam import CLAM
    from mil.end2end import embed_bag, train_end2end

    torch.manual_seed(0)
    student, _ = build_student(DistillConfig(student={"model": "resnet18", "input_size": 64}, projector="linear"), 32)
    clam = CLAM(32, 2)
    rng = np.random.default_rng(0)
    bags = {f"s{i}": rng.normal(0, 1, (100_000 if i == 0 else 50, 32)).astype(np.float32) for i in range(4)}
    labels = {f"s{i}": i % 2 for i in range(4)}
    requested = []

    def tiles(slide_id, rows):
        requested.append(len(rows))
        return rng.integers(0, 255, (len(rows), 64, 64, 3), dtype=np.uint8)

    before_student = {k: v.clone() for k, v in student.state_dict().items()}
    before_clam = {k: v.clone() for k, v in clam.state_dict().items()}
    rss = psutil.Process().memory_info().rss
    tuned, tuned_clam, history = train_end2end(MILConfig(), student, {"size": 64, "mean": (0.5,) * 3, "std": (0.5,) * 3},
                                               clam, bags.__getitem__, tiles, list(bags), labels, k_tiles=8, epochs=2,
                                               student_lr=1e-4)
    assert len(history) == 2 and max(requested) == 8 and len(requested) == 8  # 4 bags × 2 epochs, ≤ 8 tiles each
    assert psutil.Process().memory_info().rss - rss < 400 * 2**20  # the 100k-patch bag never becomes 100k images (1.2 GB)
    changed = [k for k, v in tuned.state_dict().items() if v.is_floating_point() and not torch.equal(v, before_student[k])]
    assert any(k.startswith("backbone.") for k in changed) and any(k.startswith("projector.") for k in changed)
    assert all(torch.equal(v, before_student[k]) for k, v in student.state_dict().items())  # the input model is untouched
    assert not all(torch.equal(v, before_clam[k]) for k, v in tuned_clam.state_dict().items())
    assert embed_bag(tuned, {"size": 64, "mean": (0.5,) * 3, "std": (0.5,) * 3}, tiles, "s1", 50, batch=16).shape == (50, 32)


def test_end2end_keeps_the_epoch_with_the_lowest_validation_loss_on_re_embedded_bags(tmp_path):
    """As CLAM does: the fold's validation slides choose the epoch, their bags re-embedded whole by that epoch's
    encoder — the way End2end's test bags are made — not the stored ones."""
    from distill.config import DistillConfig
    from distill.model import build_student
    from mil.clam import CLAM
    from mil.end2end import embed_bag, train_end2end
    from mil.train import val_loss

    torch.manual_seed(0)
    student, _ = build_student(DistillConfig(student={"model": "resnet18", "input_size": 32}, projector="linear"), 16)
    clam = CLAM(16, 2)
    rng = np.random.default_rng(1)
    images = {f"s{i}": rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8) for i in range(6)}
    stored = {k: rng.normal(0, 1, (12, 16)).astype(np.float32) for k in images}
    labels = {f"s{i}": i % 2 for i in range(6)}
    spec = {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    tiles = lambda slide_id, rows: images[slide_id][rows]  # noqa: E731
    cfg = MILConfig(lr=5e-3)
    tuned, tuned_clam, history = train_end2end(cfg, student, spec, clam, stored.__getitem__, tiles, ["s0", "s1", "s2", "s3"],
                                               labels, k_tiles=4, epochs=4, student_lr=1e-3, val_ids=["s4", "s5"],
                                               n_rows=lambda s: 12, refresh_dir=tmp_path / "bags",
                                               attended=0.0)  # random k tiles: a trajectory whose best epoch is not the last
    losses = [h["val_loss"] for h in history]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert int(np.argmin(losses)) != len(losses) - 1, f"make the last epoch not the best, so the test means something: {losses}"
    fresh = {s: embed_bag(tuned, spec, tiles, s, 12) for s in ("s4", "s5")}
    assert val_loss(tuned_clam, fresh.__getitem__, ["s4", "s5"], labels) == pytest.approx(min(losses), abs=1e-4)
    # the training bags were re-embedded by the encoder of the epoch before the last: not the stored ones any more
    refreshed = np.load(tmp_path / "bags" / "s0.npy")
    assert refreshed.shape == (12, 16) and refreshed.dtype == np.float16
    initial = embed_bag(student.eval(), spec, tiles, "s0", 12)  # the starting encoder (train_end2end tunes a copy)
    assert not np.allclose(refreshed, stored["s0"], atol=0.1) and not np.allclose(refreshed, initial, atol=1e-3)
