"""Batches of tiles for a model, read ahead by loader processes or, where processes cannot start, by threads.

A Dask worker started by ``dask worker`` or dask-jobqueue runs as a daemonic process, and Python forbids a
daemonic process to start children: torch's DataLoader workers fail there with "daemonic processes are not
allowed to have children". Reading a tile is mostly decoding (JPEG, JPEG 2000, OpenSlide) and resizing,
which release the GIL, so threads read ahead nearly as well, and start in no time.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterator
from typing import Literal

LoaderKind = Literal["auto", "processes", "threads"]


def resolve_loader(kind: LoaderKind) -> Literal["processes", "threads"]:
    """``auto``: loader processes, unless this process may not start any (a daemonic Dask worker): threads."""
    if kind != "auto":
        return kind
    return "threads" if multiprocessing.current_process().daemon else "processes"


class ThreadBatches:
    """The batches of a map-style dataset in order, each read (items one after another, then collated) by one of
    ``threads`` threads, at most ``ahead`` batches read ahead of the consumer. An item's error is raised when
    its batch is reached; leaving the loop early waits only for the batches already started."""

    def __init__(self, dataset, batch_size: int, threads: int, ahead: int, collate: Callable | None = None,
                 pin_memory: bool = False):
        self.dataset, self.batch_size = dataset, batch_size
        self.threads, self.ahead = max(1, threads), max(1, ahead)
        self.collate, self.pin_memory = collate, pin_memory

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def _read(self, start: int):
        import torch

        collate = self.collate or torch.utils.data.default_collate
        batch = collate([self.dataset[i] for i in range(start, min(len(self.dataset), start + self.batch_size))])
        if self.pin_memory:
            batch = torch.utils.data._utils.pin_memory.pin_memory(batch)
        return batch

    def __iter__(self) -> Iterator:
        from concurrent.futures import ThreadPoolExecutor

        starts = iter(range(0, len(self.dataset), self.batch_size))
        with ThreadPoolExecutor(self.threads, thread_name_prefix="tile-loader") as pool:
            pending = deque(pool.submit(self._read, start) for _, start in zip(range(self.ahead), starts))
            try:
                while pending:
                    batch = pending.popleft().result()
                    following = next(starts, None)
                    if following is not None:
                        pending.append(pool.submit(self._read, following))
                    yield batch
            finally:
                for future in pending:
                    future.cancel()


def batch_loader(dataset, *, batch_size: int, workers: int, prefetch: int = 4, kind: LoaderKind = "auto",
                 pin_memory: bool = False):
    """An iterable of ``dataset``'s batches in order: a DataLoader with ``workers`` processes, or as many threads
    (:func:`resolve_loader`); ``workers`` 0 reads in the consumer's own thread."""
    import torch

    if workers and resolve_loader(kind) == "threads":
        return ThreadBatches(dataset, batch_size, threads=workers, ahead=workers * prefetch, pin_memory=pin_memory)
    kwargs = dict(prefetch_factor=prefetch, persistent_workers=False) if workers else {}
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       pin_memory=pin_memory, **kwargs)
