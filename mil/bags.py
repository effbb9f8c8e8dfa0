"""Bags of patch features read lazily, one slide at a time, with an in-memory cache that has a byte budget.

A MIL fold task touches every training bag once per epoch. Holding them all (as the single cohort
task once did) makes memory grow with the cohort; reading every bag from disk each time costs a
Zarr read per step. ``BagCache`` keeps the most recently used bags up to ``budget_bytes`` and
reads the rest on demand, so a task's peak memory is bounded by the budget plus one bag, whatever
the cohort's size.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np


class BagCache:
    """``cache(key)`` → the bag (N, D) ``read(key)`` gives, kept while the budget allows (least recently used
    out first). Keys are slide ids, or e.g. (feature kind, slide id) when one cache serves two encoders."""

    def __init__(self, read: Callable[[Hashable], np.ndarray], budget_bytes: int):
        self.read, self.budget = read, int(budget_bytes)
        self._bags: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self.bytes = 0
        self.reads = self.hits = 0

    def __call__(self, key: Hashable) -> np.ndarray:
        bag = self._bags.get(key)
        if bag is not None:
            self._bags.move_to_end(key)
            self.hits += 1
            return bag
        bag = self.read(key)
        self.reads += 1
        if bag.nbytes <= self.budget:
            self._bags[key] = bag
            self.bytes += bag.nbytes
            while self.bytes > self.budget:
                _, oldest = self._bags.popitem(last=False)
                self.bytes -= oldest.nbytes
        return bag

    def __len__(self) -> int:
        return len(self._bags)
