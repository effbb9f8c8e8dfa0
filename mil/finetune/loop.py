"""The smallest complete fine-tuning loop (patch-level classification), and the one optimiser step End2end shares.

Library use (patch-level fine-tuning of any timm model, here LoRA on a ViT):

    model = timm.create_model("vit_small_patch16_224", num_classes=2)
    model, history = train_patches(model, create_finetune("lora"), batches, epochs=10, lr=1e-3)

``batches`` is a list of (images, labels) tensors, or a callable returning one per epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mil.finetune.base import FineTuneStrategy, TrainingMemory, count


def optimizer_step(strategy: FineTuneStrategy, model: nn.Module, optimizer, loss: torch.Tensor) -> float:
    """loss + the strategy's penalty → backward → the strategy's gradient hook → step; returns the loss."""
    loss = loss + strategy.penalty(model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    strategy.after_backward(model)
    optimizer.step()
    return float(loss.detach())


def train_patches(model: nn.Module, strategy: FineTuneStrategy, batches: Iterable | Callable[[int], Iterable], *,
                  epochs: int, lr: float, weight_decay: float = 0.0,
                  loss_fn: Callable = F.cross_entropy) -> tuple[nn.Module, list[dict]]:
    """Fine-tune ``model`` (prepared by ``strategy``, so it may be a new module: use the returned one) with Adam.

    History per epoch: mean loss, seconds, accounted peak training memory (MB) and trainable parameters.
    """
    model = strategy.prepare(model, epochs=epochs)
    model.train()
    optimizer = torch.optim.Adam(strategy.param_groups(model, lr), weight_decay=weight_decay)
    meter = TrainingMemory([model], strategy.trainable(model))
    history = []
    for epoch in range(1, epochs + 1):
        strategy.on_epoch_start(model, optimizer, epoch)
        start, losses = time.perf_counter(), []
        for x, y in (batches(epoch) if callable(batches) else batches):
            with meter.step():
                losses.append(optimizer_step(strategy, model, optimizer, loss_fn(model(x), y)))
        history.append({"epoch": epoch, "loss": sum(losses) / max(1, len(losses)),
                        "seconds": time.perf_counter() - start, "peak_mb": meter.peak_mb,
                        "trainable_params": count(strategy.trainable(model))})
    model.eval()
    return model, history
