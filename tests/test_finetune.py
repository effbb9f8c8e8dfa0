"""Fine-tuning strategies (mil.finetune): what trains, penalties, learning rates, LoRA adapters, FPT, End2end rows."""

from __future__ import annotations

import time
import typing

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from mil.finetune import REGISTRY, create_finetune
from mil.finetune.base import TrainingMemory, count, layer_groups
from mil.finetune.loop import optimizer_step, train_patches
from mil.train import FineTuneName, MILConfig


def tiny_vit(num_classes: int = 2, depth: int = 3, img: int = 32, seed: int = 0, width: int = 64):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img, num_classes=num_classes,
                             depth=depth, embed_dim=width, num_heads=2)


def batch(img: int = 32, n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, img, img, generator=g), torch.tensor([0, 1] * (n // 2))


def grads_per_epoch(model, strategy, epochs: int, x, y) -> tuple[object, list[set[str]]]:
    """Train one step per epoch; after each step, the names of the parameters that received a gradient."""
    model = strategy.prepare(model, epochs=epochs)
    model.train()
    optimizer = torch.optim.Adam(strategy.param_groups(model, 1e-2))
    seen = []
    for epoch in range(1, epochs + 1):
        strategy.on_epoch_start(model, optimizer, epoch)
        optimizer_step(strategy, model, optimizer, F.cross_entropy(model(x), y))
        seen.append({name for name, p in model.named_parameters() if p.grad is not None})
    return model, seen


def test_registry_matches_the_config_names_and_rejects_bad_options():
    assert set(REGISTRY) == set(typing.get_args(FineTuneName))
    with pytest.raises(ValueError, match="unknown fine-tuning"):
        create_finetune("nope")
    with pytest.raises(ValueError, match="bad options"):
        create_finetune("lora", rnak=3)
    assert MILConfig(finetune="lora").finetune == ["lora"]  # one name, as older configs had it
    with pytest.raises(ValueError):
        MILConfig(finetune=["lora", "lora"])


def test_layer_groups_run_from_stem_to_head_for_vits_and_students():
    from distill.config import DistillConfig
    from distill.model import build_student

    names = [name for name, _ in layer_groups(tiny_vit())]
    assert names == ["stem", "blocks.0", "blocks.1", "blocks.2", "norm", "head"]
    student, _ = build_student(DistillConfig(student={"model": "resnet18", "input_size": 64}, projector="linear"), 32)
    names = [name for name, _ in layer_groups(student)]
    # the projector and the de-whitening stats head are the head together: neither is a body layer
    assert names[0] == "stem" and names[1] == "backbone.model.layer1.0" and names[-1] == "projector+stats_head"
    assert not any("stats_head" in name or "projector" in name for name in names[:-1])
    assert sum(len(p) for _, p in layer_groups(student)) == len(list(student.parameters()))
    plain, _ = build_student(DistillConfig(student={"model": "resnet18", "input_size": 64}, projector="linear",
                                           dewhiten_head=False), 32)
    assert [name for name, _ in layer_groups(plain)][-1] == "projector"


ALL = "all"
# strategy, options, epochs, per epoch: the layers (by layer_groups name) that receive gradients
EXPECTED = [
    ("full", {}, 1, [ALL]),
    ("linear_probe", {}, 2, [{"head"}, {"head"}]),
    ("lp_ft", {"lp_epochs": 1}, 2, [{"head"}, ALL]),
    ("unfreeze_last_to_first", {}, 3, [{"head"}, {"blocks.1", "blocks.2", "norm", "head"}, ALL]),
    ("unfreeze_first_to_last", {}, 3, [{"head"}, {"stem", "blocks.0", "blocks.1", "head"}, ALL]),
    ("l2_sp", {}, 1, [ALL]),
    ("discriminative", {}, 1, [ALL]),
    ("auto_rgn", {}, 2, [ALL, ALL]),
]


@pytest.mark.parametrize(("name", "options", "epochs", "expected"), EXPECTED, ids=[e[0] for e in EXPECTED])
def test_classic_strategies_train_exactly_the_intended_layers(name, options, epochs, expected):
    x, y = batch()
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer_of = {id(p): layer for layer, params in layer_groups(model) for p in params}
    model, seen = grads_per_epoch(model, create_finetune(name, **options), epochs, x, y)
    params = dict(model.named_parameters())
    every = {layer for layer, _ in layer_groups(model)}
    for epoch, names in enumerate(seen):
        want = every if expected[epoch] == ALL else expected[epoch]
        assert {layer_of[id(params[n])] for n in names} == want, f"epoch {epoch + 1}"
        assert names == {n for n in params if layer_of[id(params[n])] in want}  # whole layers, nothing else
    trained = set().union(*seen)
    for key, value in model.state_dict().items():  # what received no gradient never moved
        if key not in trained:
            assert torch.equal(value, before[key]), key


def test_discriminative_rates_decay_from_the_head():
    groups = create_finetune("discriminative", decay=0.5).param_groups(tiny_vit(), 1.0)
    assert [g["layer"] for g in groups][-1] == "head"
    assert [g["lr"] for g in groups] == [0.5 ** k for k in range(len(groups) - 1, -1, -1)]


def test_l2_sp_penalty_is_zero_at_the_start_and_grows_as_weights_move():
    x, y = batch()
    strategy = create_finetune("l2_sp")
    model = strategy.prepare(tiny_vit(), epochs=3)
    head = sum((p ** 2).sum() for p in model.head.parameters())
    assert float(strategy.drift().detach()) == 0.0
    assert float(strategy.penalty(model).detach()) == pytest.approx(0.01 / 2 * float(head))
    optimizer = torch.optim.Adam(strategy.param_groups(model, 1e-3))
    drifts = []
    for _ in range(3):
        optimizer_step(strategy, model, optimizer, F.cross_entropy(model(x), y))
        drifts.append(float(strategy.drift()))
    assert 0 < drifts[0] < drifts[1] < drifts[2]
    head = sum((p ** 2).sum() for p in model.head.parameters())
    assert float(strategy.penalty(model).detach()) == pytest.approx(0.1 / 2 * drifts[-1] + 0.01 / 2 * float(head), rel=1e-5)


def test_auto_rgn_learning_rates_follow_relative_gradient_norms():
    x, y = batch()
    strategy = create_finetune("auto_rgn")
    model = strategy.prepare(tiny_vit(), epochs=2)
    optimizer = torch.optim.SGD(strategy.param_groups(model, 0.1))
    strategy.on_epoch_start(model, optimizer, 1)
    assert all(g["lr"] == 0.1 for g in optimizer.param_groups)  # nothing measured yet
    expected = {}
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        strategy.after_backward(model)
        for p in model.parameters():
            expected[id(p)] = expected.get(id(p), 0.0) + float(p.grad.norm()) / max(float(p.norm()), 1e-2 * p.numel() ** 0.5)
        optimizer.step()
    strategy.on_epoch_start(model, optimizer, 2)
    top = max(expected.values())
    lrs = {g["params"][0].data_ptr(): g["lr"] for g in optimizer.param_groups}
    for p in model.parameters():
        assert lrs[p.data_ptr()] == pytest.approx(0.1 * expected[id(p)] / top, rel=1e-5, abs=1e-9)
    assert max(lrs.values()) == pytest.approx(0.1) and len(set(np.round(list(lrs.values()), 8))) > 10


def test_lora_on_vit_b_trains_0_17_percent_in_a_small_file(tmp_path):
    from mil.finetune.lora import lora_params, save_adapter

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=2)
    encoder = count(model.parameters()) - count(model.head.parameters())  # 85,798,656
    strategy = create_finetune("lora")
    model = strategy.prepare(model)
    adapters = count(lora_params(model))
    assert adapters == 12 * 2 * (768 * 4 + 4 * 768) == 147_456
    assert 100 * adapters / encoder == pytest.approx(0.17, abs=0.02)  # MeLo's count: adapters vs. the encoder
    trainable = strategy.trainable(model)
    assert count(trainable) == adapters + 768 * 2 + 2  # + the classification head
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trainable}
    path = save_adapter(model, tmp_path / "task.safetensors")
    assert path.stat().st_size < 2**20


def test_lora_adapters_switch_tasks_on_one_frozen_encoder(tmp_path):
    from mil.finetune.lora import load_adapter, read_adapter, save_adapter

    x, y = batch()
    base = tiny_vit(depth=2)
    with torch.no_grad():
        plain = base(x)
    files, outputs = {}, {}
    for task, labels in (("a", y), ("b", 1 - y)):
        strategy = create_finetune("lora")
        tuned, history = train_patches(tiny_vit(depth=2), strategy, [(x, labels)] * 3, epochs=2, lr=1e-2)
        assert history[-1]["trainable_params"] == count(strategy.trainable(tuned))
        with torch.no_grad():
            outputs[task] = tuned(x)
        files[task] = save_adapter(tuned, tmp_path / f"{task}.safetensors")
    assert not torch.allclose(outputs["a"], outputs["b"])
    fresh = create_finetune("lora").prepare(tiny_vit(depth=2))
    with torch.no_grad():
        assert torch.allclose(fresh(x), plain, atol=1e-6)  # B = 0: a new adapter changes nothing
    server = tiny_vit(depth=2).eval()  # one frozen encoder, adapters loaded onto it
    in_memory = {task: read_adapter(path) for task, path in files.items()}
    for task in ("a", "b", "a"):
        start = time.perf_counter()
        load_adapter(server, in_memory[task])
        assert time.perf_counter() - start < 0.5
        with torch.no_grad():
            assert torch.allclose(server(x), outputs[task], atol=1e-5), task
    load_adapter(server, files["b"])  # from the file as well
    with torch.no_grad():
        assert torch.allclose(server(x), outputs["b"], atol=1e-5)
    with pytest.raises(ValueError, match="ViT"):
        create_finetune("lora").prepare(torch.nn.Sequential(torch.nn.Linear(4, 2)))


def test_fpt_trains_only_side_prompts_and_fusion_and_needs_far_less_memory():
    from mil.finetune.fpt import FPTModel

    torch.manual_seed(0)
    frozen = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=128, num_classes=0, depth=4)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        reference = frozen(x)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    strategy = create_finetune("fpt")
    model = strategy.prepare(frozen)
    assert isinstance(model, FPTModel) and model.side_size == 64 and model.side.embed_dim == 384 // 8
    with torch.no_grad():
        assert torch.allclose(model(x), reference, atol=1e-5)  # zero-initialised correction: starts as the frozen model
        states = model.preload(x)
        assert states[0].shape == (2, 4, 2, 13, 384)  # 4 layers, keys+values, top 20 % of 64 patch tokens
        assert torch.allclose(model(x, states=states), model(x))
    target = torch.randn(2, 384)
    meter = TrainingMemory([model], strategy.trainable(model))
    optimizer = torch.optim.Adam(strategy.param_groups(model, 1e-3))
    model.train()
    for _ in range(2):
        with meter.step():
            optimizer_step(strategy, model, optimizer, F.mse_loss(model(x), target))
    got = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None}
    assert got == {"side", "prompts", "key_proj", "value_proj", "fusion_norm", "head"}
    assert all(torch.equal(v, before[k]) for k, v in model.frozen.state_dict().items())
    assert count(strategy.trainable(model)) < 0.15 * count(frozen.parameters())

    full = create_finetune("full")
    big = full.prepare(timm.create_model("vit_small_patch16_224", pretrained=False, img_size=128, num_classes=0, depth=4))
    full_meter = TrainingMemory([big], full.trainable(big))
    with full_meter.step():
        F.mse_loss(big(x), target).backward()
    assert meter.peak_mb < 0.5 * full_meter.peak_mb
    assert meter.peak_activations < 0.2 * full_meter.peak_activations


def test_end2end_with_lora_and_fpt_trains_the_right_parts(tmp_path):
    from distill.config import DistillConfig
    from distill.model import build_student
    from mil.clam import CLAM
    from mil.end2end import embed_bag, save_encoder, train_end2end
    from mil.finetune.lora import read_adapter

    torch.manual_seed(0)
    cfg = DistillConfig(student={"model": "vit_tiny", "input_size": 32, "model_kwargs": {"img_size": 32, "depth": 2}},
                        projector="linear")
    student, _ = build_student(cfg, 32)
    rng = np.random.default_rng(0)
    bags = {f"s{i}": rng.normal(0, 1, (20, 32)).astype(np.float32) for i in range(4)}
    labels = {f"s{i}": i % 2 for i in range(4)}
    spec = {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3}

    def tiles(slide_id, rows):
        return rng.integers(0, 255, (len(rows), 32, 32, 3), dtype=np.uint8)

    tuned, _, history = train_end2end(MILConfig(), student, spec, CLAM(32, 2), bags.__getitem__, tiles, list(bags), labels,
                                      k_tiles=4, epochs=2, student_lr=1e-4, finetune="lora")
    before = student.state_dict()
    changed = {k for k, v in tuned.state_dict().items() if k not in before or not torch.equal(v, before[k])}
    head = ("projector.", "stats_head.")  # the student's head: projector and de-whitening stats head
    assert changed and all(".lora_" in k or k.startswith(head) for k in changed)
    assert any(".lora_" in k and "_B" in k for k in changed)
    assert history[-1]["trainable_params"] < 0.1 * history[-1]["encoder_params"] and history[-1]["peak_mb"] > 0
    path = save_encoder(tuned, "lora", tmp_path / "fold_0_student")
    assert path.name == "fold_0_student.adapter.safetensors" and all(".lora_" in k or k.startswith(head)
                                                                        for k in read_adapter(path)[0])

    teacher = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0, depth=2,
                                embed_dim=64, num_heads=2)
    teacher.reset_classifier(0, "avg")
    start = {k: v.clone() for k, v in teacher.state_dict().items()}
    fpt, _, history = train_end2end(MILConfig(), teacher, spec, CLAM(64, 2), lambda s: np.pad(bags[s], ((0, 0), (0, 32))),
                                    tiles, list(bags), labels, k_tiles=4, epochs=1, student_lr=1e-4, finetune="fpt",
                                    finetune_options={"side_size": 16, "lr": 1e-3})
    assert all(torch.equal(v, start[k]) for k, v in fpt.frozen.state_dict().items())
    assert not torch.equal(fpt.head.weight, torch.zeros_like(fpt.head.weight))
    assert embed_bag(fpt, spec, tiles, "s1", 20, batch=8).shape == (20, 64)


def test_results_rows_expand_end2end_per_strategy():
    from mil.strategies import strategy_rows
    from pipelines.stages.results import results_markdown

    assert strategy_rows(MILConfig()) == ["teacher", "reuse", "retrain", "end2end"]
    cfg = MILConfig(strategies=["retrain", "end2end"], finetune=["full", "lora", "fpt"])
    assert strategy_rows(cfg) == ["retrain", "end2end", "end2end:lora", "end2end:fpt"]
    row = {"features": "x", "acc_mean": 0.5, "acc_std": 0.0, "bacc_mean": 0.5, "bacc_std": 0.0, "auc_mean": float("nan"),
           "auc_std": float("nan"), "trainable_params": 10, "encoder_params": 1000, "encoder_patches_per_s": 3.0}
    table = results_markdown([{**row, "strategy": "retrain", "encoder_trainable_params": 0},
                              {**row, "strategy": "end2end:lora", "encoder_trainable_params": 5,
                               "encoder_trainable_pct": 0.5, "train_peak_mb": 12.4, "s_per_epoch": 3.24}], ["a", "b"], 2)
    assert "| End2end (lora fine-tuning) |" in table and "| 5 (0.50 %) | 12 | 3.2 |" in table
    assert "| Retrain (CLAM on student) | `x` | 0.500 ± 0.000 | 0.500 ± 0.000 | n/a | 10 | 0 | n/a | n/a |" in table


def test_lora_adapter_carries_the_heads_batchnorm_statistics(tmp_path):
    """A head with BatchNorm (like the TransScan projector) changes its running statistics in training."""
    from mil.finetune.lora import load_adapter, save_adapter

    def with_bn_head():
        model = tiny_vit(depth=2)
        model.head = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 2))
        return model

    x, y = batch(n=8)
    tuned, _ = train_patches(with_bn_head(), create_finetune("lora"), [(x, y)] * 3, epochs=2, lr=1e-2)
    tuned.eval()
    with torch.no_grad():
        expected = tuned(x)
    server = with_bn_head().eval()
    load_adapter(server, save_adapter(tuned, tmp_path / "task.safetensors"))
    with torch.no_grad():
        assert torch.allclose(server(x), expected, atol=1e-5)
