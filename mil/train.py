"""Training and evaluating CLAM on bags of patch features, one bag per step, as CLAM's reference does.

Adam (lr 2e-4, weight decay 1e-5), class-balanced sampling of training bags, loss
``bag_weight · CE + (1 − bag_weight) · instance``, validation loss after every epoch, early stopping
(patience 20, never before epoch 50), the best validation-loss weights kept. All seeded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

BagFn = Callable[[str], "np.ndarray"]  # slide id → features (N, D)
# the names of mil.finetune.REGISTRY (a test keeps the two in step; listed here so the config needs no torch)
FineTuneName = Literal["full", "linear_probe", "lp_ft", "unfreeze_last_to_first", "unfreeze_first_to_last", "l2_sp",
                       "discriminative", "auto_rgn", "lora", "fpt"]


class MILConfig(BaseModel):
    """CLAM slide-level training, splits and the EFCM stage-2 strategies to compare."""

    model_config = ConfigDict(extra="forbid")

    model: Literal["clam_sb", "clam_mb"] = Field("clam_sb", description="CLAM single-branch or multi-branch")
    size: Literal["small", "big"] = Field("small", description="attention width: small (512→256) or big (512→384)")
    dropout: float = Field(0.25, ge=0, lt=1, description="dropout after the first layer and in the attention")
    k_sample: int = Field(8, ge=1, description="top / bottom attended patches per class for the instance loss")
    bag_weight: float = Field(0.7, ge=0, le=1, description="weight of the bag loss; the instance loss gets the rest")
    instance_loss: Literal["svm", "ce"] = Field("svm", description="smooth top-1 SVM (CLAM's default) or cross-entropy")
    subtyping: bool | None = Field(None, description="out-of-class instance negatives; null: true when there are more than 2 classes")
    lr: float = Field(2e-4, gt=0, description="Adam learning rate")
    weight_decay: float = Field(1e-5, ge=0, description="Adam weight decay")
    max_epochs: int = Field(200, ge=1, description="maximum epochs")
    min_epochs: int = Field(50, ge=0, description="no early stop before this epoch")
    patience: int = Field(20, ge=1, description="epochs without a lower validation loss before stopping")
    folds: int = Field(10, ge=2, description="stratified folds by case_id (ignored when slides.csv has a split column)")
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="fraction of cases held out for validation in each fold")
    seed: int = Field(0, description="seed for splits, sampling and initialisation")
    strategies: list[Literal["teacher", "reuse", "retrain", "end2end"]] = Field(
        default_factory=lambda: ["teacher", "reuse", "retrain", "end2end"],
        description="rows of the results table: CLAM on teacher features, that CLAM on student features, a CLAM "
                    "retrained on them, student and CLAM fine-tuned together")
    end2end_k_tiles: int = Field(16, ge=1, description="End2end: tiles per bag re-read and passed through the student with gradients")
    end2end_attended: float = Field(0.5, ge=0, le=1, description="End2end: share of the k tiles that are the bag's "
                                                                 "most-attended under the current CLAM (the rest at "
                                                                 "random), so the encoder is tuned on the tiles that "
                                                                 "decide the slide, such as a small tumour focus; 0: "
                                                                 "all random")
    end2end_epochs: int = Field(5, ge=1, description="End2end: epochs of joint training, from the Retrain CLAM")
    end2end_student_lr: float = Field(1e-5, gt=0, description="End2end: student learning rate (CLAM keeps `lr`)")
    end2end_refresh: bool = Field(True, description="End2end: re-embed the training bags with the current encoder before "
                                                    "every epoch after the first, so CLAM trains on the features it is "
                                                    "tested on (false: the stored bags, only the k tiles fresh; faster)")
    finetune: list[FineTuneName] = Field(
        default_factory=lambda: ["full"],
        description="End2end: how the encoder is fine-tuned, one End2end row per entry (`full` is the row `end2end`, the "
                    "others `end2end:<name>`): full, linear_probe (projector only), lp_ft, unfreeze_last_to_first, "
                    "unfreeze_first_to_last, l2_sp, discriminative, auto_rgn, lora (MeLo q/v adapters), fpt (the "
                    "frozen teacher + a light side network; starts from the teacher's CLAM and features) — see docs/finetuning.md")
    finetune_options: dict[FineTuneName, dict[str, Any]] = Field(
        default_factory=dict, description="End2end: options per fine-tuning strategy, e.g. {lora: {rank: 8}, "
                                          "discriminative: {decay: 0.7}} (the keyword arguments in docs/finetuning.md)")
    classes: list[str] | None = Field(None, description="label order (null: sorted labels of slides.csv)")
    device: str = Field("auto", description="where CLAM and End2end train and predict: auto (CUDA when the worker has "
                                            "a GPU, else CPU), cpu, cuda or cuda:N")
    bag_cache_mb: int = Field(512, ge=0, description="per mil task: feature bags kept in memory between epochs, in MB "
                                                     "(the rest are re-read from the Zarr stores; 0: read every time)")
    standardize: bool = Field(False, description="z-score each feature dimension with the training tiles' mean and std "
                                                 "(stored in the model, so Reuse applies the teacher's); CLAM itself does not")

    @field_validator("finetune", mode="before")
    @classmethod
    def _one_name(cls, value):
        """`finetune: lora` (one name, as configs before the list had it) means [lora]."""
        return [value] if isinstance(value, str) else value

    @field_validator("finetune")
    @classmethod
    def _unique(cls, value):
        if not value or len(set(value)) < len(value):
            raise ValueError("list each fine-tuning strategy once, at least one")
        return value


def build_clam(cfg: MILConfig, in_dim: int, n_classes: int):
    from mil.clam import CLAM

    subtyping = cfg.subtyping if cfg.subtyping is not None else n_classes > 2
    return CLAM(in_dim, n_classes, size=cfg.size, dropout=cfg.dropout, k_sample=cfg.k_sample,
                multi_branch=cfg.model == "clam_mb", subtyping=subtyping, instance_loss=cfg.instance_loss)


def model_device(model):
    """The device a module's parameters are on."""
    return next(model.parameters()).device


def bag_tensor(bag: BagFn, slide_id: str, device):
    """A slide's bag as float32 on ``device`` (pinned and copied asynchronously on CUDA)."""
    import torch

    x = torch.from_numpy(np.asarray(bag(slide_id), dtype=np.float32))
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def predict(model, bag: BagFn, slide_ids: list[str]) -> np.ndarray:
    """Class probabilities (n, C) for the slides, on the model's device."""
    import torch

    model.eval()
    device, probs = model_device(model), []
    with torch.inference_mode():
        for slide_id in slide_ids:
            logits = model(bag_tensor(bag, slide_id, device))["logits"]
            probs.append(torch.softmax(logits, dim=1)[0].float().cpu().numpy())
    return np.stack(probs) if probs else np.zeros((0, model.n_classes))


def val_loss(model, bag: BagFn, slide_ids: list[str], labels: dict[str, int]) -> float:
    """Mean bag cross-entropy over ``slide_ids`` (NaN when there are none); leaves the model in train mode."""
    import torch
    import torch.nn.functional as F

    model.eval()
    device, losses = model_device(model), []
    with torch.inference_mode():
        for slide_id in slide_ids:
            logits = model(bag_tensor(bag, slide_id, device))["logits"]
            losses.append(F.cross_entropy(logits, torch.tensor([labels[slide_id]], device=device)).item())
    model.train()
    return float(np.mean(losses)) if losses else math.nan


def balanced_weights(train_ids: list[str], labels: dict[str, int], n_classes: int) -> np.ndarray:
    """Sampling probability of each training bag: inverse class frequency (CLAM's weighted sampler)."""
    y = np.array([labels[s] for s in train_ids])
    counts = np.bincount(y, minlength=n_classes)
    weights = np.array([1.0 / counts[c] for c in y])
    return weights / weights.sum()


def clam_step(cfg: MILConfig, out: dict, label: int, optimizer) -> float:
    """One optimiser step on ``bag_weight · CE + (1 − bag_weight) · instance`` for one bag."""
    import torch
    import torch.nn.functional as F

    bag_loss = F.cross_entropy(out["logits"], torch.tensor([label], device=out["logits"].device))
    loss = cfg.bag_weight * bag_loss + (1 - cfg.bag_weight) * out["instance_loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def train_clam(cfg: MILConfig, bag: BagFn, train_ids: list[str], val_ids: list[str], labels: dict[str, int],
               in_dim: int, n_classes: int, seed: int, on_epoch: Callable[..., None] | None = None) -> tuple[object, list[dict]]:
    """One fold: returns the model with its best (lowest validation loss) weights and the history.

    ``on_epoch(done=, total=, unit="epoch", val_loss=)`` after every epoch, for progress reports."""
    import torch

    from features.encoders import pick_device

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = pick_device(cfg.device)
    model = build_clam(cfg, in_dim, n_classes)
    if cfg.standardize:
        sample = np.concatenate([np.asarray(bag(s), dtype=np.float32)[:2000] for s in train_ids])
        model.feature_mean.copy_(torch.from_numpy(sample.mean(axis=0)))
        model.feature_std.copy_(torch.from_numpy(sample.std(axis=0) + 1e-6))
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    weights = balanced_weights(train_ids, labels, n_classes)
    best_loss, best_state, bad, history = math.inf, None, 0, []
    model.train()
    for epoch in range(1, cfg.max_epochs + 1):
        order = rng.choice(len(train_ids), len(train_ids), replace=True, p=weights)  # class-balanced, like CLAM
        losses, start = [], time.perf_counter()
        for i in order:
            slide_id = train_ids[i]
            out = model(bag_tensor(bag, slide_id, device), label=labels[slide_id])
            losses.append(clam_step(cfg, out, labels[slide_id], optimizer))
        val = val_loss(model, bag, val_ids, labels)
        history.append({"epoch": epoch, "train_loss": round(float(np.mean(losses)), 5), "val_loss": round(val, 5),
                        "seconds": round(time.perf_counter() - start, 3)})
        if on_epoch is not None:
            on_epoch(done=epoch, total=cfg.max_epochs, unit="epoch", val_loss=round(val, 4))
        score = val if not math.isnan(val) else history[-1]["train_loss"]
        if score < best_loss:
            best_loss, bad = score, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience and epoch >= cfg.min_epochs:
                break
    model.load_state_dict(best_state)
    model.eval()
    return model, history


def metrics(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> dict:
    """ACC, balanced ACC and AUC (binary: P(class 1); multi-class: one-vs-rest macro mean); NaN when undefined."""
    import warnings

    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    if len(y_true) == 0:
        return {"acc": math.nan, "bacc": math.nan, "auc": math.nan, "n": 0}
    pred = probs.argmax(axis=1)
    with warnings.catch_warnings():  # a fold whose test set has one class: balanced ACC degenerates, AUC is NaN
        warnings.simplefilter("ignore")
        out = {"acc": float(accuracy_score(y_true, pred)), "bacc": float(balanced_accuracy_score(y_true, pred)),
               "n": int(len(y_true))}
    try:
        if n_classes == 2:
            out["auc"] = float(roc_auc_score(y_true, probs[:, 1]))
        else:
            out["auc"] = float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=list(range(n_classes))))
    except ValueError:  # one class only in this fold's test set
        out["auc"] = math.nan
    return out
