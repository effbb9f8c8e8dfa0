"""How faithful a student is where it matters: fidelity per label-free tissue cluster, not only on average.

An average over held-out tiles is dominated by the common tissue. A tumour focus is a few per cent of
the tiles, so a student can reach a mean cosine of 0.98 while reproducing the tumour tiles badly — and
those are the tiles a slide's diagnosis rests on. Here the tiles are grouped by k-means on the whitened
teacher features (no labels), and cosine and R² are reported per cluster: the worst cluster, the
cluster-balanced mean, and the worst decile of tiles. The same clusters balance the training draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_CLUSTER_TILES = 4  # a cluster with fewer held-out tiles has no trustworthy R² of its own


def whiten_rows(features: np.ndarray) -> np.ndarray:
    """Each row standardised over its dimensions (the non-affine LayerNorm the FPD loss uses), as float32."""
    out = np.array(features, dtype=np.float32, copy=True)
    out -= out.mean(axis=1, keepdims=True)
    out /= out.std(axis=1, keepdims=True) + 1e-5
    return out


@dataclass
class TileClusters:
    """k-means centres of the whitened teacher features of the training pool."""

    centres: np.ndarray  # (k, D)

    @classmethod
    def fit(cls, features: np.ndarray, k: int, seed: int) -> tuple[TileClusters, np.ndarray]:
        """Cluster the pool's teacher features; returns the clusters and the pool's labels."""
        from sklearn.cluster import MiniBatchKMeans

        k = max(1, min(k, len(features)))
        kmeans = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=2048)
        labels = kmeans.fit_predict(whiten_rows(features))
        return cls(kmeans.cluster_centers_.astype(np.float32)), labels

    def assign(self, features: np.ndarray) -> np.ndarray:
        """The nearest centre of each (unwhitened) teacher feature."""
        x = whiten_rows(features)
        distances = (x**2).sum(1, keepdims=True) - 2 * x @ self.centres.T + (self.centres**2).sum(1)[None]
        return distances.argmin(axis=1)


def r2_score(prediction: np.ndarray, target: np.ndarray) -> float:
    """1 − SSE / SST over all dimensions, SST around these tiles' own mean (the set's own variance)."""
    sst = float(((target - target.mean(axis=0)) ** 2).sum())
    return 1.0 - float(((target - prediction) ** 2).sum()) / max(sst, 1e-12)


def cosine_rows(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    dot = (prediction * target).sum(axis=1)
    return dot / np.maximum(np.linalg.norm(prediction, axis=1) * np.linalg.norm(target, axis=1), 1e-12)


def stratified_sample(labels: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` tiles with every cluster as equally represented as its size allows, and their weights.

    A uniform sample of a few hundred held-out tiles holds a handful of a 3 % tissue, too few to score
    it. Here each cluster gets an equal quota (a small cluster gives all its tiles, its unused quota goes
    to the others); a tile's weight is its cluster's size over its cluster's sample, so weighted averages
    are those of the whole held-out pool. Returns (sorted indices into ``labels``, weights).
    """
    rng = np.random.default_rng(seed)
    ids, sizes = np.unique(labels, return_counts=True)
    quota = np.zeros(len(ids), np.int64)
    left = min(n, len(labels))
    while left > 0:  # water-filling: an equal share to every cluster that still has tiles
        open_ = np.nonzero(quota < sizes)[0]
        share = max(1, left // len(open_))
        for i in open_:
            take = min(share, sizes[i] - quota[i], left)
            quota[i] += take
            left -= take
            if left == 0:
                break
    keep, weights = [], []
    for i, c in enumerate(ids):
        rows = np.nonzero(labels == c)[0]
        chosen = rows if quota[i] >= len(rows) else rng.choice(rows, quota[i], replace=False)
        keep.append(chosen)
        weights.append(np.full(len(chosen), sizes[i] / max(quota[i], 1)))
    keep, weights = np.concatenate(keep), np.concatenate(weights)
    order = np.argsort(keep)
    return keep[order], weights[order]


def fidelity(prediction: np.ndarray, target: np.ndarray, labels: np.ndarray | None = None,
             weights: np.ndarray | None = None) -> dict:
    """Cosine and R² overall, per cluster (``labels``), cluster-balanced, worst cluster and worst decile.

    A cluster's R² is ``1 − its tiles' mean squared error / the teacher's variance per tile over all
    held-out tiles``: its error in units of the teacher's overall spread, not of the cluster's own
    (k-means makes clusters tight, so their own variance is tiny and says nothing). The overall R² is the
    tile-weighted mean of the cluster R²s; ``balanced_r2`` is their plain mean, so a rare tissue counts as
    much as a common one. ``weights`` (importance weights of a stratified sample) make the overall
    figures those of the pool the sample came from. ``worst_cluster_r2`` and ``balanced_r2`` count
    clusters with at least ``MIN_CLUSTER_TILES`` held-out tiles; ``clusters`` lists every cluster seen.
    """
    prediction, target = np.asarray(prediction, np.float64), np.asarray(target, np.float64)
    if len(target) == 0:
        return {"cosine": float("nan"), "r2": float("nan"), "n": 0}
    w = np.ones(len(target)) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    cos = cosine_rows(prediction, target)
    sse = ((target - prediction) ** 2).sum(axis=1)
    spread = max(float((w * ((target - w @ target) ** 2).sum(axis=1)).sum()), 1e-12)  # teacher variance per tile
    order = np.argsort(cos)
    decile = order[: max(1, int(np.searchsorted(np.cumsum(w[order]), 0.1)) + 1)]
    out = {"cosine": round(float(w @ cos), 5), "r2": round(1.0 - float(w @ sse) / spread, 5), "n": int(len(target)),
           "worst_decile_cosine": round(float(np.average(cos[decile], weights=w[decile])), 5)}
    if labels is None:
        return out
    clusters = {}
    for c in np.unique(labels):
        rows = labels == c
        clusters[int(c)] = {"n": int(rows.sum()), "cosine": round(float(cos[rows].mean()), 5),
                            "r2": round(1.0 - float(sse[rows].mean()) / spread, 5)}
    scored = {c: v for c, v in clusters.items() if v["n"] >= MIN_CLUSTER_TILES}
    if scored:
        worst_c = min(scored, key=lambda c: scored[c]["r2"])
        out.update(balanced_r2=round(float(np.mean([v["r2"] for v in scored.values()])), 5),
                   worst_cluster=worst_c, worst_cluster_r2=scored[worst_c]["r2"],
                   worst_cluster_cosine=scored[worst_c]["cosine"])
    out["clusters"] = clusters
    return out


def subset_fidelity(prediction: np.ndarray, target: np.ndarray, rows: np.ndarray) -> dict:
    """Cosine and R² on a subset of tiles (e.g. those a truth mask calls tumour), R² around the subset's mean."""
    rows = np.asarray(rows, bool)
    if rows.sum() < 2:
        return {"n": int(rows.sum())}
    p, t = np.asarray(prediction, np.float64)[rows], np.asarray(target, np.float64)[rows]
    return {"n": int(rows.sum()), "cosine": round(float(cosine_rows(p, t).mean()), 5), "r2": round(r2_score(p, t), 5)}
