"""Model batches on one torch thread each, several batches at once: features that do not depend on the cores.

With torch's threads inside each operation (intra-op), MKL and oneDNN split a small matrix product's sums
across threads, and how they split it depends on how many threads there are: the same tiles on a one-core
and a two-core worker gave features 1 float16 step apart (an AVX2-only EPYC; a projector's 7-tile batch,
a 1×1 convolution on a small map). A run's outputs then depended on which worker a slide landed on.

Here each batch runs on a single thread, so its features depend only on the batch (its tiles, which the
config fixes), and the worker's cores run as many batches side by side. That is also as fast or faster:
on 2 cores of that EPYC, ViT-S/16 1.16× and ViT-Ti/16 1.17× (six batches of 32 at 224 px), ResNet-18 0.93×.
The cost is memory: one batch's activations per batch at once. ``features.threads_per_batch`` runs each
batch on more threads (the bits then depend on that setting, still not on the cores), fewer batches at once.

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


def batches_in_threads(batches: Iterable, encode: Callable[[Any], Any], threads: int, per_batch: int = 1
                       ) -> Iterator[tuple[Any, Any, float]]:
    """``(batch, encode(batch), seconds)`` for each batch, in order: each batch encoded on ``per_batch`` torch threads,
    ``threads // per_batch`` batches at once (at least one). ``seconds`` is a batch's encoding time divided by the
    batches at once, so that the seconds of a whole pass add up to the time the threads were busy. A batch's error
    is raised at its turn; leaving the loop early waits for the batches already started."""
    at_once = max(1, threads // per_batch)
    with torch_threads(per_batch):
        if at_once == 1:
            for batch in batches:
                start = time.perf_counter()
                out = encode(batch)
                yield batch, out, time.perf_counter() - start
            return

        from concurrent.futures import ThreadPoolExecutor

        def timed(batch):
            start = time.perf_counter()
            return encode(batch), (time.perf_counter() - start) / at_once

        with ThreadPoolExecutor(at_once, thread_name_prefix="model-batch") as pool:
            pending: deque = deque()
            try:
                for batch in batches:
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
