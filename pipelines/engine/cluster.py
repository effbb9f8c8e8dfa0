"""Where tasks run: a client on an existing Dask scheduler, or a local cluster sized to this machine.

The local cluster binds everything to 127.0.0.1. On a machine with GPUs it gives each GPU a worker
of its own (``CUDA_VISIBLE_DEVICES`` set to that GPU, a ``GPU`` resource, one task at a time), so
model tasks, which ask for ``GPU``, land there, while CPU workers on the remaining cores (with a
``CPU`` resource, which the other tasks then ask for) take the tissue and tile tasks. Its workers are not
daemonic (extraction may start DataLoader processes); an external cluster's are, and tiles are read by threads
there (:mod:`features.tile_loader`).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pipelines.config import RunConfig

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from distributed import WorkerPlugin


class ClusterError(RuntimeError):
    """The Dask cluster cannot run anything (no workers, unreachable scheduler)."""


MMAP_THRESHOLD = 32 * 1024 * 1024  # the ceiling of glibc's dynamic mmap threshold on 64-bit
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what glibc's dynamic rule sets beside it
HEAP_SIZE = 64 * 1024 * 1024  # the heaps a thread's arena grows by (glibc's default HEAP_MAX_SIZE on 64-bit)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt's parameter numbers (malloc.h)


def keep_large_allocations_on_the_heap() -> bool:
    """Give this process glibc's malloc thresholds as a plain process has them after warm-up, and let each thread
    keep what its heap has grown to for its next task; whether the thresholds were set.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, and with any malloc tunable set glibc stops
    raising its mmap threshold above 128 KiB: every tensor larger than that is then mapped afresh, and freed heap
    memory is trimmed at once, so each new tensor page-faults again. Torch's training step ran 1.9× slower in such
    a worker (docs/performance.md). The thresholds become those glibc's dynamic rule reaches (mmap 32 MiB, trim
    twice that).

    Tasks run in pool threads, whose arenas grow by 64 MiB heaps, and glibc unmaps such a heap as soon as it is
    empty unless the top pad covers it: a tissue task (~120 MiB at its peak) faulted 7,000–14,000 pages again on
    every slide (0.05–0.07 s of its 0.3 s). With a pad of one heap each task thread keeps its own peak: a worker's
    RSS stays near the sum of its threads' largest tasks (``malloc_trim(0)``, which Dask's ``trim_memory`` runs,
    still returns it), and each arena's heap is made writable whole at once (address space, not memory; it counts
    against the commit limit where ``vm.overcommit_memory`` is 2). A ``MALLOC_MMAP_THRESHOLD_`` or
    ``MALLOC_TOP_PAD_`` the user set is left as it is; C libraries other than glibc too."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl (Alpine) and others: no mallopt, nothing to tune
        log.debug("no glibc mallopt: malloc's thresholds are left as they are")
        return False
    if "MALLOC_TOP_PAD_" not in os.environ:
        mallopt(M_TOP_PAD, HEAP_SIZE)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def warm_worker_plugin(warm_up: str | None, malloc_trim: bool = False) -> WorkerPlugin:
    """A Dask worker plugin that sets OpenCV's threads to the worker's and runs ``warm_up`` (``module:function``,
    the stage table's: :func:`wsi.tissue_qc.warm_up` imports the slide readers, tiffslide → Zarr, and first uses
    OpenCV and Pillow) once per worker, as it starts or joins, in the thread pool that runs the tasks. Without it
    a worker's first task pays those one-time costs, more than the task's own work. Unless ``malloc_trim`` (``runner.malloc_trim``), it also keeps
    large tensors on the heap (:func:`keep_large_allocations_on_the_heap`): an external cluster's workers are
    started by Dask's nanny, with the setting that makes torch slow."""
    from distributed import WorkerPlugin

    class WarmUp(WorkerPlugin):
        name = "wsi-pipeline-warm-up"

        async def setup(self, worker) -> None:
            import asyncio

            import cv2

            from pipelines.engine.stage import load_callable

            # OpenCV ignores OMP_NUM_THREADS and would start a thread per core in every worker: two workers on two
            # cores then run four threads and each task is slower than alone
            cv2.setNumThreads(worker.state.nthreads)
            if not malloc_trim:
                keep_large_allocations_on_the_heap()
            if warm_up is not None:
                # in the pool that runs the tasks: glibc gives each thread that allocates a heap of its own (arena),
                # and a warm-up in the worker's main thread left the tasks' heap cold (a first tissue task faulted
                # up to 17,000 pages, ~25 µs each on a VM: 0.9 s instead of 0.25 s). One heap for every thread
                # (MALLOC_ARENA_MAX=1) did better for it but made distillation 1.3× slower (docs/performance.md)
                try:
                    await asyncio.get_running_loop().run_in_executor(worker.executors["default"], load_callable(warm_up))
                except Exception as exc:  # a warm-up only saves time: the worker runs its tasks without it
                    log.warning("worker %s: warm-up %s failed, its first task pays the one-time costs: %r",
                                worker.name, warm_up, exc)

    return WarmUp()


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a SLURM allocation), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_cores() -> int:
    """The cores the Dask worker running this task owns (its threads); all of them outside a worker."""
    from distributed import get_worker

    try:
        return get_worker().state.nthreads
    except ValueError:  # not in a worker
        return machine_cores()


def alone_cores(shared: bool) -> int:
    """The cores a task may take when nothing else of the run runs beside it. On a local cluster the machine's
    (its affinity mask: we started every worker on it). On an external cluster (``shared``) only the threads
    the cluster's workers hold on this host, capped by the mask: a worker started with ``--nthreads 4`` on a
    node without a cpuset would otherwise take all of the node's cores from whoever else runs there."""
    cores = machine_cores()
    if not shared:
        return cores
    from distributed import get_worker
    from distributed.comm import get_address_host
    from distributed.utils import sync

    try:
        worker = get_worker()
    except ValueError:  # not in a worker
        return cores
    host = get_address_host(worker.address)
    workers = sync(worker.loop, worker.scheduler.identity)["workers"]
    held = sum(info["nthreads"] for address, info in workers.items() if get_address_host(address) == host)
    return max(1, min(cores, held or worker.state.nthreads))


def worker_name() -> str | None:
    """The name of the Dask worker running this task (``cpu-0``, ``gpu-1``, …), None outside a worker."""
    from distributed import get_worker

    try:
        return str(get_worker().name)
    except ValueError:
        return None


def _nvidia_device_nodes() -> bool:
    """Whether /dev has NVIDIA GPU nodes (nvidia0, …); True where that cannot be told, so torch decides."""
    try:
        return any(name.startswith("nvidia") and name[6:].isdigit() for name in os.listdir("/dev"))
    except OSError:
        return True


def local_gpus(cfg: RunConfig) -> list[str]:
    """The CUDA devices the local cluster gives a worker each, as CUDA_VISIBLE_DEVICES values."""
    if cfg.runner.gpus == 0:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cfg.runner.gpus is None:
        if not _nvidia_device_nodes():
            return []  # no GPU, found without importing torch in the driver
        import torch

        count = torch.cuda.device_count()
    else:
        count = cfg.runner.gpus
    ids = [v for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(count)]
    return ids[:count]


def local_worker_specs(cfg: RunConfig, n_tasks: int, gpus: list[str]) -> dict[str, dict]:
    """SpecCluster worker specs: CPU workers on the cores the GPU workers leave, one worker per GPU."""
    from distributed import Nanny

    cores = machine_cores()
    n_cpu = cfg.runner.n_workers or max(1, min(cores - len(gpus), n_tasks))
    common = {"host": "127.0.0.1", "memory_limit": cfg.runner.memory_limit, "silence_logs": logging.ERROR}
    threads = cfg.runner.threads_per_worker
    cpu_resources = {"resources": {"CPU": threads}} if gpus else {}  # with GPU workers, CPU tasks ask for CPU
    specs = {f"cpu-{i}": {"cls": Nanny, "options": {**common, "nthreads": threads, **cpu_resources}} for i in range(n_cpu)}
    for i, device in enumerate(gpus):
        specs[f"gpu-{i}"] = {"cls": Nanny, "options": {**common, "nthreads": 1, "resources": {"GPU": 1},
                                                       "env": {"CUDA_VISIBLE_DEVICES": device}}}
    return specs


@contextmanager
def _quiet_when_lost() -> Iterator[None]:
    """When the run stops because the scheduler is gone, closing the client cancels its reconnection attempts,
    which Dask logs as an error with a traceback: the run's own message says what happened, without it."""
    try:
        yield
    except ClusterError:
        for name in [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "distributed"] + ["distributed"]:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        raise


@contextmanager
def _environ_restored(names) -> Iterator[None]:
    """Dask's nanny sets its pre-spawn variables in this process's environment and leaves them there, where the
    next local cluster of the same process (a test session, a notebook) would inherit them: restored on exit."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def dask_client(cfg: RunConfig, n_tasks: int, warm_up: str | None = None) -> Iterator:
    """A client on ``runner.scheduler``, or on a local cluster bound to 127.0.0.1 sized to this machine; each
    worker runs ``warm_up`` (``module:function``) once as it starts or joins."""
    import dask
    from distributed import Client, Scheduler, SpecCluster

    if cfg.runner.scheduler:
        try:
            client = Client(cfg.runner.scheduler, timeout="30s")
        except OSError as exc:
            raise ClusterError(f"cannot reach the Dask scheduler at {cfg.runner.scheduler}: {exc}") from None
        with client:
            try:
                client.wait_for_workers(1, timeout=cfg.runner.worker_wait_s)
            except TimeoutError:
                raise ClusterError(f"the scheduler at {cfg.runner.scheduler} has no workers after "
                                   f"{cfg.runner.worker_wait_s:g} s (runner.worker_wait_s); start or scale workers") from None
            client.register_plugin(warm_worker_plugin(warm_up, cfg.runner.malloc_trim))
            with _quiet_when_lost():
                yield client
        return
    workers = local_worker_specs(cfg, n_tasks, local_gpus(cfg))
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}
    # Dask's default worker environment sets MALLOC_TRIM_THRESHOLD_, which also switches off glibc's dynamic mmap
    # threshold: every tensor above 128 KiB is then a fresh mmap, and torch on CPU spends its time in page faults
    # (distillation ran 1.7× slower in a worker than alone), unless runner.malloc_trim asks for the lower RSS.
    # The thread limits stay: tasks set torch's own.
    environ = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items()
               if cfg.runner.malloc_trim or not k.startswith("MALLOC_")}
    settings = {"distributed.worker.daemon": False, "distributed.nanny.pre-spawn-environ": environ,
                "distributed.worker.profile.enabled": cfg.runner.worker_profiler}
    with dask.config.set(settings), _environ_restored([*environ, "PYTHONHASHSEED"]):  # the nanny adds the seed
        with SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.ERROR) as cluster, \
                Client(cluster) as client:
            client.wait_for_workers(len(workers), timeout=120)
            client.register_plugin(warm_worker_plugin(warm_up, cfg.runner.malloc_trim))
            yield client


class ClusterResources:
    """The resources (``GPU``, ``CPU``, …) the cluster's workers advertise now, fetched at most every ``every``
    seconds: workers come and go (an adaptive cluster's first worker may have no GPU, its last GPU job may end),
    so each submission asks what is there now, not what was there when the run started."""

    def __init__(self, client, every: float = 2.0):
        self.client, self.every = client, every
        self._known: set[str] = set()
        self._at = -math.inf
        self._lock = threading.Lock()

    def available(self) -> set[str]:
        with self._lock:
            if time.monotonic() - self._at >= self.every:
                # asked of the scheduler directly: Client.scheduler_info() returns a cache the client's own periodic
                # update overwrites with totals only (no workers), which a concurrent call can read
                workers = self.client.sync(self.client.scheduler.identity, n_workers=-1).get("workers", {}).values()
                self._known = {r for w in workers for r in (w.get("resources") or {})}
                self._at = time.monotonic()
            return set(self._known)

    @contextmanager
    def watch(self, waiting: Callable[[], dict[str, int]], patience: float, every: float = 1.0,
              repeat: float = 60.0) -> Iterator[None]:
        """While the block runs, warn when tasks have waited ``patience`` seconds for a resource no worker has
        (``waiting()``: resource → tasks submitted that need it), and again every ``repeat`` seconds: they wait
        for such a worker to join, which the warning asks for, instead of waiting unseen."""
        stop = threading.Event()
        missing_since: dict[str, float] = {}
        said: dict[str, float] = {}

        def run() -> None:
            while not stop.wait(every):
                try:
                    have = self.available()
                except Exception:  # the scheduler is gone: the run's own loop reports it
                    return
                now = time.monotonic()
                for resource, n in waiting().items():
                    if n == 0 or resource in have:
                        missing_since.pop(resource, None)
                        continue
                    since = missing_since.setdefault(resource, now)
                    if now - since >= patience and now - said.get(resource, -math.inf) >= repeat:
                        said[resource] = now
                        log.warning("%d task(s) need a worker with the %s resource and the cluster has had none for "
                                    "%.0f s: they wait for one; start one (e.g. dask worker … --resources %s=1) or stop "
                                    "the run and rerun it on a cluster that has one", n, resource, now - since, resource)

        thread = threading.Thread(target=run, name="resource-watch", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
