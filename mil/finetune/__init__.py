"""Fine-tuning strategies for End2end and for patch-level fine-tuning: ``create_finetune(name, **options)``.

The registry names modules, not classes, so importing this package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# name → (module, class). The names are `mil.finetune` in the config (mil.train.FineTuneName lists them too).
REGISTRY: dict[str, tuple[str, str]] = {
    "full": ("mil.finetune.base", "FineTuneStrategy"),
    "linear_probe": ("mil.finetune.classic", "LinearProbe"),
    "lp_ft": ("mil.finetune.classic", "LPFT"),
    "unfreeze_last_to_first": ("mil.finetune.classic", "GradualUnfreezing"),
    "unfreeze_first_to_last": ("mil.finetune.classic", "GradualUnfreezingFirstToLast"),
    "l2_sp": ("mil.finetune.classic", "L2SP"),
    "discriminative": ("mil.finetune.classic", "Discriminative"),
    "auto_rgn": ("mil.finetune.classic", "AutoRGN"),
    "lora": ("mil.finetune.lora", "LoRA"),
    "fpt": ("mil.finetune.fpt", "FPT"),
}


def create_finetune(name: str, **options: Any):
    """A fresh strategy object (it keeps per-run state: starting weights, gradient norms)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown fine-tuning strategy {name!r}; choose one of {sorted(REGISTRY)}")
    module, cls = REGISTRY[name]
    try:
        return getattr(importlib.import_module(module), cls)(**options)
    except TypeError as exc:
        raise ValueError(f"fine-tuning {name!r}: bad options {options}: {exc}") from None
