"""Which training tiles a distillation epoch draws: cluster-balanced, and weighted towards what the student gets wrong.

Both are label-free. ``balance: clusters`` draws every k-means cluster of the teacher's features in
proportion to the square root of its size, so a rare tissue (a small tumour focus) is seen far more
often than its share of tiles, yet no tiny cluster (a pen mark) takes over an epoch. ``hard_mining``
then multiplies each tile's weight by its last training loss relative to the pool's typical loss,
raised to that power: once the common tissue is learned, the steps go to the tiles the student still
reproduces badly, which on a focal-lesion cohort are the lesion's.
"""

from __future__ import annotations

import numpy as np

HARD_WEIGHT_RANGE = (0.25, 8.0)  # a tile's hard-mining factor is clipped to this range (no tile starves or takes over)


def balance_weights(labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """Each tile's draw probability with every cluster's total share ∝ sqrt(its size)."""
    sizes = np.bincount(labels, minlength=n_clusters).astype(np.float64)
    weights = sizes[labels] ** -0.5
    return weights / weights.sum()


class TileErrors:
    """The last training loss of every pool tile (NaN until drawn), for hard-example draws."""

    def __init__(self, n: int, saved: np.ndarray | None = None):
        self.errors = np.full(n, np.nan) if saved is None or len(saved) != n else np.asarray(saved, np.float64).copy()

    def update(self, pool_rows: np.ndarray, losses: np.ndarray) -> None:
        """Record the tiles' losses; a non-finite one counts as the largest finite loss seen (a hard tile, not unseen)."""
        losses = np.asarray(losses, np.float64)
        bad = ~np.isfinite(losses)
        if bad.any():
            finite = np.concatenate([losses[~bad], self.errors[np.isfinite(self.errors)]])
            losses = np.where(bad, finite.max() if len(finite) else 1.0, losses)
        self.errors[pool_rows] = losses

    def factors(self, power: float) -> np.ndarray:
        """(error / median error) ** power, clipped; tiles not yet drawn count as typical (factor 1)."""
        seen = ~np.isnan(self.errors)
        if power == 0 or not seen.any():
            return np.ones(len(self.errors))
        ratio = np.where(seen, self.errors, np.nanmedian(self.errors)) / max(float(np.nanmedian(self.errors)), 1e-12)
        return np.clip(ratio**power, *HARD_WEIGHT_RANGE)


def epoch_draws(n_pool: int, n_draws: int, base: np.ndarray | None, errors: TileErrors, power: float,
                rng: np.random.Generator) -> np.ndarray:
    """Pool indices drawn for one epoch: from ``base`` weights (None: uniform) times the hard-mining factors."""
    weights = np.full(n_pool, 1.0 / n_pool) if base is None else base
    if power:
        weights = weights * errors.factors(power)
        weights = weights / weights.sum()
    elif base is None:
        return rng.integers(0, n_pool, n_draws)  # the uniform draws of runs before hard mining, unchanged
    return rng.choice(n_pool, n_draws, p=weights)
