"""The classic fine-tuning strategies compared by Davila et al. (2024), on the shared layer split (``base.layer_groups``).

For a distilled student the "head" is its projector (TransScan): the last trainable layer before
CLAM, which is the task head End2end trains anyway. For a timm classifier it is the classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from mil.finetune.base import (
    FineTuneStrategy,
    head_params,
    layer_groups,
    scheduled_count,
    set_trainable,
)


class LinearProbe(FineTuneStrategy):
    """Only the head trains; the encoder body is frozen."""

    name = "linear_probe"

    def prepare(self, model: nn.Module, *, epochs: int = 1) -> nn.Module:
        self.epochs = epochs
        set_trainable(model, head_params(model))
        return model

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return head_params(model)


class LPFT(FineTuneStrategy):
    """Linear probe for ``lp_epochs`` (default: half the epochs, at least one), then full fine-tuning (Kumar et al. 2022)."""

    name = "lp_ft"

    def __init__(self, lp_epochs: int | None = None):
        super().__init__()
        self.lp_epochs = lp_epochs

    def prepare(self, model: nn.Module, *, epochs: int = 1) -> nn.Module:
        self.epochs = epochs
        self.lp_epochs = self.lp_epochs if self.lp_epochs is not None else max(1, epochs // 2)
        set_trainable(model, head_params(model))
        return model

    def on_epoch_start(self, model: nn.Module, optimizer, epoch: int) -> None:
        set_trainable(model, head_params(model) if epoch <= self.lp_epochs else model.parameters())


class GradualUnfreezing(FineTuneStrategy):
    """The head always trains; body layers unfreeze one share per epoch, none at epoch 1 and all at the last epoch."""

    name = "unfreeze_last_to_first"
    last_to_first = True

    def prepare(self, model: nn.Module, *, epochs: int = 1) -> nn.Module:
        self.epochs = epochs
        self.on_epoch_start(model, None, 1)
        return model

    def unfrozen_layers(self, model: nn.Module, epoch: int) -> list[str]:
        body = layer_groups(model)[:-1]
        n = scheduled_count(len(body), epoch, self.epochs)
        chosen = body[len(body) - n:] if self.last_to_first else body[:n]
        return [name for name, _ in chosen]

    def on_epoch_start(self, model: nn.Module, optimizer, epoch: int) -> None:
        names = set(self.unfrozen_layers(model, epoch))
        groups = layer_groups(model)
        set_trainable(model, [p for name, params in groups[:-1] if name in names for p in params] + groups[-1][1])


class GradualUnfreezingFirstToLast(GradualUnfreezing):
    name = "unfreeze_first_to_last"
    last_to_first = False


class L2SP(FineTuneStrategy):
    """Everything trains; penalty α/2‖w − w⁰‖² on the body (w⁰: the weights at ``prepare``) + β/2‖w‖² on the head (Li et al. 2018)."""

    name = "l2_sp"

    def __init__(self, alpha: float = 0.1, beta: float = 0.01):
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.start: list[tuple[nn.Parameter, torch.Tensor]] = []

    def prepare(self, model: nn.Module, *, epochs: int = 1) -> nn.Module:
        model = super().prepare(model, epochs=epochs)
        body = [p for _, params in layer_groups(model)[:-1] for p in params]
        self.start = [(p, p.detach().clone()) for p in body]
        return model

    def drift(self) -> torch.Tensor:
        """‖w − w⁰‖² over the body: zero at the start, growing as the weights move away."""
        return sum(((p - p0) ** 2).sum() for p, p0 in self.start)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        head = sum((p ** 2).sum() for p in head_params(model))
        return self.alpha / 2 * self.drift() + self.beta / 2 * head


class Discriminative(FineTuneStrategy):
    """Everything trains; layer i of L (head = L−1) gets lr · decay^(L−1−i): deeper-from-the-head layers learn slower."""

    name = "discriminative"

    def __init__(self, decay: float = 0.8):
        super().__init__()
        self.decay = decay

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        layers = layer_groups(model)
        return [{"params": params, "lr": lr * self.decay ** (len(layers) - 1 - i), "layer": name}
                for i, (name, params) in enumerate(layers)]


class AutoRGN(FineTuneStrategy):
    """Everything trains; each tensor's lr = lr · RGN / max RGN, RGN = mean over the last epoch's steps of ‖g‖/‖θ‖ (Lee et al. 2023).

    Epoch 1 runs at the base lr (no gradients seen yet); from epoch 2 the rates follow the previous epoch.
    ‖θ‖ is floored at ``floor``·√numel so a zero-initialised tensor (biases, a fresh head) does not
    get an infinite ratio at its first step and starve every other tensor.
    """

    name = "auto_rgn"

    def __init__(self, floor: float = 1e-2):
        super().__init__()
        self.floor = floor
        self.base_lr = 0.0
        self.sums: dict[int, float] = {}
        self.steps = 0

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        self.base_lr = lr
        return [{"params": [p], "lr": lr, "rgn_id": id(p)} for p in model.parameters()]

    def after_backward(self, model: nn.Module) -> None:
        self.steps += 1
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    rgn = float(p.grad.norm() / max(float(p.norm()), self.floor * p.numel() ** 0.5))
                    self.sums[id(p)] = self.sums.get(id(p), 0.0) + rgn

    def rates(self) -> dict[int, float]:
        """Relative gradient norm per tensor (by ``id``), normalised by the largest."""
        if not self.sums:
            return {}
        top = max(self.sums.values()) or 1.0
        return {key: value / top for key, value in self.sums.items()}

    def on_epoch_start(self, model: nn.Module, optimizer, epoch: int) -> None:
        rates = self.rates()
        if rates:
            for group in optimizer.param_groups:
                if "rgn_id" in group:
                    group["lr"] = self.base_lr * rates.get(group["rgn_id"], 0.0)
        self.sums, self.steps = {}, 0
