"""The fine-tuning strategy interface, the layer split every strategy shares, and training-memory accounting.

A strategy decides four things about an encoder being fine-tuned: which parameters train (and may
rewrite the model, e.g. LoRA adapters or an FPT side network: ``prepare``), their learning rates
(``param_groups``), an extra term added to the loss (``penalty``) and what changes between epochs
(``on_epoch_start``: unfreezing, the LP→FT switch, Auto-RGN learning rates). The training loop
calls them in that order; see ``mil.finetune.loop.train_patches`` for the smallest complete loop.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class FineTuneStrategy:
    """Full fine-tuning; subclasses narrow what trains or change how. Options come in as keyword arguments."""

    name = "full"

    def __init__(self, **options: Any):
        if options:
            raise ValueError(f"fine-tuning {self.name!r} takes no options {sorted(options)}")
        self.epochs = 1

    def prepare(self, model: nn.Module, *, epochs: int = 1) -> nn.Module:
        """Set ``requires_grad`` for epoch 1 (and rewrite the model if the strategy needs to); returns the model to train."""
        self.epochs = epochs
        set_trainable(model, model.parameters())
        return model

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        """Every parameter that trains at some epoch (what the table's trainable count counts)."""
        return list(model.parameters())

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """Optimizer groups. Parameters frozen now but unfrozen later are included: with no gradient Adam skips them."""
        return [{"params": self.trainable(model), "lr": lr}]

    def penalty(self, model: nn.Module) -> torch.Tensor | float:
        """Regularisation added to the loss (L2-SP); zero for most strategies."""
        return 0.0

    def on_epoch_start(self, model: nn.Module, optimizer, epoch: int) -> None:
        """Per-epoch change (1-based epoch), called before the epoch's first step."""

    def after_backward(self, model: nn.Module) -> None:
        """Called between ``loss.backward()`` and ``optimizer.step()`` (Auto-RGN reads the gradients here)."""


def set_trainable(model: nn.Module, params) -> None:
    """Freeze every parameter of ``model`` except ``params``."""
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Names of the modules that are the model's head: a distilled student's projector and its de-whitening
    stats head (both map the backbone's tokens to teacher-space features), or a timm classifier with weights."""
    if hasattr(model, "projector"):
        return ("projector",) + (("stats_head",) if getattr(model, "stats_head", None) is not None else ())
    if hasattr(model, "get_classifier"):
        classifier = model.get_classifier()
        if isinstance(classifier, nn.Module) and any(True for _ in classifier.parameters()):
            for name, module in model.named_modules():
                if module is classifier:
                    return (name,)
    return ()


def in_head(name: str, heads: tuple[str, ...]) -> bool:
    """Whether the parameter or buffer ``name`` belongs to one of the head modules ``heads``."""
    return any(name == head or name.startswith(head + ".") for head in heads)


def layer_groups(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """The model's parameters as layers from input to output, the head last.

    A layer is a numbered block (``blocks.3``, ``layer2.1``); everything before the first block is one
    ``stem`` layer; unnumbered modules after it (final norm) are layers of their own; the head (see
    ``head_prefixes``; else the last layer) is the last. This one split drives linear probing, gradual
    unfreezing and the layer-wise learning rates for ViTs, CNNs and distilled students alike.
    """
    heads = head_prefixes(model)
    groups: dict[str, list[nn.Parameter]] = {}
    seen_block = False
    head_params = []
    for name, p in model.named_parameters():
        if in_head(name, heads):
            head_params.append(p)
            continue
        parts = name.split(".")
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if index is not None:
            key, seen_block = ".".join(parts[: index + 1]), True
        else:
            key = "stem" if not seen_block else ".".join(parts[:-1]) or name
        groups.setdefault(key, []).append(p)
    layers = list(groups.items())
    if head_params:
        layers.append(("+".join(heads), head_params))
    return layers


def head_params(model: nn.Module) -> list[nn.Parameter]:
    return layer_groups(model)[-1][1]


def count(params) -> int:
    return int(sum(p.numel() for p in params))


class TrainingMemory:
    """Peak training memory of a loop, accounted rather than sampled, so it is the same on CPU and GPU.

    weights (all parameters) + gradients and two Adam moments for the trainable ones + the largest sum
    of tensors autograd saved for one backward pass (the activations; storages counted once, weights
    not again). Use ``with meter.step():`` around each forward + backward.
    """

    def __init__(self, modules: list[nn.Module], trainable: list[nn.Parameter]):
        params = {id(p): p for m in modules for p in m.parameters()}
        self.weights = sum(p.numel() * p.element_size() for p in params.values())
        self.states = 3 * sum(p.numel() * p.element_size() for p in trainable)
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in params.values()}
        self.peak_activations = 0

    def step(self):
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._param_ptrs and ptr not in saved:
                saved[ptr] = storage.nbytes()
            return t

        meter = self

        class _Step(torch.autograd.graph.saved_tensors_hooks):
            def __exit__(self, *exc):
                meter.peak_activations = max(meter.peak_activations, sum(saved.values()))
                return super().__exit__(*exc)

        return _Step(pack, lambda t: t)

    @property
    def peak_mb(self) -> float:
        return round((self.weights + self.states + self.peak_activations) / 2**20, 1)


def scheduled_count(total: int, epoch: int, epochs: int) -> int:
    """How many of ``total`` layers are unfrozen at ``epoch``: none at the first epoch, all at the last."""
    if epochs <= 1:
        return total
    return min(total, math.ceil(total * (epoch - 1) / (epochs - 1)))
