"""The distillation's tiles: (tile, teacher feature, pool index) across slides, read through one slide pool and
kept decoded up to a byte budget, each epoch a view of its draws; and the histology-safe augmentations."""

from __future__ import annotations

import threading

import numpy as np

from distill.pools import SlideTiles


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
