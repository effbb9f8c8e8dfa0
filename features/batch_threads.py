"""Model batches on one torch thread each, several batches at once: features that do not depend on the cores.

With torch's threads inside each operation (intra-op), MKL and oneDNN split a small matrix product's sums
across threads, and how they split it depends on how many threads there are: the same tiles on a one-core
and a two-core worker gave features 1 float16 step apart (an AVX2-only EPYC; a projector's 7-tile batch,
a 1×1 convolution on a small map). A run's outputs then depended on which worker a slide landed on.

Here each batch runs on a single thread, so its features depend only on the batch (its tiles, which the
config fixes), and the worker's cores run as many batches side by side. That is also as fast or faster:
on 2 cores of that EPYC, ViT-S/16 1.10×, ViT-Ti/16 1.16×, ResNet-18 0.96× (benchmarks/bench_batch_threads.py).
The cost is memory: one batch's activations per batch at once. So the first batch runs alone while
:class:`ActivationMeter` records its largest tensors, and no more batches run at once than fit in half the
memory the task has left (its Dask worker's limit, or the machine's). ``features.threads_per_batch`` runs
each batch on more threads (the bits then depend on that setting, still not on the cores).

Models outside feature extraction (CLAM on a bag of a few tiles, training) still run on several threads per
operation; for their matrix products :func:`thread_invariant_blas` asks MKL for its strict reproducible mode.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any


def thread_invariant_blas() -> None:
    """Ask MKL (torch's BLAS on x86) for sums that do not depend on the thread count: its strict conditional
    numerical reproducibility (``MKL_CBWR=AUTO,STRICT``: the CPU's own kernels, no cost measured on ViT-B
    inference or a student's training step). MKL reads the setting at its first call in a process, so each
    package that runs models calls this on import; a user's own ``MKL_CBWR`` is kept."""
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


@contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` inside the block, and set back after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ActivationMeter:
    """The bytes of the largest output any leaf module of ``model`` makes in the forward passes run inside the
    block (forward hooks, removed after it). A forward in inference mode holds a few such tensors at once (a
    ViT block's MLP: its input, the hidden layer before and after the activation, the residual), so
    :attr:`batch_bytes` is four of them."""

    def __init__(self, model):
        self.model, self.largest, self._handles = model, 0, []

    def _record(self, module, inputs, output) -> None:
        import torch

        outputs = output if isinstance(output, (tuple, list)) else [output]
        self.largest = max(self.largest, sum(t.nbytes for t in outputs if isinstance(t, torch.Tensor)))

    def __enter__(self) -> ActivationMeter:
        self._handles = [m.register_forward_hook(self._record) for m in self.model.modules()
                         if next(m.children(), None) is None]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    @property
    def batch_bytes(self) -> int:
        return 4 * self.largest


def memory_headroom() -> int:
    """Bytes this process may still take: half of what is left below 70 % of its Dask worker's memory limit
    (where Dask starts to spill and pause) or of the machine's memory, and at most half of what is free."""
    import psutil

    limit = psutil.virtual_memory().total
    try:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit or limit
    except ValueError:  # not in a worker
        pass
    left = int(0.7 * limit) - psutil.Process().memory_info().rss
    return max(0, min(left, psutil.virtual_memory().available) // 2)


def batches_in_threads(batches: Iterable, encode: Callable[[Any], Any], threads: int, per_batch: int = 1,
                       fits: Callable[[], int] | None = None) -> Iterator[tuple[Any, Any, float]]:
    """``(batch, encode(batch), seconds)`` for each batch, in order: each batch encoded on ``per_batch`` torch threads
    (even if ``threads`` is fewer), ``threads // per_batch`` batches at once. With ``fits``, the first batch runs
    alone and then at most ``fits()`` batches run at once (how many fit in memory). ``seconds`` is a batch's
    encoding time divided by the batches at once, so that a pass's seconds add up to the time the threads were
    busy. Errors, the model's and the loader's, are raised in batch order; leaving the loop early waits for the
    batches already started. The caller's thread runs on ``per_batch`` torch threads until the loop ends."""
    at_once = max(1, threads // per_batch)
    with torch_threads(per_batch):
        items = iter(batches)
        if at_once > 1 and fits is not None:
            for batch in items:
                start = time.perf_counter()
                yield batch, encode(batch), time.perf_counter() - start
                at_once = max(1, min(at_once, fits()))
                break
        if at_once == 1:
            for batch in items:
                start = time.perf_counter()
                out = encode(batch)
                yield batch, out, time.perf_counter() - start
            return
        yield from _side_by_side(items, encode, at_once, per_batch)


def model_batches(model, batches: Iterable, encode: Callable[[Any], Any], threads: int, per_batch: int = 1
                  ) -> Iterator[tuple[Any, Any, float]]:
    """:func:`batches_in_threads` for a torch ``model``: its first batch's activations (:class:`ActivationMeter`)
    bound how many batches run at once to what fits in :func:`memory_headroom`. Close the generator (or run it to
    its end) before reusing the model: the batches under way finish before the meter's hooks come off."""
    with ActivationMeter(model) as meter:
        yield from batches_in_threads(batches, encode, threads, per_batch,
                                      fits=lambda: memory_headroom() // max(1, meter.batch_bytes))


def _side_by_side(items: Iterator, encode: Callable[[Any], Any], at_once: int, per_batch: int
                  ) -> Iterator[tuple[Any, Any, float]]:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    def timed(batch):
        start = time.perf_counter()
        return encode(batch), (time.perf_counter() - start) / at_once

    # each pool thread set to per_batch threads before its first operation (torch would otherwise give a new
    # thread its count only at its first parallel region, after a first matrix product on MKL's default threads)
    with ThreadPoolExecutor(at_once, thread_name_prefix="model-batch", initializer=torch.set_num_threads,
                            initargs=(per_batch,)) as pool:
        pending: deque = deque()
        try:
            while True:
                try:
                    batch = next(items)
                except StopIteration:
                    break
                except Exception:  # a loader error: the batches before it come first, and their errors
                    while pending:
                        done_batch, future = pending.popleft()
                        yield done_batch, *future.result()
                    raise
                if len(pending) == at_once:
                    done_batch, future = pending.popleft()
                    yield done_batch, *future.result()
                pending.append((batch, pool.submit(timed, batch)))
            while pending:
                done_batch, future = pending.popleft()
                yield done_batch, *future.result()
        finally:
            for _, future in pending:
                future.cancel()
