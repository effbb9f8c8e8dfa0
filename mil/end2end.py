"""End2end (EFCM stage 2): the student encoder and CLAM trained together from slide labels.

Starting from the distilled student and the fold's Retrain CLAM, every step takes one bag: its
stored student features (no gradient) with ``k_tiles`` of its tiles re-read and passed through the
student *with* gradients, replacing their stored rows. Memory per step is bounded by ``k_tiles``
images, however large the bag. Which parameters train, at what learning rates, with what penalty
and per-epoch changes is a fine-tuning strategy from ``mil.finetune`` (full, linear probe, LP-FT,
gradual unfreezing, L2-SP, discriminative, Auto-RGN, LoRA, FPT).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mil.train import BagFn, MILConfig, balanced_weights

# Learning rates for strategies that train new parameters from scratch (MeLo: 1e-3 for LoRA); the others use
# `student_lr`. `finetune_options: {<name>: {lr: ...}}` overrides either.
STRATEGY_LR = {"lora": 1e-3, "fpt": 1e-4}

# (slide id, row indices) → uint8 tiles (k, H, W, 3) for those rows of the slide's bag
TileFn = Callable[[str, np.ndarray], "np.ndarray"]


def _to_input(tiles: np.ndarray, size: int, mean, std, device, resize: int | None = None, interpolation: str = "bilinear"):
    import torch

    from features.encoders import to_model_input

    return to_model_input(torch.from_numpy(np.asarray(tiles)), size, mean, std, device, resize=resize,
                          interpolation=interpolation)


@dataclass
class _BagStep:
    """One End2end step on one bag: its ``k`` picked tiles re-embedded by the student (with gradients) in place of
    their stored rows, CLAM's bag and instance losses, one optimiser step; returns the loss."""

    student: object
    student_input: dict
    clam: object
    tiles: TileFn
    device: object
    cfg: MILConfig
    strategy: object
    optimizer: object

    def __call__(self, slide_id: str, stored, rows: np.ndarray, label: int) -> float:
        import torch

        from mil.finetune.loop import optimizer_step

        index = torch.from_numpy(rows).to(self.device)
        fresh = self.student(_to_input(self.tiles(slide_id, rows), **self.student_input, device=self.device))  # the only images
        # stored rows, the k fresh ones (with gradients) swapped in: one bag-sized copy, no masks
        out = self.clam(stored.index_copy(0, index, fresh.float()), label=label)
        target = torch.tensor([label], device=self.device)
        loss = self.cfg.bag_weight * torch.nn.functional.cross_entropy(out["logits"], target) \
            + (1 - self.cfg.bag_weight) * out["instance_loss"]
        return optimizer_step(self.strategy, self.student, self.optimizer, loss)


def train_end2end(cfg: MILConfig, student, student_input: dict, clam, bag: BagFn, tiles: TileFn,
                  train_ids: list[str], labels: dict[str, int], *, k_tiles: int, epochs: int, student_lr: float,
                  finetune: str = "full", finetune_options: dict | None = None, seed: int = 0,
                  val_ids: list[str] = (), n_rows: Callable[[str], int] | None = None,
                  refresh_dir: Path | None = None, cache_bytes: int = 0, attended: float = 0.5,
                  on_step: Callable[..., None] | None = None) -> tuple[object, object, list[dict]]:
    """Fine-tune copies of ``student`` and ``clam`` together; returns (encoder, clam, history).

    ``student`` is any encoder module (``finetune="fpt"`` expects the large teacher ViT and returns an
    ``FPTModel`` around it). As CLAM does, the returned weights are those of the epoch with the
    lowest validation loss, on ``val_ids`` bags re-embedded whole by that epoch's encoder (the way
    test bags are made; needs ``n_rows``); without validation slides, the last epoch's. History per
    epoch: loss, validation loss, seconds, accounted peak training memory (MB), the encoder's
    trainable and total (before adaptation) parameter counts. ``on_step(done=, total=, unit="step")``
    after every step.

    ``refresh_dir``: before every epoch after the first, the training bags are re-embedded whole by the
    current encoder into ``refresh_dir/<slide>.npy`` (read back lazily, ``cache_bytes`` kept in memory),
    so CLAM trains on the features it is validated and tested on, not on the starting encoder's; without
    it the stored bags are used throughout and only the ``k_tiles`` rows are fresh.

    ``attended``: the share of the ``k_tiles`` that are the bag's most-attended tiles under the current
    CLAM (the rest drawn at random from the others; :func:`pick_rows`).
    """
    import torch

    from features.encoders import pick_device
    from mil.finetune import create_finetune
    from mil.finetune.base import TrainingMemory, count
    from mil.train import bag_tensor

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = pick_device(cfg.device)
    student, clam = copy.deepcopy(student).to(device), copy.deepcopy(clam).to(device)
    encoder_params = count(student.parameters())
    options = dict(finetune_options or {})
    lr = float(options.pop("lr", STRATEGY_LR.get(finetune, student_lr)))
    strategy = create_finetune(finetune, **options)
    student = strategy.prepare(student, epochs=epochs)
    student.train()
    clam.train()
    optimizer = torch.optim.Adam(strategy.param_groups(student, lr) + [{"params": list(clam.parameters()), "lr": cfg.lr}],
                                 weight_decay=cfg.weight_decay)
    trainable = strategy.trainable(student)
    meter = TrainingMemory([student, clam], trainable + list(clam.parameters()))
    weights = balanced_weights(train_ids, labels, clam.n_classes)
    step = _BagStep(student, student_input, clam, tiles, device, cfg, strategy, optimizer)
    history, best = [], (math.inf, None)
    total_steps, steps = epochs * len(train_ids), 0
    for epoch in range(1, epochs + 1):
        strategy.on_epoch_start(student, optimizer, epoch)
        start, losses = time.perf_counter(), []
        if refresh_dir is not None and epoch > 1:
            bag = _refresh_bags(student, student_input, tiles, sorted(set(train_ids)), n_rows, Path(refresh_dir), cache_bytes)
        for i in rng.choice(len(train_ids), len(train_ids), replace=True, p=weights):
            slide_id = train_ids[i]
            label = labels[slide_id]
            stored = bag_tensor(bag, slide_id, device)
            rows = pick_rows(clam, stored, label, k_tiles, attended, rng)
            with meter.step():
                losses.append(step(slide_id, stored, rows, label))
            steps += 1
            if on_step is not None:
                on_step(done=steps, total=total_steps, unit="step")
        seconds = round(time.perf_counter() - start, 3)
        val = _val_loss(student, student_input, clam, tiles, val_ids, labels, n_rows) if val_ids and n_rows else math.nan
        history.append({"epoch": epoch, "train_loss": round(float(np.mean(losses)), 5), "val_loss": round(val, 5),
                        "seconds": seconds, "peak_mb": meter.peak_mb,
                        "trainable_params": count(trainable), "encoder_params": encoder_params})
        if not math.isnan(val) and val < best[0]:
            best = (val, (copy.deepcopy(student.state_dict()), copy.deepcopy(clam.state_dict())))
    if best[1] is not None:
        student.load_state_dict(best[1][0])
        clam.load_state_dict(best[1][1])
    student.eval()
    clam.eval()
    return student, clam, history


def pick_rows(clam, stored, label: int, k_tiles: int, attended: float, rng: np.random.Generator) -> np.ndarray:
    """The bag rows an End2end step re-reads with gradients: the ``attended`` share of ``k_tiles`` the current
    CLAM attends to most (for the bag's label on a multi-branch CLAM), the rest at random from the others.

    A focal lesion is a few tiles of thousands; k random tiles rarely include one, so the encoder would
    never be tuned on the tiles that decide the slide. The attended ones are those, once CLAM has
    learned where to look (End2end starts from the trained Retrain CLAM).
    """
    import torch

    n = len(stored)
    k = min(k_tiles, n)
    n_top = min(k, int(round(attended * k)))
    top = np.zeros(0, np.int64)
    if n_top:
        was_training = clam.training
        clam.eval()
        with torch.no_grad():
            attention = clam.embed(stored)[1]
        clam.train(was_training)
        branch = attention[label] if attention.shape[0] > 1 else attention[0]
        top = torch.topk(branch.float(), n_top).indices.cpu().numpy()
    rest = np.setdiff1d(np.arange(n), top)
    return np.sort(np.concatenate([top, rng.choice(rest, k - n_top, replace=False)]))


def _refresh_bags(student, student_input: dict, tiles: TileFn, slide_ids: list[str], n_rows: Callable[[str], int],
                  folder: Path, cache_bytes: int) -> BagFn:
    """Re-embed the training bags with the current encoder into ``folder`` (float16 .npy); a lazy reader over them."""
    from mil.bags import BagCache
    from wsi.files import write_npy

    if n_rows is None:
        raise ValueError("refreshing End2end's training bags needs n_rows (the slides' tile counts)")
    student.eval()
    for slide_id in slide_ids:
        write_npy(folder / f"{slide_id}.npy", embed_bag(student, student_input, tiles, slide_id, n_rows(slide_id)).astype(np.float16))
    student.train()
    return BagCache(lambda slide_id: np.load(folder / f"{slide_id}.npy"), cache_bytes)


def _val_loss(student, student_input: dict, clam, tiles: TileFn, val_ids: list[str], labels: dict[str, int],
              n_rows: Callable[[str], int]) -> float:
    """CLAM's validation loss on bags re-embedded whole by the current encoder; both return to training mode."""
    from mil.train import val_loss

    student.eval()
    fresh = lambda slide_id: embed_bag(student, student_input, tiles, slide_id, n_rows(slide_id))  # noqa: E731 (one at a time)
    loss = val_loss(clam, fresh, list(val_ids), labels)
    student.train()
    return loss


def save_encoder(student, finetune: str, path: Path) -> Path:
    """What a fine-tuned encoder needs to be rebuilt: LoRA adapters + head, FPT's trained parts, or the whole student."""
    from features.store import save_safetensors

    path = Path(path)
    if finetune == "lora":
        from mil.finetune.lora import save_adapter

        return save_adapter(student, path.with_name(path.name + ".adapter.safetensors"))
    state = student.state_dict()
    if finetune == "fpt":
        state = {k: v for k, v in state.items() if not k.startswith("frozen.")}
    save_safetensors(state, path.with_name(path.name + ".safetensors"))
    return path.with_name(path.name + ".safetensors")


def embed_bag(student, student_input: dict, tiles: TileFn, slide_id: str, n_rows: int, batch: int = 64) -> np.ndarray:
    """All of a slide's features recomputed with a (fine-tuned) student, batch by batch, on its device; on a CPU each
    batch on one thread, several at once (:mod:`features.batch_threads`): the same bits whatever the cores."""
    import torch

    from features.batch_threads import model_batches
    from mil.train import model_device

    device = model_device(student)
    threads = torch.get_num_threads()

    def encode(rows_and_tiles):
        with torch.inference_mode():
            return student(_to_input(rows_and_tiles[1], **student_input, device=device)).float().cpu().numpy()

    read = ((rows, tiles(slide_id, rows)) for rows in (np.arange(start, min(n_rows, start + batch))
                                                       for start in range(0, n_rows, batch)))  # in this thread
    out = [feats for _, feats, _ in model_batches(student, read, encode, threads,
                                                  1 if device.type == "cpu" else threads)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
