"""The Dask runner: submits the plan's tasks, retries failures, skips the dependants of failed tasks.

Only this module knows about Dask. Tasks run ``run_task`` on a worker, which calls the plain stage
function and records the task's state on the shared run directory. The client keeps the
dependency bookkeeping itself (submit when dependencies are done), so a failed slide never
blocks the others and a cohort stage starts as soon as every slide has settled.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipelines.artifacts import RunPaths, sweep_temporaries, write_text
from pipelines.cluster import ClusterError, ClusterResources, dask_client, machine_cores, worker_cores, worker_name
from pipelines.config import RunConfig, dump_config
from pipelines.manifest import FoldPayload, SlideEntry, manifest_csv
from pipelines.plan import Task, build_plan, is_up_to_date, resolve_fingerprint, settle_cohort
from pipelines.registry import STAGES, check_encoders, check_pixels
from pipelines.run_lock import RunLock, current_epoch
from pipelines.state import COHORT, HashCache, now, read_state, write_state
from pipelines.task_context import TASK_FINGERPRINT, TASK_FORCED, TASK_PROGRESS
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
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_info().rss
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


def set_torch_threads(alone: bool) -> int:
    """Torch's CPU threads for a model task: the worker's cores, or every core of the machine when the task
    runs alone (a cohort stage, the only slide). Dask starts workers with OMP_NUM_THREADS=1, so without
    this torch would train and embed on one core."""
    import torch

    threads = machine_cores() if alone else worker_cores()
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


def run_task(stage_name: str, key: str, payload, cfg: RunConfig, root: str, fingerprint: str, attempt: int,
             alone: bool = False, forced: bool = False, epoch: str | None = None) -> dict:
    """Run one task where Dask put it; record running → done/failed. Never raises for a stage error.

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

    if epoch is None:
        return _run_task(stage_name, key, payload, cfg, paths, fingerprint, attempt, alone, forced, epoch)
    try:
        with write_fence(current):
            return _run_task(stage_name, key, payload, cfg, paths, fingerprint, attempt, alone, forced, epoch)
    except StaleWrite as exc:
        log.warning("%s", exc)
        return {"status": "stale", "reason": str(exc)}


# torch's thread count and random seed are process-wide: a worker with several threads (`dask worker`'s default)
# runs one model task at a time, so concurrent tasks never re-thread or reseed each other mid-task
_MODEL_TASK = threading.Lock()


def _run_task(stage_name: str, key: str, payload, cfg: RunConfig, paths: RunPaths, fingerprint: str, attempt: int,
              alone: bool, forced: bool, epoch: str | None) -> dict:
    stage = STAGES[stage_name]
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
    threads = set_torch_threads(alone) if stage.uses_torch else None
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
            "initial_cosine", "folds")
    return {k: meta[k] for k in keys if k in meta}


def empty_slide_notes(paths: RunPaths, tasks: dict[str, Task]) -> list[str]:
    """Which slides of the run got no tissue, or tissue but zero tiles: they finish 'done' yet add nothing."""
    groups: dict[str, list[str]] = {}
    for task in tasks.values():
        if task.stage != "tiles" or task.status not in ("done", "up-to-date"):
            continue
        state = read_state(paths, "tiles", task.key) or {}
        if state.get("meta", {}).get("n_tiles", 1) == 0:
            reason = "no tissue" if any("no tissue" in w for w in state.get("warnings", [])) else \
                "tissue but zero tiles (none reaches tiling.min_tissue_fraction)"
            groups.setdefault(reason, []).append(task.key)
    return [f"{len(ids)} slide(s) with {reason}: {', '.join(ids[:20])}{' …' if len(ids) > 20 else ''} "
            "(see qc/slides.csv; a tissue preset for smaller tissue, e.g. bwh_biopsy, may keep them)"
            for reason, ids in groups.items()]


@dataclass
class RunReport:
    out: Path
    tasks: dict[str, Task]
    notes: list[str]
    dashboard: str | None = None

    @property
    def complete(self) -> bool:
        return all(t.status in ("done", "up-to-date") for t in self.tasks.values())

    @property
    def failed(self) -> list[Task]:
        return [t for t in self.tasks.values() if t.status == "failed"]


class _Scheduler:
    """Client-side bookkeeping: what is ready, what to retry, what to skip."""

    def __init__(self, tasks: dict[str, Task], entries: dict[str, SlideEntry], cfg: RunConfig, paths: RunPaths,
                 on_settled: Callable[[Task], None], hashes: HashCache | None = None):
        self.tasks, self.entries, self.cfg, self.paths, self.hashes = tasks, entries, cfg, paths, hashes
        self.on_settled = on_settled
        self.dependants: dict[str, list[str]] = {tid: [] for tid in tasks}
        for task in tasks.values():
            for dep in task.deps:
                self.dependants[dep].append(task.id)

    def payload(self, task: Task):
        if not task.cohort:
            return self.entries[task.key]
        entries = [self.entries[key] for key in task.included]
        return FoldPayload(task.key, entries) if task.scope == "fold" else entries

    def ready(self, task: Task) -> bool:
        return task.status == "pending" and all(self.tasks[d].status not in ("pending", "running") for d in task.deps)

    def prepare(self, task: Task) -> bool:
        """Settle a ready task without running it (up to date, or blocked); True when it must run."""
        done_deps = [self.tasks[d] for d in task.deps if self.tasks[d].status in ("done", "up-to-date")]
        if task.cohort:
            included, left_out, blocked = settle_cohort(self.cfg, task, self.tasks, self.entries,
                                                        lambda t: t.status in ("done", "up-to-date"), self.hashes)
            if not included:
                reason = f"{', '.join(blocked)} did not finish" if blocked else "no slide finished its upstream stages"
                write_state(self.paths, task.stage, task.key, status="skipped", finished=now(), error=reason)
                return self.settle(task, "skipped", reason)
            if left_out:
                task.reason = f"on {len(included)}/{len(included) + left_out} slides ({left_out} failed or skipped upstream)"
        elif len(done_deps) < len(task.deps):
            failed = [d for d in task.deps if self.tasks[d].status != "done" and self.tasks[d].status != "up-to-date"]
            write_state(self.paths, task.stage, task.key, status="skipped", fingerprint=task.fingerprint,
                        finished=now(), error=f"{', '.join(failed)} did not finish")
            return self.settle(task, "skipped", f"{', '.join(failed)} did not finish")
        elif task.fingerprint is None:  # it comes after a cohort task, whose fingerprint is known only now
            task.fingerprint = resolve_fingerprint(self.cfg, task, self.tasks, self.entries, self.hashes)
        if is_up_to_date(self.paths, task, self.cfg):
            return self.settle(task, "up-to-date", task.reason)
        return True

    def settle(self, task: Task, status: str, reason: str = "") -> bool:
        task.status, task.reason = status, reason
        self.on_settled(task)
        return False

    def next_ready(self, settled: Task) -> list[Task]:
        return [self.tasks[t] for t in self.dependants[settled.id] if self.ready(self.tasks[t])]


def execute(tasks: dict[str, Task], entries: list[SlideEntry], cfg: RunConfig, paths: RunPaths,
            on_settled: Callable[[Task], None] = lambda t: None, on_start: Callable[[str], None] = lambda d: None,
            hashes: HashCache | None = None, epoch: str | None = None) -> str | None:
    """Run the plan (its tasks fenced by ``epoch``, the lock's: :func:`run_task`). Returns the dashboard link
    when a cluster was used."""
    sched = _Scheduler(tasks, {e.slide_id: e for e in entries}, cfg, paths, on_settled, hashes)
    frontier = [t for t in tasks.values() if sched.ready(t)]
    to_run: list[Task] = []

    def expand(candidates: list[Task]) -> None:
        """Settle what need not run; collect what must; follow settled tasks to their dependants."""
        while candidates:
            task = candidates.pop(0)
            if not sched.ready(task):
                continue
            if sched.prepare(task):
                task.status = "running"
                to_run.append(task)
            else:
                candidates.extend(sched.next_ready(task))

    expand(frontier)
    if not to_run:
        return None  # everything up to date: no cluster needed
    from distributed import as_completed
    from distributed.client import ClosedClientError
    from distributed.comm import CommClosedError

    with dask_client(cfg, len(tasks)) as client:
        dashboard = client.dashboard_link
        on_start(dashboard)
        resources_now = ClusterResources(client)
        futures = as_completed(with_results=True, raise_errors=False)  # results stream back as tasks finish
        owner, needs = {}, {}

        per_stage: dict[str, int] = {}
        for t in tasks.values():
            per_stage[t.stage] = per_stage.get(t.stage, 0) + 1

        def lost_scheduler(exc: BaseException | None = None) -> ClusterError:
            finished = sum(t.status in ("done", "up-to-date") for t in tasks.values())
            return ClusterError(f"lost the Dask scheduler at {client.scheduler.address} while "
                                f"{len(owner)} task(s) were submitted{f' ({type(exc).__name__})' if exc else ''}: the run stopped. "
                                f"{finished} task(s) finished and are kept; rerun the same command to resume (with "
                                "--scheduler, once the cluster is back)")

        def submit(task: Task) -> None:
            if client.status != "running":
                raise lost_scheduler()
            task.attempts += 1
            stage = STAGES[task.stage]
            available = resources_now.available()
            resources = {k: v for k, v in stage.resources.items() if k in available} or None
            if resources is None and "CPU" in available:  # workers split by kind: keep CPU work off the GPU workers
                resources = {"CPU": 1}
            alone = task.scope == "cohort" or per_stage[task.stage] == 1  # a cohort stage, or a one-slide run
            try:
                future = client.submit(run_task, task.stage, task.key, sched.payload(task), cfg, str(paths.root),
                                       task.fingerprint, task.attempts, alone, task.forced, epoch,
                                       key=f"{task.stage}-{task.key}-{task.attempts}-{time.time_ns()}", pure=False,
                                       resources=resources)
            except (ClosedClientError, CommClosedError, OSError) as exc:
                raise lost_scheduler(exc) from None
            owner[future.key] = task
            needs[future.key] = resources or {}
            futures.add(future)

        def waiting() -> dict[str, int]:
            counts: dict[str, int] = {}
            for key in list(owner):
                for resource in needs.get(key, {}):
                    counts[resource] = counts.get(resource, 0) + 1
            return counts

        for task in to_run:
            submit(task)
        to_run.clear()
        with resources_now.watch(waiting, patience=cfg.runner.worker_wait_s):
            for future, outcome in futures:
                task = owner.pop(future.key)
                needs.pop(future.key, None)
                if isinstance(outcome, BaseException) and client.status != "running":  # not the task: the scheduler
                    owner[future.key] = task
                    raise lost_scheduler(outcome)
                if isinstance(outcome, BaseException):  # the worker died or the task could not run at all
                    reason = f"{type(outcome).__name__}: {outcome}"
                    state = read_state(paths, task.stage, task.key) or {}
                    write_state(paths, task.stage, task.key, status="failed", fingerprint=task.fingerprint,
                                attempts=task.attempts, started=state.get("started"), finished=now(), error=reason,
                                traceback="".join(traceback.format_exception(outcome)))
                    outcome = {"status": "failed", "reason": reason}
                future.release()
                if outcome["status"] == "stale":  # another run took the run directory over (--break-lock): not ours now
                    outcome = {"status": "failed", "reason": outcome["reason"]}
                elif outcome["status"] == "failed" and task.attempts <= cfg.runner.retries:
                    log.info("%s failed (attempt %d): %s; retrying", task.id, task.attempts, outcome["reason"])
                    submit(task)
                    continue
                sched.settle(task, outcome["status"], outcome.get("reason", task.reason))
                expand(sched.next_ready(task))
                for ready in to_run:
                    submit(ready)
                to_run.clear()
    return dashboard


def run_cohort(entries: list[SlideEntry], out: Path, cfg: RunConfig, *, until: str | None = None,
               only: list[str] | None = None, force: list[str] | None = None, break_lock: bool = False,
               on_settled: Callable[[Task], None] = lambda t: None, on_start: Callable[[str], None] = lambda d: None,
               on_plan: Callable[[dict[str, Task]], None] = lambda tasks: None) -> RunReport:
    """Lock ``out``, record config and manifest, build the plan and execute it."""
    paths = RunPaths(Path(out).absolute())  # workers may run elsewhere: never send them a relative path
    notes: list[str] = []
    hashes = HashCache(paths.hash_cache)
    tasks = build_plan(entries, cfg, paths, until=until, only=only, force=force, hashes=hashes)
    check_encoders(cfg, {task.stage for task in tasks.values()}, entries)  # no weights: stop before any work
    check_pixels(cfg, entries, {task.stage for task in tasks.values()})  # features-only slides: no pixel stages
    with RunLock(paths.lock) as lock:
        notes += lock.acquire(break_lock=break_lock, command="wsi-pipeline run")
        hashes.save()
        swept = sweep_temporaries(paths.root)
        if swept:
            notes.append(f"removed {len(swept)} temporary file(s) left by an interrupted run")
        for note in notes:
            log.warning("%s", note)
        write_text(paths.config, dump_config(cfg))
        write_text(paths.manifest, manifest_csv(entries))
        on_plan(tasks)
        dashboard = execute(tasks, entries, cfg, paths, on_settled, on_start, hashes, epoch=lock.me["epoch"])
        hashes.save()  # hashes made while running (fingerprints after cohort stages)
    notes += empty_slide_notes(paths, tasks)
    features_only = [e.slide_id for e in entries if not e.has_pixels]
    if features_only and any(t.stage == "mil" for t in tasks.values()) and cfg.heatmaps.slides != "none":
        notes.append(f"{len(features_only)} features-only slide(s) have no slide file to draw heatmaps on")
    if only:
        notes.append("cohort stages were not run: --only selects a subset of slides")
    for task in tasks.values():
        note = f"{task.stage} ran {task.reason}"
        if task.cohort and task.reason and task.status in ("done", "up-to-date") and note not in notes:
            notes.append(note)  # once per stage: a fold stage's tasks all ran on the same slides
    return RunReport(paths.root, tasks, notes, dashboard)


__all__ = ["ClusterError", "COHORT", "RunReport", "execute", "failure_reason", "run_cohort", "run_task"]
