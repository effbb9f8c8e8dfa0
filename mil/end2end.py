"""End2end (EFCM stage 2): the student encoder and CLAM trained together from slide labels.

Starting from the distilled student and the fold's Retrain CLAM, every step takes one bag: its
stored student features (no gradient) with ``k_tiles`` of its tiles re-read and passed through the
student *with* gradients, replacing their stored rows. Memory per step is bounded by ``k_tiles``
images, however large the bag. Which student parameters train, and at what learning rate, is a
pluggable fine-tuning strategy (``full`` here; more in ``mil.finetune`` as they land).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np

from mil.train import BagFn, MILConfig, balanced_weights, clam_step

# (slide id, row indices) → uint8 tiles (k, H, W, 3) for those rows of the slide's bag
TileFn = Callable[[str, np.ndarray], "np.ndarray"]


class FullFineTuning:
    """Every student parameter trains, at the student learning rate."""

    name = "full"

    def param_groups(self, student, lr: float) -> list[dict]:
        for p in student.parameters():
            p.requires_grad_(True)
        return [{"params": [p for p in student.parameters()], "lr": lr}]


FINETUNE = {"full": FullFineTuning}


def _to_input(tiles: np.ndarray, size: int, mean, std):
    import torch

    from features.encoders import to_model_input

    return to_model_input(torch.from_numpy(np.asarray(tiles)), size, mean, std, torch.device("cpu"))


def train_end2end(cfg: MILConfig, student, student_input: dict, clam, bag: BagFn, tiles: TileFn,
                  train_ids: list[str], labels: dict[str, int], *, k_tiles: int, epochs: int, student_lr: float,
                  method: str = "full", seed: int = 0) -> tuple[object, object, list[dict]]:
    """Fine-tune copies of ``student`` and ``clam`` together; returns (student, clam, history)."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    student, clam = copy.deepcopy(student), copy.deepcopy(clam)
    student.train()
    clam.train()
    groups = FINETUNE[method]().param_groups(student, student_lr)
    optimizer = torch.optim.Adam(groups + [{"params": list(clam.parameters()), "lr": cfg.lr}], weight_decay=cfg.weight_decay)
    weights = balanced_weights(train_ids, labels, clam.n_classes)
    history = []
    for epoch in range(1, epochs + 1):
        losses = []
        for i in rng.choice(len(train_ids), len(train_ids), replace=True, p=weights):
            slide_id = train_ids[i]
            stored = torch.from_numpy(np.asarray(bag(slide_id), dtype=np.float32))
            rows = np.sort(rng.choice(len(stored), min(k_tiles, len(stored)), replace=False))
            fresh = student(_to_input(tiles(slide_id, rows), **student_input))  # the only images in memory
            mask = torch.zeros(len(stored), 1)
            mask[torch.from_numpy(rows)] = 1.0
            placed = torch.zeros_like(stored).index_copy(0, torch.from_numpy(rows), fresh.float())
            features = stored * (1 - mask) + placed  # stored rows, with the k fresh ones (with gradients) swapped in
            losses.append(clam_step(cfg, clam(features, label=labels[slide_id]), labels[slide_id], optimizer))
        history.append({"epoch": epoch, "train_loss": round(float(np.mean(losses)), 5)})
    student.eval()
    clam.eval()
    return student, clam, history


def embed_bag(student, student_input: dict, tiles: TileFn, slide_id: str, n_rows: int, batch: int = 64) -> np.ndarray:
    """All of a slide's features recomputed with a (fine-tuned) student, batch by batch."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, n_rows, batch):
            rows = np.arange(start, min(n_rows, start + batch))
            out.append(student(_to_input(tiles(slide_id, rows), **student_input)).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
