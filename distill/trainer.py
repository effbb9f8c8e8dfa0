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
from features.precision import autocast_dtype, resolve_precision
from features.store import save_safetensors
from wsi.files import atomic_write, write_json

log = logging.getLogger(__name__)


@dataclass
class SlideTiles:
    """One slide's contribution: where to read its tiles and the teacher's features for them."""

    slide_id: str
    slide_path: Path
    mpp: float
    plan: object  # wsi.tiling.ReadPlan
    coords: np.ndarray  # (n, 2)
    targets: np.ndarray  # (n, D) teacher features, float16
    backend: str = "auto"  # the slide reader the teacher's features were extracted with (slides.backend)


class DistillTiles:
    """(tile uint8, teacher feature) pairs over several slides, read through one :class:`wsi.slide.SlidePool`."""

    def __init__(self, slides: list[SlideTiles], index: np.ndarray, input_size: int | None = None):
        from wsi.slide import SlidePool, SlideSource

        self.slides, self.index = slides, index  # index rows: (slide number, row)
        self.input_size = input_size  # read at the student's input resolution (distill.read_at_input), else as tiled
        self.pool = SlidePool([SlideSource(s.slide_id, s.slide_path, s.mpp, s.backend) for s in slides])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        import torch

        s, row = (int(v) for v in self.index[i])
        part = self.slides[s]
        x, y = part.coords[row]
        tile = np.array(self.pool.read_tile(part.slide_id, x, y, part.plan, self.input_size))
        return torch.from_numpy(tile), torch.from_numpy(part.targets[row].astype(np.float32))


def split_pools(slides: list[SlideTiles], cfg: DistillConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Training and validation (slide, row) pools: held-out slides when there are ≥ 4, else held-out tiles."""
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(slides))
    n_val = max(1, round(cfg.val_fraction * len(slides))) if len(slides) >= 4 else 0
    val_slides = set(order[:n_val].tolist())
    train, val = [], []
    for s, part in enumerate(slides):
        rows = np.stack([np.full(len(part.coords), s), np.arange(len(part.coords))], axis=1)
        if s in val_slides:
            val.append(rows)
        elif n_val:
            train.append(rows)
        else:  # too few slides: hold out a fraction of each slide's tiles
            perm = rng.permutation(len(rows))
            cut = max(1, int(round(cfg.val_fraction * len(rows))))
            val.append(rows[perm[:cut]])
            train.append(rows[perm[cut:]])
    train_pool = np.concatenate(train) if train else np.zeros((0, 2), np.int64)
    val_pool = np.concatenate(val) if val else np.zeros((0, 2), np.int64)
    if len(train_pool) > cfg.max_train_tiles:
        train_pool = train_pool[rng.choice(len(train_pool), cfg.max_train_tiles, replace=False)]
    if len(val_pool) > cfg.max_val_tiles:
        val_pool = val_pool[rng.choice(len(val_pool), cfg.max_val_tiles, replace=False)]
    return train_pool, val_pool, [slides[s].slide_id for s in sorted(val_slides)]


def draw_weights(slides: list[SlideTiles], pool: np.ndarray, cfg: DistillConfig) -> np.ndarray | None:
    """Each pool tile's probability of being drawn, or None for uniform draws (``distill.balance``).

    Label-free balancing: k-means (seeded) on the LayerNorm-whitened teacher features, and every cluster
    drawn in proportion to the square root of its size. Rare tissue that the CLAM attends to, such as a
    small tumour focus, then gets far more steps than its share of tiles, and no tiny cluster (a pen mark)
    takes over an epoch.
    """
    if cfg.balance == "none" or len(pool) < 2 * cfg.balance_clusters:
        return None
    from sklearn.cluster import MiniBatchKMeans

    feats = np.empty((len(pool), slides[0].targets.shape[1]), np.float32)
    for i, (s, r) in enumerate(pool):
        feats[i] = slides[s].targets[r]
    feats -= feats.mean(axis=1, keepdims=True)  # whitened like the targets, in place (the pool can be large)
    feats /= feats.std(axis=1, keepdims=True) + 1e-5
    labels = MiniBatchKMeans(n_clusters=cfg.balance_clusters, random_state=cfg.seed, n_init=3,
                             batch_size=2048).fit_predict(feats)
    sizes = np.bincount(labels, minlength=cfg.balance_clusters).astype(np.float64)
    weights = sizes[labels] ** -0.5  # a cluster's total share ∝ sqrt(its size)
    return weights / weights.sum()


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


def evaluate(model, loader, input_size, mean, std, device) -> dict:
    """Cosine similarity and R² of the model's teacher-space features to the teacher's, on held-out tiles."""
    import torch
    import torch.nn.functional as F

    from features.encoders import to_model_input

    preds, targets = [], []
    model.eval()
    with torch.inference_mode():
        for tiles, target in loader:
            preds.append(model(to_model_input(tiles, input_size, mean, std, device)).float().cpu())
            targets.append(target)
    model.train()
    if not preds:
        return {"cosine": float("nan"), "r2": float("nan"), "n": 0}
    p, t = torch.cat(preds), torch.cat(targets)
    cosine = F.cosine_similarity(p, t, dim=-1).mean().item()
    r2 = 1 - ((t - p) ** 2).sum().item() / max(((t - t.mean(0)) ** 2).sum().item(), 1e-12)
    return {"cosine": round(cosine, 5), "r2": round(r2, 5), "n": len(t)}


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

    ``out_dir/checkpoint/`` holds the last epoch's model and optimiser state; a run with the same
    ``fingerprint`` resumes from it.
    """
    import torch
    from safetensors.torch import load_file

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
    loader_kwargs = dict(batch_size=cfg.batch_size, num_workers=workers,
                         **({"persistent_workers": False, "prefetch_factor": 4} if workers else {}))
    val_loader = torch.utils.data.DataLoader(DistillTiles(slides, val_pool, tile_input), shuffle=False, **loader_kwargs)

    state = {"epoch": 0, "best_cosine": -2.0, "best_epoch": 0, "bad_epochs": 0, "history": []}
    resumed_from = None
    if (ckpt_dir / "state.pt").exists() and (ckpt_dir / "last.safetensors").exists():
        saved = torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=True)
        if saved.get("fingerprint") == fingerprint:
            model.load_state_dict(load_file(str(ckpt_dir / "last.safetensors")))
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            state = json.loads(saved["progress"])
            resumed_from = state["epoch"]
            log.info("distillation resumes after epoch %d", resumed_from)
    # the draw weights of the run that is resumed, so its remaining epochs draw what an uninterrupted run would
    # (k-means is seeded, but another scikit-learn or BLAS could cluster a little differently)
    weights_file = ckpt_dir / "draw_weights.npy"
    weights = np.load(weights_file) if resumed_from is not None and weights_file.exists() else None
    if weights is None or len(weights) != len(train_pool):
        weights = draw_weights(slides, train_pool, cfg)
        if weights is not None:
            atomic_write(weights_file, lambda f: np.save(f, weights))
    if resumed_from is None:
        initial = evaluate(model, val_loader, input_size, mean, std, device)
        state["history"].append({"epoch": 0, **initial})
    precision = resolve_precision(cfg.precision, device)
    autocast = torch.autocast(device.type, dtype=autocast_dtype(precision) or torch.float32, enabled=precision != "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 gradients underflow unscaled
    generator = torch.Generator().manual_seed(cfg.seed)
    model.train()
    while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:
        epoch = state["epoch"] + 1
        generator.manual_seed(cfg.seed * 1000 + epoch)  # resumable: each epoch's sampling depends only on its number
        draw = np.random.default_rng(cfg.seed * 1000 + epoch)
        rows = train_pool[draw.integers(0, len(train_pool), cfg.tiles_per_epoch) if weights is None
                          else draw.choice(len(train_pool), cfg.tiles_per_epoch, p=weights)]
        loader = torch.utils.data.DataLoader(DistillTiles(slides, rows, tile_input), shuffle=False, **loader_kwargs)
        start, losses, waited = time.perf_counter(), [], 0.0
        ready = start
        for tiles, target in loader:
            waited += time.perf_counter() - ready  # the step waited this long for the loader's tiles
            x = to_model_input(tiles, input_size, mean, std, device)
            if cfg.augment:
                x = augment(x, generator)
            with autocast:
                prediction, stats = model.outputs(x)
            loss = loss_fn(prediction, target.to(device), stats, model)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(loss.item())
            ready = time.perf_counter()
        train_seconds = time.perf_counter() - start
        metrics = evaluate(model, val_loader, input_size, mean, std, device)
        record = {"epoch": epoch, "loss": round(float(np.mean(losses)), 5), "seconds": round(time.perf_counter() - start, 2),
                  "train_seconds": round(train_seconds, 2), "wait_seconds": round(waited, 2), **metrics}
        state["history"].append(record)
        state["epoch"] = epoch
        score = metrics["cosine"] if metrics["n"] else -record["loss"]  # no held-out tiles: training loss decides
        if score > state["best_cosine"]:
            state.update(best_cosine=score, best_epoch=epoch, bad_epochs=0)
            save_safetensors(model.state_dict(), ckpt_dir / "best.safetensors")
        else:
            state["bad_epochs"] += 1
        save_safetensors(model.state_dict(), ckpt_dir / "last.safetensors")
        atomic_torch_save({"fingerprint": fingerprint, "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "progress": json.dumps(state)}, ckpt_dir / "state.pt")
        log.info("distill epoch %d: loss %.4f, val cosine %.4f, R² %.4f", epoch, record["loss"], metrics["cosine"], metrics["r2"])
        if on_epoch is not None:
            on_epoch(record)

    best = load_file(str(ckpt_dir / "best.safetensors"))
    model.load_state_dict(best)
    card = {
        "kind": "wsi-pipeline distilled student",
        "student": cfg.student.model_dump(mode="json"), "student_init": cfg.student.weights_source(cfg.seed),
        "precision": precision,
        "projector": cfg.projector, "projector_width": cfg.projector_width,
        "whiten": cfg.whiten, "dewhiten_head": model.stats_head is not None, "teacher": teacher or {}, "teacher_dim": teacher_dim,
        "input_size": input_size, "read_at_input": cfg.read_at_input, "mean": list(mean), "std": list(std),
        "params": param_counts(model),
        "data": {"slides": [s.slide_id for s in slides], "val_slides": val_slides,
                 "train_tiles": int(len(train_pool)), "val_tiles": int(len(val_pool))},
        "metrics": {"initial": state["history"][0], "best": next(h for h in state["history"] if h["epoch"] == state["best_epoch"]),
                    "best_epoch": state["best_epoch"], "epochs_run": state["epoch"], "resumed_from_epoch": resumed_from},
        "history": state["history"], "config": cfg.model_dump(mode="json"), "fingerprint": fingerprint,
    }
    save_safetensors(model.state_dict(), out_dir / "student.safetensors", metadata={"card": "student.json"})
    write_json(out_dir / "student.json", card)
    return card
