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
import threading
import time
from pathlib import Path

import numpy as np

from distill.config import DistillConfig
from distill.fidelity import fidelity
from distill.pools import SlideTiles, draw_weights, prepare_pools, split_pools
from distill.sampling import TileErrors, epoch_draws
from features.precision import autocast_dtype, resolve_precision
from features.store import save_safetensors
from features.tile_loader import batch_loader, resolve_loader
from wsi.files import atomic_write, write_json

log = logging.getLogger(__name__)


class EpochTiles:
    """One epoch's draws over a :class:`DistillTiles` (its cache and byte count shared across epochs)."""

    def __init__(self, tiles: DistillTiles, draws: np.ndarray):
        self.tiles, self.draws = tiles, draws

    def __len__(self) -> int:
        return len(self.draws)

    def __getitem__(self, k: int):
        return self.tiles[int(self.draws[k])]


class DistillTiles:
    """(tile uint8, teacher feature, pool index) over several slides, read through one :class:`wsi.slide.SlidePool`.

    ``index`` rows are (slide number, row). Decoded tiles are kept in memory up to ``cache_mb``, so a tile
    drawn again in a later epoch costs no read — in the training process (a CPU's default) or its loader
    threads; loader processes (a GPU's) are started per epoch and read afresh.
    """

    def __init__(self, slides: list[SlideTiles], index: np.ndarray, input_size: int | None = None, cache_mb: float = 0):
        from wsi.slide import SlidePool, SlideSource

        self.slides, self.index = slides, index
        self.input_size = input_size  # read at the student's input resolution (distill.read_at_input), else as tiled
        self.pool = SlidePool([SlideSource(s.slide_id, s.slide_path, s.mpp, s.backend) for s in slides])
        self.cache: dict[int, np.ndarray] = {}
        self.cache_bytes, self.cache_limit = 0, int(cache_mb * 2**20)
        self._lock = threading.Lock()  # loader threads share the cache (:mod:`features.tile_loader`)

    def __getstate__(self) -> dict:  # loader processes get their own, empty lock
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def epoch(self, draws: np.ndarray) -> EpochTiles:
        """The same tiles and cache, drawing ``draws`` (pool indices) this epoch."""
        return EpochTiles(self, draws)

    def __len__(self) -> int:
        return len(self.index)

    def tile(self, i: int) -> np.ndarray:
        tile = self.cache.get(i)
        if tile is None:
            s, row = (int(v) for v in self.index[i])
            part = self.slides[s]
            x, y = part.coords[row]
            tile = np.array(self.pool.read_tile(part.slide_id, x, y, part.plan, self.input_size))
            with self._lock:
                if i not in self.cache and self.cache_bytes + tile.nbytes <= self.cache_limit:
                    self.cache[i] = tile
                    self.cache_bytes += tile.nbytes
        return tile

    def __getitem__(self, i: int):
        import torch

        s, row = (int(v) for v in self.index[i])
        return torch.from_numpy(self.tile(i)), torch.from_numpy(self.slides[s].targets[row].astype(np.float32)), i


def augment(x, generator):
    """Histology-safe augmentations on a normalised batch (B, 3, H, W): flips, rot90, light jitter."""
    import torch

    b = x.shape[0]
    flip_h = torch.rand(b, generator=generator) < 0.5
    flip_v = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip_h[:, None, None, None], x.flip(-1), x)
    x = torch.where(flip_v[:, None, None, None], x.flip(-2), x)
    k = int(torch.randint(0, 4, (1,), generator=generator))
    x = torch.rot90(x, k, dims=(-2, -1))
    scale = 1 + 0.1 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    shift = 0.1 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    return x * scale + shift


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


def train(slides: list[SlideTiles], teacher_dim: int, cfg: DistillConfig, out_dir: Path, *,
          fingerprint: str = "", teacher: dict | None = None, on_epoch=None) -> dict:
    """Distil; writes ``out_dir/student.safetensors`` + ``student.json`` and returns the card.

    ``out_dir/checkpoint/state.pt`` holds the last epoch's weights, the best epoch's, the optimiser, scheduler and
    progress, in one file renamed into place each epoch (a kill never pairs one epoch's weights with another's
    optimiser); a run with the same ``fingerprint`` resumes from it.
    """
    import torch

    from distill.model import build_student, param_counts
    from features.encoders import pick_device, to_model_input

    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoint"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.student.device)
    model, data_cfg = build_student(cfg, teacher_dim)
    model = model.to(device)
    input_size = cfg.student.input_size or int(data_cfg["input_size"][-1])
    mean, std = tuple(cfg.student.mean or data_cfg["mean"]), tuple(cfg.student.std or data_cfg["std"])
    resize = cfg.student.resize or data_cfg.get("resize") or input_size  # a zoo student's own crop and interpolation
    interpolation = cfg.student.interpolation or data_cfg.get("interpolation") or "bilinear"
    prep = {"size": input_size, "mean": mean, "std": std, "resize": resize, "interpolation": interpolation}
    tile_input = input_size if cfg.read_at_input else None

    train_pool, val_pool, val_slides = split_pools(slides, cfg)
    if len(train_pool) == 0:
        raise ValueError("no training tiles: every slide has zero tiles or was held out")
    if cfg.whiten:  # the teacher's per-tile mean and std over the pool, to map predictions back to teacher space
        t = np.concatenate([slides[s].targets[r][None] for s, r in train_pool[:4096]]).astype(np.float32)
        model.set_target_stats(torch.from_numpy(t).to(device))
    from distill.student import FPDLoss

    loss_fn = FPDLoss(beta=cfg.loss_beta, cosine_weight=cfg.cosine_weight, whiten=cfg.whiten, stats_weight=cfg.stats_weight)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(cfg.tiles_per_epoch / cfg.batch_size)
    total, warmup = steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup))
    workers = cfg.num_workers if cfg.num_workers is not None else (0 if device.type == "cpu" else 2)
    loader_kwargs = dict(batch_size=cfg.batch_size, workers=workers, pin_memory=device.type == "cuda")
    state = {"epoch": 0, "best_score": -math.inf, "best_epoch": 0, "bad_epochs": 0, "history": []}
    resumed_from, saved = None, None
    best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}  # epoch 0's, until one is better
    if (ckpt_dir / "state.pt").exists():
        saved = torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=True)
        if saved.get("fingerprint") == fingerprint and "model" in saved:  # (an older layout kept weights apart)
            model.load_state_dict(saved["model"])
            best_weights = saved["best_model"]
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            state = json.loads(saved["progress"])
            resumed_from = state["epoch"]
            log.info("distillation resumes after epoch %d", resumed_from)
        else:
            saved = None
    pools = prepare_pools(slides, train_pool, val_pool, cfg, ckpt_dir, resume=resumed_from is not None)
    train_pool, val_pool, val_labels, val_weights, clusters = (pools.train, pools.val, pools.val_labels, pools.val_weights,
                                                               pools.clusters)
    weights = draw_weights(pools.train_labels, cfg)
    errors = TileErrors(len(train_pool), None if saved is None else saved.get("tile_errors", torch.zeros(0)).numpy())
    val_loader = batch_loader(DistillTiles(slides, val_pool, tile_input, cache_mb=cfg.tile_cache_mb), **loader_kwargs)
    train_tiles = DistillTiles(slides, train_pool, tile_input, cache_mb=cfg.tile_cache_mb)
    if resumed_from is None:
        initial = evaluate(model, val_loader, prep, device, val_labels, val_weights)
        state["history"].append({"epoch": 0, **without_clusters(initial)})
    precision = resolve_precision(cfg.precision, device)
    autocast = torch.autocast(device.type, dtype=autocast_dtype(precision) or torch.float32, enabled=precision != "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 gradients underflow unscaled
    generator = torch.Generator().manual_seed(cfg.seed)
    model.train()
    while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:
        epoch = state["epoch"] + 1
        generator.manual_seed(cfg.seed * 1000 + epoch)  # resumable: each epoch's sampling depends only on its number
        draws = epoch_draws(len(train_pool), cfg.tiles_per_epoch, weights, errors, cfg.hard_mining,
                            np.random.default_rng(cfg.seed * 1000 + epoch))
        loader = batch_loader(train_tiles.epoch(draws), **loader_kwargs)  # processes, or threads in a daemonic worker
        start, losses, waited = time.perf_counter(), [], 0.0
        ready = start
        for tiles, target, rows in loader:
            waited += time.perf_counter() - ready  # the step waited this long for the loader's tiles
            x = to_model_input(tiles, device=device, **prep)
            if cfg.augment:
                x = augment(x, generator)
            with autocast:
                prediction, stats = model.outputs(x)
            per_tile = loss_fn.per_tile(prediction, target.to(device), stats, model)
            loss = per_tile.mean()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(loss.item())
            errors.update(rows.numpy(), per_tile.detach().float().cpu().numpy())
            ready = time.perf_counter()
        train_seconds = time.perf_counter() - start
        metrics = evaluate(model, val_loader, prep, device, val_labels, val_weights)
        record = {"epoch": epoch, "loss": round(float(np.mean(losses)), 5), "seconds": round(time.perf_counter() - start, 2),
                  "train_seconds": round(train_seconds, 2), "wait_seconds": round(waited, 2), **metrics}
        state["history"].append(without_clusters(record))
        state["epoch"] = epoch
        score = held_out_score(metrics, cfg.select)
        score = -record["loss"] if score is None else score  # no held-out tiles: training loss decides
        if score > state["best_score"]:  # the best epoch so far is kept; only a gain of min_delta resets patience
            state["bad_epochs"] = 0 if score >= state.get("progress_score", -math.inf) + cfg.min_delta else state["bad_epochs"] + 1
            state.update(best_score=score, best_epoch=epoch, best=record)
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        if state["bad_epochs"] == 0:
            state["progress_score"] = score
        # one file, renamed into place: the weights, the best epoch's, the optimiser and the progress of one epoch
        atomic_torch_save({"fingerprint": fingerprint, "model": model.state_dict(), "best_model": best_weights,
                           "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                           "progress": json.dumps(state), "tile_errors": torch.from_numpy(errors.errors)},
                          ckpt_dir / "state.pt")
        log.info("distill epoch %d: loss %.4f, held-out cosine %.4f, R² %.4f, worst cluster R² %s", epoch, record["loss"],
                 metrics["cosine"], metrics["r2"], metrics.get("worst_cluster_r2"))
        if on_epoch is not None:
            on_epoch(record)

    model.load_state_dict(best_weights)
    best_record = state.get("best", state["history"][-1])
    card = {
        "kind": "wsi-pipeline distilled student",
        "student": cfg.student.model_dump(mode="json"), "student_init": cfg.student.weights_source(cfg.seed),
        "precision": precision, "loader": resolve_loader("auto") if loader_kwargs["workers"] else "none",
        "projector": cfg.projector, "projector_width": cfg.projector_width,
        "whiten": cfg.whiten, "dewhiten_head": model.stats_head is not None, "teacher": teacher or {}, "teacher_dim": teacher_dim,
        "input_size": input_size, "read_at_input": cfg.read_at_input, "mean": list(mean), "std": list(std),
        "resize": resize, "interpolation": interpolation,
        "params": param_counts(model),
        "data": {"slides": [s.slide_id for s in slides], "val_slides": val_slides,
                 "train_tiles": int(len(train_pool)), "val_tiles": int(len(val_pool)),
                 "held_out_training_tiles": pools.held_out_training_tiles},
        "metrics": {"initial": state["history"][0], "best": without_clusters(best_record), "selected_by": cfg.select,
                    "best_epoch": state["best_epoch"], "epochs_run": state["epoch"], "resumed_from_epoch": resumed_from},
        "fidelity": {"clusters": best_record.get("clusters", {}), "n_clusters": len(clusters.centres),
                     "scored_on_training_slides": pools.topped_up,
                     "verdict": verdict(best_record, cfg, state["epoch"], state["best_epoch"], pools.topped_up)},
        "history": state["history"], "config": cfg.model_dump(mode="json"), "fingerprint": fingerprint,
    }
    save_safetensors(model.state_dict(), out_dir / "student.safetensors", metadata={"card": "student.json"})
    write_json(out_dir / "student.json", card)
    return card
