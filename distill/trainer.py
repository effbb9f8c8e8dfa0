"""Feature Projection Distillation trainer (EFCM stage 1): unsupervised, teacher targets from its store.

Tiles are sampled across slides (labels unused); each training tile's target is the teacher's
stored feature for the same coordinates, so the teacher never runs again. AdamW with warm-up and
a cosine schedule, autocast at the precision that is fast on the device, gradient clipping, seeded sampling, validation on
held-out slides (cosine and R² to the teacher), early stopping, and a checkpoint every epoch so a
killed distillation resumes from its last finished epoch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill.config import DistillConfig
from distill.fidelity import fidelity
from distill.pools import SlideTiles, draw_weights, prepare_pools, split_pools
from distill.sampling import TileErrors, epoch_draws
from distill.tiles import DistillTiles, augment
from features.precision import autocast_dtype, resolve_precision
from features.store import save_safetensors
from features.tile_loader import batch_loader, resolve_loader
from wsi.files import atomic_write, write_json

log = logging.getLogger(__name__)


def evaluate(model, loader, prep: dict, device, labels: np.ndarray | None = None,
             weights: np.ndarray | None = None) -> dict:
    """Fidelity of the model's teacher-space features to the teacher's on held-out tiles: cosine and R²
    overall, per teacher-feature cluster (``labels``, in the loader's order) and on the worst tiles;
    ``weights``: each tile's importance weight (:func:`distill.fidelity.stratified_sample`); ``prep``: the
    student's preprocessing (``to_model_input``'s size, mean, std, resize, interpolation)."""
    import torch

    from features.encoders import to_model_input

    preds, targets = [], []
    model.eval()
    with torch.inference_mode():
        for tiles, target, _ in loader:
            preds.append(model(to_model_input(tiles, device=device, **prep)).float().cpu())
            targets.append(target)
    model.train()
    if not preds:
        return {"cosine": float("nan"), "r2": float("nan"), "n": 0}
    return fidelity(torch.cat(preds).numpy(), torch.cat(targets).numpy(), labels, weights)


def without_clusters(record: dict) -> dict:
    """A metrics record without its per-cluster table (kept once, for the best epoch, in the card)."""
    return {k: v for k, v in record.items() if k != "clusters"}


def held_out_score(metrics: dict, select: str) -> float | None:
    """The number that picks the best epoch (``distill.select``); None without held-out tiles."""
    if not metrics.get("n"):
        return None
    if select == "cosine" or select not in metrics:  # too few held-out tiles per cluster: the average decides
        return metrics["cosine"]
    return metrics[select]


def verdict(best: dict, cfg: DistillConfig, epochs_run: int, best_epoch: int, on_training_slides: list[int] = ()) -> dict:
    """Has the student learned the rare tissue? From the best epoch's worst cluster, in words a user can act on."""
    worst = best.get("worst_cluster_r2")
    if worst is None:
        return {"faithful": None, "message": "too few held-out tiles per cluster to judge the rare tissue "
                                             "(raise distill.max_val_tiles or hold out more slides)"}
    where = (f" (clusters {', '.join(f'#{c}' for c in on_training_slides)} scored on tiles held out from training "
             f"slides: no held-out slide had enough of them)" if on_training_slides else "")
    if worst >= cfg.rare_r2_target:
        return {"faithful": True, "worst_cluster_r2": worst, "target": cfg.rare_r2_target,
                "message": f"faithful on every tissue cluster: worst held-out cluster R² {worst:.3f} ≥ "
                           f"{cfg.rare_r2_target}{where}"}
    why = (f"it was still improving at the distill.epochs ceiling ({epochs_run}): raise distill.epochs"
           if best_epoch == epochs_run else
           f"it stopped improving (best epoch {best_epoch} of {epochs_run}): a larger student or input size, "
           f"or more tiles of that tissue, may reproduce it")
    return {"faithful": False, "worst_cluster_r2": worst, "target": cfg.rare_r2_target,
            "message": f"NOT faithful on rare tissue: worst held-out cluster (#{best.get('worst_cluster')}) R² "
                       f"{worst:.3f} < {cfg.rare_r2_target}{where}; {why}. Slides whose diagnosis rests on such "
                       f"tissue may be misread by Reuse"}


def lr_factor(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def atomic_torch_save(obj, path: Path) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


@dataclass
class Resumed:
    """What a checkpoint of the same fingerprint gives back (nothing when training starts afresh)."""

    state: dict
    best_weights: dict
    epoch: int | None = None  # the epoch it resumes after
    tile_errors: np.ndarray | None = None


def resume(ckpt: Path, fingerprint: str, model, optimizer, scheduler) -> Resumed:
    """Load the last epoch's checkpoint into ``model``, ``optimizer`` and ``scheduler`` when its fingerprint is this
    run's; else a fresh start (epoch 0's weights as the best so far)."""
    import torch

    fresh = Resumed({"epoch": 0, "best_score": -math.inf, "best_epoch": 0, "bad_epochs": 0, "history": []},
                    {k: v.detach().clone() for k, v in model.state_dict().items()})
    if not ckpt.exists():
        return fresh
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    if saved.get("fingerprint") != fingerprint or "model" not in saved:  # (an older layout kept weights apart)
        return fresh
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state = json.loads(saved["progress"])
    log.info("distillation resumes after epoch %d", state["epoch"])
    return Resumed(state, saved["best_model"], state["epoch"], saved.get("tile_errors", torch.zeros(0)).numpy())


def student_inputs(cfg: DistillConfig, data_cfg: dict) -> dict:
    """How tiles become the student's input: size, normalisation, resize and interpolation (a zoo student's own)."""
    input_size = cfg.student.input_size or int(data_cfg["input_size"][-1])
    return {"size": input_size, "mean": tuple(cfg.student.mean or data_cfg["mean"]),
            "std": tuple(cfg.student.std or data_cfg["std"]), "resize": cfg.student.resize or data_cfg.get("resize") or input_size,
            "interpolation": cfg.student.interpolation or data_cfg.get("interpolation") or "bilinear"}


@dataclass
class Step:
    """One optimisation step's parts: the model, its loss, optimiser, scheduler, precision and input preparation."""

    model: object
    loss_fn: object
    optimizer: object
    scheduler: object
    autocast: object
    scaler: object
    prep: dict
    device: object
    cfg: DistillConfig

    def epoch(self, loader, errors: TileErrors, generator) -> tuple[list[float], float, float]:
        """Train one epoch over ``loader``: (losses, seconds training, seconds waiting for the loader's tiles)."""
        import torch

        from features.encoders import to_model_input

        start, losses, waited = time.perf_counter(), [], 0.0
        ready = start
        for tiles, target, rows in loader:
            waited += time.perf_counter() - ready  # the step waited this long for the loader's tiles
            x = to_model_input(tiles, device=self.device, **self.prep)
            if self.cfg.augment:
                x = augment(x, generator)
            with self.autocast:
                prediction, stats = self.model.outputs(x)
            per_tile = self.loss_fn.per_tile(prediction, target.to(self.device), stats, self.model)
            loss = per_tile.mean()
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            losses.append(loss.item())
            errors.update(rows.numpy(), per_tile.detach().float().cpu().numpy())
            ready = time.perf_counter()
        return losses, time.perf_counter() - start, waited


def keep_best(state: dict, record: dict, score: float, cfg: DistillConfig) -> bool:
    """Update ``state`` with an epoch's ``score``: whether it is the best so far (kept), and patience, which only a
    gain of ``min_delta`` over the last progress resets."""
    best = score > state["best_score"]
    if best:
        state["bad_epochs"] = 0 if score >= state.get("progress_score", -math.inf) + cfg.min_delta else state["bad_epochs"] + 1
        state.update(best_score=score, best_epoch=record["epoch"], best=record)
    else:
        state["bad_epochs"] += 1
    if state["bad_epochs"] == 0:
        state["progress_score"] = score
    return best


def train(slides: list[SlideTiles], teacher_dim: int, cfg: DistillConfig, out_dir: Path, *,
          fingerprint: str = "", teacher: dict | None = None, on_epoch=None) -> dict:
    """Distil; writes ``out_dir/student.safetensors`` + ``student.json`` and returns the card.

    ``out_dir/checkpoint/state.pt`` holds the last epoch's weights, the best epoch's, the optimiser, scheduler and
    progress, in one file renamed into place each epoch (a kill never pairs one epoch's weights with another's
    optimiser); a run with the same ``fingerprint`` resumes from it.
    """
    import torch

    from distill.model import build_student
    from distill.student import FPDLoss
    from features.encoders import pick_device

    out_dir = Path(out_dir)
    ckpt = out_dir / "checkpoint" / "state.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.student.device)
    model, data_cfg = build_student(cfg, teacher_dim)
    model = model.to(device)
    prep = student_inputs(cfg, data_cfg)
    tile_input = prep["size"] if cfg.read_at_input else None
    train_pool, val_pool, val_slides = split_pools(slides, cfg)
    if len(train_pool) == 0:
        raise ValueError("no training tiles: every slide has zero tiles or was held out")
    if cfg.whiten:  # the teacher's per-tile mean and std over the pool, to map predictions back to teacher space
        t = np.concatenate([slides[s].targets[r][None] for s, r in train_pool[:4096]]).astype(np.float32)
        model.set_target_stats(torch.from_numpy(t).to(device))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(cfg.tiles_per_epoch / cfg.batch_size)
    total, warmup = steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup))
    workers = cfg.num_workers if cfg.num_workers is not None else (0 if device.type == "cpu" else 2)
    loader_kwargs = dict(batch_size=cfg.batch_size, workers=workers, pin_memory=device.type == "cuda")
    resumed = resume(ckpt, fingerprint, model, optimizer, scheduler)
    state, best_weights = resumed.state, resumed.best_weights
    pools = prepare_pools(slides, train_pool, val_pool, cfg, ckpt.parent, resume=resumed.epoch is not None)
    weights = draw_weights(pools.train_labels, cfg)
    errors = TileErrors(len(pools.train), resumed.tile_errors)
    val_loader = batch_loader(DistillTiles(slides, pools.val, tile_input, cache_mb=cfg.tile_cache_mb), **loader_kwargs)
    train_tiles = DistillTiles(slides, pools.train, tile_input, cache_mb=cfg.tile_cache_mb)
    if resumed.epoch is None:
        initial = evaluate(model, val_loader, prep, device, pools.val_labels, pools.val_weights)
        state["history"].append({"epoch": 0, **without_clusters(initial)})
    precision = resolve_precision(cfg.precision, device)
    step = Step(model, FPDLoss(beta=cfg.loss_beta, cosine_weight=cfg.cosine_weight, whiten=cfg.whiten,
                               stats_weight=cfg.stats_weight), optimizer, scheduler,
                torch.autocast(device.type, dtype=autocast_dtype(precision) or torch.float32, enabled=precision != "fp32"),
                torch.amp.GradScaler(device.type, enabled=precision == "fp16"), prep, device, cfg)  # fp16 needs scaling
    generator = torch.Generator().manual_seed(cfg.seed)
    model.train()
    while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:
        epoch = state["epoch"] + 1
        generator.manual_seed(cfg.seed * 1000 + epoch)  # resumable: each epoch's sampling depends only on its number
        draws = epoch_draws(len(pools.train), cfg.tiles_per_epoch, weights, errors, cfg.hard_mining,
                            np.random.default_rng(cfg.seed * 1000 + epoch))
        start = time.perf_counter()
        losses, seconds, waited = step.epoch(batch_loader(train_tiles.epoch(draws), **loader_kwargs), errors, generator)
        metrics = evaluate(model, val_loader, prep, device, pools.val_labels, pools.val_weights)
        record = {"epoch": epoch, "loss": round(float(np.mean(losses)), 5), "seconds": round(time.perf_counter() - start, 2),
                  "train_seconds": round(seconds, 2), "wait_seconds": round(waited, 2), **metrics}
        state["history"].append(without_clusters(record))
        state["epoch"] = epoch
        score = held_out_score(metrics, cfg.select)
        if keep_best(state, record, -record["loss"] if score is None else score, cfg):  # no held-out tiles: the loss
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # one file, renamed into place: the weights, the best epoch's, the optimiser and the progress of one epoch
        atomic_torch_save({"fingerprint": fingerprint, "model": model.state_dict(), "best_model": best_weights,
                           "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                           "progress": json.dumps(state), "tile_errors": torch.from_numpy(errors.errors)}, ckpt)
        log.info("distill epoch %d: loss %.4f, held-out cosine %.4f, R² %.4f, worst cluster R² %s", epoch, record["loss"],
                 metrics["cosine"], metrics["r2"], metrics.get("worst_cluster_r2"))
        if on_epoch is not None:
            on_epoch(record)
    model.load_state_dict(best_weights)
    card = student_card(model, cfg, state, pools, slides, val_slides, prep, teacher, teacher_dim, precision,
                        "none" if not workers else resolve_loader("auto"), fingerprint, resumed.epoch)
    save_safetensors(model.state_dict(), out_dir / "student.safetensors", metadata={"card": "student.json"})
    write_json(out_dir / "student.json", card)
    return card


def student_card(model, cfg: DistillConfig, state: dict, pools, slides: list[SlideTiles], val_slides: list[str], prep: dict,
                 teacher: dict | None, teacher_dim: int, precision: str, loader: str, fingerprint: str,
                 resumed_from: int | None) -> dict:
    """The student's card: how it was built and trained, on what, its best epoch's fidelity and the verdict."""
    from distill.model import param_counts

    best_record = state.get("best", state["history"][-1])
    return {
        "kind": "wsi-pipeline distilled student",
        "student": cfg.student.model_dump(mode="json"), "student_init": cfg.student.weights_source(cfg.seed),
        "precision": precision, "loader": loader,
        "projector": cfg.projector, "projector_width": cfg.projector_width,
        "whiten": cfg.whiten, "dewhiten_head": model.stats_head is not None, "teacher": teacher or {}, "teacher_dim": teacher_dim,
        "input_size": prep["size"], "read_at_input": cfg.read_at_input, "mean": list(prep["mean"]), "std": list(prep["std"]),
        "resize": prep["resize"], "interpolation": prep["interpolation"],
        "params": param_counts(model),
        "data": {"slides": [s.slide_id for s in slides], "val_slides": val_slides,
                 "train_tiles": int(len(pools.train)), "val_tiles": int(len(pools.val)),
                 "held_out_training_tiles": pools.held_out_training_tiles},
        "metrics": {"initial": state["history"][0], "best": without_clusters(best_record), "selected_by": cfg.select,
                    "best_epoch": state["best_epoch"], "epochs_run": state["epoch"], "resumed_from_epoch": resumed_from},
        "fidelity": {"clusters": best_record.get("clusters", {}), "n_clusters": len(pools.clusters.centres),
                     "scored_on_training_slides": pools.topped_up,
                     "verdict": verdict(best_record, cfg, state["epoch"], state["best_epoch"], pools.topped_up)},
        "history": state["history"], "config": cfg.model_dump(mode="json"), "fingerprint": fingerprint,
    }
