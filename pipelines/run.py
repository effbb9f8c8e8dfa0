"""Run the per-slide stages over a cohort: a plain loop, one slide's failure never stops the others.

Every slide × stage gets a state file ``OUT/state/<stage>/<slide_id>.json`` with its status
(done / failed / skipped), timings, host and, on failure, the reason and traceback.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipelines import __version__
from pipelines.artifacts import RunPaths, write_json, write_text
from pipelines.config import RunConfig, dump_config
from pipelines.manifest import SlideEntry, read_manifest
from pipelines.stages import SLIDE_STAGES
from wsi.errors import SlideError

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    slide_id: str
    stage: str
    status: str  # "done", "failed" or "skipped"
    reason: str = ""
    meta: dict = field(default_factory=dict)


@dataclass
class RunReport:
    out: Path
    outcomes: list[Outcome]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def complete(self) -> bool:
        return all(o.status == "done" for o in self.outcomes)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def failure_reason(exc: BaseException, entry: SlideEntry) -> str:
    """One line saying what went wrong, naming the slides.csv line for slide-file problems."""
    if isinstance(exc, SlideError):
        return f"{exc.reason} (slides.csv {entry.where()})"
    return f"{type(exc).__name__}: {exc}"


def run_slide_stage(stage: str, entry: SlideEntry, cfg: RunConfig, paths: RunPaths) -> Outcome:
    """Run one stage for one slide and record its state; exceptions become a failed state."""
    started, t0 = _now(), time.perf_counter()
    state = {"stage": stage, "slide_id": entry.slide_id, "started": started, "host": socket.gethostname(),
             "pid": os.getpid(), "version": __version__}
    try:
        meta = SLIDE_STAGES[stage](entry, cfg, paths)
    except Exception as exc:  # recorded, reported, and the other slides go on
        reason = failure_reason(exc, entry)
        state.update(status="failed", error=reason, traceback=traceback.format_exc(),
                     finished=_now(), duration_s=round(time.perf_counter() - t0, 3))
        write_json(paths.state(stage, entry.slide_id), state)
        log.error("%s: %s failed: %s", entry.slide_id, stage, reason)
        return Outcome(entry.slide_id, stage, "failed", reason)
    state.update(status="done", finished=_now(), duration_s=round(time.perf_counter() - t0, 3),
                 warnings=meta.get("warnings", []))
    write_json(paths.state(stage, entry.slide_id), state)
    return Outcome(entry.slide_id, stage, "done", meta=meta)


def run_cohort(csv_path: Path, out: Path, cfg: RunConfig,
               on_progress: Callable[[Outcome], None] | None = None) -> RunReport:
    """Run every stage for every slide of ``csv_path`` into ``out``; returns what happened to each."""
    entries = read_manifest(csv_path)
    paths = RunPaths(Path(out))
    paths.root.mkdir(parents=True, exist_ok=True)
    write_text(paths.config, dump_config(cfg))
    outcomes: list[Outcome] = []
    for entry in entries:
        blocked = ""
        for stage in SLIDE_STAGES:
            if blocked:
                outcome = Outcome(entry.slide_id, stage, "skipped", f"{blocked} failed")
                write_json(paths.state(stage, entry.slide_id),
                           {"stage": stage, "slide_id": entry.slide_id, "status": "skipped", "error": outcome.reason,
                            "finished": _now(), "version": __version__})
            else:
                outcome = run_slide_stage(stage, entry, cfg, paths)
                if outcome.status == "failed":
                    blocked = stage
            outcomes.append(outcome)
            if on_progress is not None:
                on_progress(outcome)
    return RunReport(paths.root, outcomes)
