"""One task on a worker: run a stage function, record running → done/failed in its state file, fenced by its
run's epoch; the task's threads, peak memory and progress."""

from __future__ import annotations

import logging
import threading
import time
import traceback
from pathlib import Path

from pipelines.config import RunConfig
from pipelines.engine.cluster import alone_cores, worker_cores, worker_name
from pipelines.engine.run_dir import RunPaths
from pipelines.engine.run_lock import current_epoch
from pipelines.engine.stage import load_table
from pipelines.engine.state import now, write_state
from pipelines.engine.task_context import TASK_FINGERPRINT, TASK_FORCED, TASK_PROGRESS
from pipelines.manifest import SlideEntry
from wsi.errors import SlideError
from wsi.files import StaleWrite, write_fence

log = logging.getLogger(__name__)


def failure_reason(exc: BaseException, entry: SlideEntry | None) -> str:
    """One line saying what went wrong and which slides.csv line the slide came from."""
    if entry is None:
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, SlideError):
        return f"{exc.reason} (slides.csv {entry.where()})"
    return f"{type(exc).__name__}: {exc} (slides.csv line {entry.line})"


def descendants(pid: int) -> list[int]:
    """The processes below ``pid``, from Linux's per-thread ``children`` lists: a few small reads, where psutil's
    ``children()`` reads every process's stat file on the machine (20 times a second, holding the GIL, it slowed
    the short tasks it measured). Elsewhere psutil's."""
    from pathlib import Path

    tasks = Path(f"/proc/{pid}/task")
    if not (tasks / str(pid) / "children").exists():
        import psutil

        try:
            return [child.pid for child in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    try:
        threads = list(tasks.iterdir())
    except OSError:  # the process just ended
        return []
    found = []
    for thread in threads:
        try:
            found += [int(child) for child in (thread / "children").read_text().split()]
        except OSError:  # a thread that just ended
            continue
    return found + [grandchild for child in found for grandchild in descendants(child)]


class PeakRSS:
    """Samples this process's resident memory (plus its children's, e.g. DataLoader workers) while a task runs."""

    def __init__(self, interval: float = 0.05):
        import threading

        import psutil

        self.process, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        total = self.process.memory_info().rss
        for pid in descendants(self.process.pid):
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue  # a child that just exited
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRSS:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def mb(self) -> float:
        return round(self.peak / 2**20, 1)


def set_torch_threads(alone: bool, shared: bool = False) -> int:
    """Torch's CPU threads for a model task: the worker's cores, or, when the task runs alone (a cohort stage,
    the only slide), every core of the machine — on an external (``shared``) cluster, every core its workers
    hold on this host (:func:`alone_cores`). Dask starts workers with OMP_NUM_THREADS=1, so without this torch
    would train and embed on one core."""
    import torch

    threads = alone_cores(shared) if alone else worker_cores()
    torch.set_num_threads(threads)
    return threads


class ProgressWriter:
    """Records a running task's progress in its state file, at most every ``interval`` seconds (and at the end)."""

    def __init__(self, paths: RunPaths, stage: str, key: str, running: dict, interval: float = 1.0):
        self.paths, self.stage, self.key, self.running, self.interval = paths, stage, key, running, interval
        self._last = 0.0

    def __call__(self, **fields) -> None:
        t = time.monotonic()
        last = fields.get("done") is not None and fields.get("done") == fields.get("total")
        if t - self._last < self.interval and not last:
            return
        self._last = t
        progress = {k: v for k, v in fields.items() if v is None or isinstance(v, (int, float, str))}
        write_state(self.paths, self.stage, self.key, **self.running, progress={**progress, "updated": now()})


def run_task(table_ref: str, stage_name: str, key: str, payload, cfg: RunConfig, root: str, fingerprint: str,
             attempt: int, alone: bool = False, forced: bool = False, epoch: str | None = None) -> dict:
    """Run one task where Dask put it; record running → done/failed. Never raises for a stage error.

    ``table_ref``: the stage table (``module:attribute``), imported here as the client built it.
    ``alone``: nothing else of the run can run beside it, so a model task takes all the machine's cores.
    ``forced``: the user asked for it with --force (stages that resume from checkpoints start over).
    ``epoch``: the run that submitted it (its lock's epoch). Every rename into place, removal and state write
    of the task is fenced: once another run holds the run directory (the submitting client was killed, its
    task kept running on a remote worker, and a resumed run redoes it), they are refused, and the task ends
    ``stale`` having replaced nothing."""
    paths = RunPaths(Path(root))

    def current(target: Path) -> None:
        holder = current_epoch(paths)
        if holder != epoch:
            raise StaleWrite(f"{target}: not written — this {stage_name} task of {key} belongs to run {epoch}, and "
                             f"{'run ' + holder if holder else 'no run'} holds {paths.root} now")

    stage = load_table(table_ref)[stage_name]
    if epoch is None:
        return _run_task(stage, key, payload, cfg, paths, fingerprint, attempt, alone, forced, epoch)
    try:
        with write_fence(current):
            return _run_task(stage, key, payload, cfg, paths, fingerprint, attempt, alone, forced, epoch)
    except StaleWrite as exc:
        log.warning("%s", exc)
        return {"status": "stale", "reason": str(exc)}


# torch's thread count and random seed are process-wide: a worker with several threads (`dask worker`'s default)
# runs one model task at a time, so concurrent tasks never re-thread or reseed each other mid-task
_MODEL_TASK = threading.Lock()


def _run_task(stage, key: str, payload, cfg: RunConfig, paths: RunPaths, fingerprint: str, attempt: int,
              alone: bool, forced: bool, epoch: str | None) -> dict:
    if stage.uses_torch:
        with _MODEL_TASK:
            return _run_stage(stage, key, payload, cfg, paths, fingerprint, attempt, alone, forced, epoch)
    return _run_stage(stage, key, payload, cfg, paths, fingerprint, attempt, alone, forced, epoch)


def _run_stage(stage, key: str, payload, cfg: RunConfig, paths: RunPaths, fingerprint: str, attempt: int,
               alone: bool, forced: bool, epoch: str | None) -> dict:
    stage_name = stage.name
    started, t0 = now(), time.perf_counter()
    running = dict(status="running", fingerprint=fingerprint, attempts=attempt, epoch=epoch, started=started,
                   worker=worker_name())
    write_state(paths, stage_name, key, **running)
    threads = set_torch_threads(alone, bool(cfg.runner.scheduler)) if stage.uses_torch else None
    tokens = [TASK_FINGERPRINT.set(fingerprint), TASK_FORCED.set(forced),
              TASK_PROGRESS.set(ProgressWriter(paths, stage_name, key, {**running, "torch_threads": threads}))]
    memory = PeakRSS()
    try:
        with memory:
            meta = stage.fn(payload, cfg, paths)
    except StaleWrite:
        raise
    except Exception as exc:  # recorded with its traceback; the runner decides on retries
        reason = failure_reason(exc, payload if isinstance(payload, SlideEntry) else None)
        write_state(paths, stage_name, key, status="failed", fingerprint=fingerprint, attempts=attempt, epoch=epoch,
                    started=started, finished=now(), duration_s=round(time.perf_counter() - t0, 4), error=reason,
                    traceback=traceback.format_exc())
        return {"status": "failed", "reason": reason}
    finally:
        for var, token in zip((TASK_FINGERPRINT, TASK_FORCED, TASK_PROGRESS), tokens):
            var.reset(token)
    duration = round(time.perf_counter() - t0, 4)
    write_state(paths, stage_name, key, status="done", fingerprint=fingerprint, attempts=attempt, epoch=epoch,
                started=started, finished=now(), duration_s=duration, peak_rss_mb=memory.mb, torch_threads=threads,
                worker=worker_name(), warnings=meta.get("warnings", []), meta=_summary(meta))
    return {"status": "done", "duration_s": duration, "meta": _summary(meta)}


def _summary(meta: dict) -> dict:
    """The small part of a stage's metadata the client shows (keeps results cheap to ship)."""
    keys = ("n_tiles", "n_slides", "seconds", "patches_per_s", "precision", "loader", "val_cosine", "val_r2", "worst_cluster_r2", "faithful",
            "initial_cosine", "folds", "n_unreadable_tiles", "n_blurry_dropped")
    return {k: meta[k] for k in keys if k in meta}


