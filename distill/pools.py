"""The distillation's tile pools: which tiles train, which are held out and scored, and their clusters.

Labels are never used. Held-out slides give the validation tiles; k-means on the training pool's
whitened teacher features gives the clusters that balance the draws and score fidelity per tissue.
A rare tissue may be absent from the few held-out slides (a focal tumour on no held-out slide):
then some of its training tiles are held out instead (:func:`top_up_rare_clusters`), so the card can
judge it. The held-out tiles scored each epoch are a cluster-stratified sample with importance weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill.config import DistillConfig
from distill.fidelity import MIN_CLUSTER_TILES, TileClusters, stratified_sample
from distill.sampling import balance_weights
from wsi.files import atomic_write

RARE_HOLD_OUT_SHARE = 0.2  # at most this share of a cluster's training tiles is held out to score it
RARE_HELD_OUT_TILES = 2 * MIN_CLUSTER_TILES  # what the top-up aims for per cluster


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


def split_pools(slides: list[SlideTiles], cfg: DistillConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Training and validation (slide, row) pools: held-out slides when there are ≥ 4, else held-out tiles.

    The validation pool is every held-out tile; :func:`distill.fidelity.stratified_sample` picks the
    ``max_val_tiles`` that are scored, cluster by cluster.
    """
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
    return train_pool, val_pool, [slides[s].slide_id for s in sorted(val_slides)]


def pool_targets(slides: list[SlideTiles], pool: np.ndarray) -> np.ndarray:
    """The teacher features of a (slide, row) pool, (N, D) float32."""
    feats = np.empty((len(pool), slides[0].targets.shape[1]), np.float32)
    for i, (s, r) in enumerate(pool):
        feats[i] = slides[s].targets[r]
    return feats


def draw_weights(labels: np.ndarray, cfg: DistillConfig) -> np.ndarray | None:
    """Each training tile's probability of being drawn, or None for uniform draws (``distill.balance``):
    every cluster's share ∝ sqrt(its size) (:func:`distill.sampling.balance_weights`)."""
    if cfg.balance == "none" or len(labels) < 2 * cfg.balance_clusters:
        return None
    return balance_weights(labels, cfg.balance_clusters)


def pool_clusters(slides: list[SlideTiles], pool: np.ndarray, cfg: DistillConfig, ckpt_dir: Path, *,
                  resume: bool) -> tuple[TileClusters, np.ndarray]:
    """The k-means clusters of the training pool's teacher features and the pool's labels.

    Saved beside the checkpoint, so a resumed run draws and scores with the clusters it started with
    (k-means is seeded, but another scikit-learn or BLAS could cluster a little differently).
    """
    path = ckpt_dir / "clusters.npz"
    if resume and path.exists():
        saved = np.load(path)
        if len(saved["labels"]) == len(pool) and saved["setup"].tolist() == [cfg.balance_clusters, cfg.seed]:
            return TileClusters(saved["centres"]), saved["labels"]
    clusters, labels = TileClusters.fit(pool_targets(slides, pool), cfg.balance_clusters, cfg.seed)
    atomic_write(path, lambda f: np.savez(f, centres=clusters.centres, labels=labels,
                                          setup=np.array([cfg.balance_clusters, cfg.seed])))
    return clusters, labels


def top_up_rare_clusters(train_labels: np.ndarray, val_labels: np.ndarray, seed: int) -> np.ndarray:
    """Training-pool indices to hold out so every cluster has ``RARE_HELD_OUT_TILES`` held-out tiles where it can:
    at most ``RARE_HOLD_OUT_SHARE`` of the cluster's training tiles, none from a cluster too small to spare them."""
    rng = np.random.default_rng(seed + 7919)
    have = np.bincount(val_labels, minlength=train_labels.max() + 1) if len(val_labels) else np.zeros(train_labels.max() + 1, int)
    moved = []
    for c in np.unique(train_labels):
        rows = np.nonzero(train_labels == c)[0]
        want = min(RARE_HELD_OUT_TILES - have[c], int(RARE_HOLD_OUT_SHARE * len(rows)))
        if want > 0:
            moved.append(rng.choice(rows, want, replace=False))
    return np.sort(np.concatenate(moved)) if moved else np.zeros(0, np.int64)


@dataclass
class Pools:
    train: np.ndarray  # (slide, row) pairs the epochs draw from
    train_labels: np.ndarray  # their clusters
    val: np.ndarray  # the held-out (slide, row) pairs scored each epoch
    val_labels: np.ndarray | None
    val_weights: np.ndarray | None  # importance weights of the stratified sample
    clusters: TileClusters
    held_out_training_tiles: int = 0  # tiles of rare clusters moved from training to held out
    topped_up: list[int] = ()  # the clusters scored (partly) on those tiles


def prepare_pools(slides: list[SlideTiles], train: np.ndarray, val: np.ndarray, cfg: DistillConfig, ckpt_dir: Path, *,
                  resume: bool) -> Pools:
    """Cluster the training pool, top up rare clusters' held-out tiles, and pick the stratified validation sample."""
    clusters, labels = pool_clusters(slides, train, cfg, ckpt_dir, resume=resume)
    val_labels = clusters.assign(pool_targets(slides, val)) if len(val) else np.zeros(0, np.int64)
    moved = top_up_rare_clusters(labels, val_labels, cfg.seed)
    topped_up = sorted(int(c) for c in np.unique(labels[moved]))
    if len(moved):
        keep = np.setdiff1d(np.arange(len(train)), moved)
        val, val_labels = np.concatenate([val, train[moved]]), np.concatenate([val_labels, labels[moved]])
        train, labels = train[keep], labels[keep]
    if not len(val):
        return Pools(train, labels, val, None, None, clusters, len(moved), topped_up)
    chosen, weights = stratified_sample(val_labels, cfg.max_val_tiles, cfg.seed)
    return Pools(train, labels, val[chosen], val_labels[chosen], weights, clusters, len(moved), topped_up)
