"""The Dask runner: submits the plan's tasks, retries failures, skips the dependants of failed tasks.

Only the engine knows about Dask. Tasks run :func:`pipelines.engine.task.run_task` on a worker, which calls the plain stage
function and records the task's state on the shared run directory. The client keeps the
dependency bookkeeping itself (submit when dependencies are done), so a failed slide never
blocks the others and a cohort stage starts as soon as every slide has settled.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipelines.config import RunConfig, dump_config
from pipelines.engine.cluster import ClusterError, ClusterResources, dask_client
from pipelines.engine.plan import Task, build_plan, is_up_to_date, resolve_fingerprint, settle_cohort
from pipelines.engine.run_dir import RunPaths, sweep_temporaries, write_text
from pipelines.engine.run_lock import RunLock
from pipelines.engine.stage import StageTable
from pipelines.engine.state import COHORT, HashCache, now, read_state, write_state
from pipelines.engine.task import failure_reason, run_task
from pipelines.manifest import FoldPayload, SlideEntry, manifest_csv

log = logging.getLogger(__name__)


def empty_slide_notes(paths: RunPaths, tasks: dict[str, Task]) -> list[str]:
    """Which slides of the run got no tissue, or tissue but zero tiles: they finish 'done' yet add nothing."""
    groups: dict[str, list[str]] = {}
    for task in tasks.values():
        if task.stage != "tiles" or task.status not in ("done", "up-to-date"):
            continue
        state = (task.state if task.status == "up-to-date" else None) or read_state(paths, "tiles", task.key) or {}
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
        # per task, its dependencies not settled yet: a cohort task waits for 10,000 slides, and asking each time
        # one settles whether all have would be quadratic
        self.unsettled: dict[str, int] = {}
        for task in tasks.values():
            for dep in task.deps:
                self.dependants[dep].append(task.id)
            self.unsettled[task.id] = sum(tasks[d].status in ("pending", "running") for d in task.deps)

    def payload(self, task: Task):
        if not task.cohort:
            return self.entries[task.key]
        entries = [self.entries[key] for key in task.included]
        return FoldPayload(task.key, entries) if task.scope == "fold" else entries

    def ready(self, task: Task) -> bool:
        return task.status == "pending" and self.unsettled[task.id] == 0

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
        for dependant in self.dependants[task.id]:
            self.unsettled[dependant] -= 1
        self.on_settled(task)
        return False

    def next_ready(self, settled: Task) -> list[Task]:
        return [self.tasks[t] for t in self.dependants[settled.id] if self.ready(self.tasks[t])]


class _Submitter:
    """The Dask side of a run: submits tasks with the resources the cluster has now, turns what comes back into
    outcomes (a lost worker: failed; a lost scheduler: the run stops), retries failures, reports resource waits."""

    def __init__(self, client, table: StageTable, tasks: dict[str, Task], sched: _Scheduler, cfg: RunConfig,
                 paths: RunPaths, epoch: str | None):
        from distributed import as_completed

        self.client, self.table, self.tasks, self.sched, self.cfg, self.paths, self.epoch = (
            client, table, tasks, sched, cfg, paths, epoch)
        self.resources = ClusterResources(client)
        self.futures = as_completed(with_results=True, raise_errors=False)  # results stream back as tasks finish
        self.owner: dict[str, Task] = {}
        self.needs: dict[str, dict] = {}
        self.per_stage: dict[str, int] = {}
        for t in tasks.values():
            self.per_stage[t.stage] = self.per_stage.get(t.stage, 0) + 1

    def lost_scheduler(self, exc: BaseException | None = None) -> ClusterError:
        finished = sum(t.status in ("done", "up-to-date") for t in self.tasks.values())
        return ClusterError(f"lost the Dask scheduler at {self.client.scheduler.address} while {len(self.owner)} task(s) "
                            f"were submitted{f' ({type(exc).__name__})' if exc else ''}: the run stopped. {finished} task(s) "
                            "finished and are kept; rerun the same command to resume (with --scheduler, once the cluster "
                            "is back)")

    def submit(self, task: Task) -> None:
        from distributed.client import ClosedClientError
        from distributed.comm import CommClosedError

        if self.client.status != "running":
            raise self.lost_scheduler()
        task.attempts += 1
        available = self.resources.available()
        resources = {k: v for k, v in task.spec.resources.items() if k in available} or None
        if resources is None and "CPU" in available:  # workers split by kind: keep CPU work off the GPU workers
            resources = {"CPU": 1}
        alone = task.scope == "cohort" or self.per_stage[task.stage] == 1  # a cohort stage, or a one-slide run
        try:
            future = self.client.submit(run_task, self.table.ref, task.stage, task.key, self.sched.payload(task), self.cfg,
                                        str(self.paths.root), task.fingerprint, task.attempts, alone, task.forced,
                                        self.epoch, key=f"{task.stage}-{task.key}-{task.attempts}-{time.time_ns()}",
                                        pure=False, resources=resources)
        except (ClosedClientError, CommClosedError, OSError) as exc:
            raise self.lost_scheduler(exc) from None
        self.owner[future.key] = task
        self.needs[future.key] = resources or {}
        self.futures.add(future)

    def waiting(self) -> dict[str, int]:
        """Resource → tasks submitted that need it and have not come back."""
        counts: dict[str, int] = {}
        for key in list(self.owner):
            for resource in self.needs.get(key, {}):
                counts[resource] = counts.get(resource, 0) + 1
        return counts

    def outcome(self, future, outcome) -> tuple[Task, dict] | None:
        """A task's outcome as it comes back; None when it was submitted again (a retry)."""
        task = self.owner.pop(future.key)
        self.needs.pop(future.key, None)
        if isinstance(outcome, BaseException) and self.client.status != "running":  # not the task: the scheduler
            self.owner[future.key] = task
            raise self.lost_scheduler(outcome)
        if isinstance(outcome, BaseException):  # the worker died or the task could not run at all
            reason = f"{type(outcome).__name__}: {outcome}"
            state = read_state(self.paths, task.stage, task.key) or {}
            write_state(self.paths, task.stage, task.key, status="failed", fingerprint=task.fingerprint,
                        attempts=task.attempts, started=state.get("started"), finished=now(), error=reason,
                        traceback="".join(traceback.format_exception(outcome)))
            outcome = {"status": "failed", "reason": reason}
        future.release()
        if outcome["status"] == "stale":  # another run took the run directory over (--break-lock): not ours now
            outcome = {"status": "failed", "reason": outcome["reason"]}
        elif outcome["status"] == "failed" and task.attempts <= self.cfg.runner.retries:
            log.info("%s failed (attempt %d): %s; retrying", task.id, task.attempts, outcome["reason"])
            self.submit(task)
            return None
        return task, outcome


def execute(table: StageTable, tasks: dict[str, Task], entries: list[SlideEntry], cfg: RunConfig, paths: RunPaths,
            on_settled: Callable[[Task], None] = lambda t: None, on_start: Callable[[str], None] = lambda d: None,
            hashes: HashCache | None = None, epoch: str | None = None) -> str | None:
    """Run the plan built from ``table`` (its tasks fenced by ``epoch``, the lock's: :func:`run_task`). Returns the
    dashboard link when a cluster was used."""
    sched = _Scheduler(tasks, {e.slide_id: e for e in entries}, cfg, paths, on_settled, hashes)
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

    expand([t for t in tasks.values() if sched.ready(t)])
    if not to_run:
        return None  # everything up to date: no cluster needed
    with dask_client(cfg, len(tasks), warm_up=table.warm_up) as client:
        on_start(client.dashboard_link)
        submitter = _Submitter(client, table, tasks, sched, cfg, paths, epoch)
        with submitter.resources.watch(submitter.waiting, patience=cfg.runner.worker_wait_s):
            while to_run or submitter.owner:
                for task in to_run:
                    submitter.submit(task)
                to_run.clear()
                future, outcome = next(submitter.futures)
                settled = submitter.outcome(future, outcome)
                if settled is not None:
                    task, outcome = settled
                    sched.settle(task, outcome["status"], outcome.get("reason", task.reason))
                    expand(sched.next_ready(task))
        return client.dashboard_link


def run_cohort(table: StageTable, entries: list[SlideEntry], out: Path, cfg: RunConfig, *, until: str | None = None,
               only: list[str] | None = None, force: list[str] | None = None, break_lock: bool = False,
               on_settled: Callable[[Task], None] = lambda t: None, on_start: Callable[[str], None] = lambda d: None,
               on_plan: Callable[[dict[str, Task]], None] = lambda tasks: None) -> RunReport:
    """Lock ``out``, record config and manifest, build the plan of ``table``'s stages and execute it."""
    paths = RunPaths(Path(out).absolute())  # workers may run elsewhere: never send them a relative path
    notes: list[str] = []
    hashes = HashCache(paths.hash_cache)
    tasks = build_plan(table, entries, cfg, paths, until=until, only=only, force=force, hashes=hashes)
    table.check(cfg, {task.stage for task in tasks.values()}, entries)  # e.g. no weights: stop before any work
    with RunLock(paths.lock) as lock:
        notes += lock.acquire(break_lock=break_lock, command="wsi-pipeline run")
        hashes.save()
        swept = sweep_temporaries(paths.root)
        if swept:
            notes.append(f"removed {len(swept)} temporary file(s) left by an interrupted run")
        for note in notes:
            log.warning("%s", note)
        for target, text in ((paths.config, dump_config(cfg)), (paths.manifest, manifest_csv(entries))):
            if not target.exists() or target.read_text() != text:  # unchanged: left alone (status's cache stands)
                write_text(target, text)
        on_plan(tasks)
        dashboard = execute(table, tasks, entries, cfg, paths, on_settled, on_start, hashes, epoch=lock.me["epoch"])
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
