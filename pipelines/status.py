"""``wsi-pipeline status``: every slide × stage of a run directory, from its state files.

A task shows ``done`` only when it is up to date (same fingerprint as the run's config and slide
files now would give, artifacts present); ``stale`` when it finished under other parameters or
inputs; ``interrupted`` when a run died while it was running; ``pending`` when it never ran.

Deriving that for 10,000 slides reads 50,000 state files (~5 s), so the report is kept in
``state/_status.json`` with what it was derived from: the stat of run.yaml, the manifest, every state file, slide
file and weights file, and of every folder an artifact lives in (a rename into a folder or a deletion from it
changes it). While all of those stand and no run is live, ``status`` answers from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipelines.engine.run_dir import RunPaths, write_json
from pipelines.engine.run_lock import RunLock
from pipelines.engine.state import COHORT, read_state


def run_status(out: Path, use_cache: bool = True) -> dict:
    """``{"slides": {slide_id: {stage: {"status", "error", ["warnings"]}}}, "cohort": {...}, "stages": [...],
    "locked_by": ...}``; from ``state/_status.json`` while what it was derived from stands (``use_cache``)."""
    paths = RunPaths(Path(out).absolute())
    if not paths.manifest.exists() or not paths.config.exists():
        raise FileNotFoundError(f"{out} is not a run directory (no slides.csv / run.yaml): run `wsi-pipeline run` first")
    live = live_lock(paths)
    if use_cache and live is None:
        cached = _cached(paths)
        if cached is not None:
            return cached
    report, watched = _derive(paths, live)
    if live is None:  # a live run changes states as we read them: nothing to keep
        write_json(paths.status_cache, {"watched": _stats(watched), "report": report})
    return report


def live_lock(paths: RunPaths) -> dict | None:
    """The lock's holder when a run holds the directory now, else None."""
    lock = RunLock(paths.lock)
    holder = lock.holder() if paths.lock.exists() else None
    return holder if holder is not None and holder.get("pid") is not None and not lock.is_stale(holder) else None


def _stats(files: list[str]) -> dict[str, list[int] | None]:
    out = {}
    for name in files:
        try:
            st = os.stat(name)
            out[name] = [st.st_size, st.st_mtime_ns]
        except OSError:
            out[name] = None
    return out


def _cached(paths: RunPaths) -> dict | None:
    try:
        cache = json.loads(paths.status_cache.read_text())
    except (OSError, ValueError):
        return None
    watched = cache.get("watched") or {}
    return cache["report"] if watched and _stats(list(watched)) == watched else None


def _derive(paths: RunPaths, live: dict | None) -> tuple[dict, list[str]]:
    """The report from the state files, and every file and folder it depends on."""
    # imported here: a kept report is read without the config, the plan or the stage modules (0.3 s of imports)
    from pipelines.config import load_config
    from pipelines.engine.plan import build_plan, is_up_to_date, resolve_fingerprint, settle_cohort
    from pipelines.engine.state import HashCache
    from pipelines.manifest import read_manifest
    from pipelines.stages.table import STAGES

    cfg = load_config(paths.config)
    entries = read_manifest(paths.manifest)
    hashes = HashCache(paths.hash_cache)  # read only: status never rehashes a file the run hashed
    tasks = build_plan(STAGES, entries, cfg, paths, hashes=hashes)
    by_id = {e.slide_id: e for e in entries}
    report: dict = {"out": str(paths.root), "stages": list(dict.fromkeys(t.stage for t in tasks.values())),
                    "slides": {e.slide_id: {} for e in entries}, "cohort": {}, "locked_by": live}
    folds: dict[str, dict] = {}
    for task in tasks.values():  # in stage order, so fingerprints after cohort tasks can be resolved
        state = read_state(paths, task.stage, task.key)
        if task.cohort and state and state.get("status") == "done":
            # the slides it ran on: those whose upstream tasks finished (stale or not, as a run would redo and
            # include them); whether it is up to date is its fingerprint's business, from the current ones
            settle_cohort(cfg, task, tasks, by_id, lambda t: finished(paths, t), hashes)
        elif task.fingerprint is None and not task.cohort:
            task.fingerprint = resolve_fingerprint(cfg, task, tasks, by_id, hashes)
        status = (state or {}).get("status", "pending")
        if status == "done" and not is_up_to_date(paths, task, cfg):
            status = "stale"
        elif status == "running" and live is None:
            status = "interrupted"
        cell = {"status": status, "error": ((state or {}).get("error") or "").splitlines()[0] if state and state.get("error") else ""}
        if state and state.get("attempts"):
            cell["attempts"] = state["attempts"]
        if state and state.get("warnings"):  # a slide that finished with parts left out, an estimated mpp, ...
            cell["warnings"] = list(state["warnings"])
        if status == "running" and state.get("progress"):
            cell["progress"] = state["progress"]
        if task.scope == "fold":
            folds.setdefault(task.stage, {})[task.key] = cell
        elif task.key == COHORT:
            report["cohort"][task.stage] = cell
        else:
            report["slides"][task.key][task.stage] = cell
    for stage, cells in folds.items():  # one line per fold stage, its tasks inside
        report["cohort"][stage] = {**summarise_cells(cells), "tasks": cells}
    report["cohort"] = {s: report["cohort"][s] for s in report["stages"] if s in report["cohort"]}  # run order
    states = [str(paths.state(t.stage, t.key)) for t in tasks.values()]  # edited in place or not, each is seen
    folders = {str(a.parent) for t in tasks.values() for a in t.spec.artifacts(paths, t.key, cfg)}
    inputs = [str(paths.config), str(paths.manifest), str(paths.hash_cache)]
    inputs += [str(e.slide_path) for e in entries if e.slide_path is not None]
    inputs += [str(w) for w in (cfg.features.teacher.weights, cfg.distill.student.weights) if w is not None]
    if cfg.tissue.mask_dir is not None:
        inputs.append(str(cfg.tissue.mask_dir))
    return report, [*inputs, *states, *sorted(folders)]


def finished(paths: RunPaths, task) -> bool:
    """Whether a task's last run ended done (up to date or not); cohort and fold tasks also need their slides."""
    return (read_state(paths, task.stage, task.key) or {}).get("status") == "done"


def summarise_cells(cells: dict[str, dict]) -> dict:
    """One status for a fold stage: the most urgent of its tasks' (failed > interrupted > running > stale > …)."""
    order = ["failed", "interrupted", "running", "stale", "skipped", "pending", "done"]
    statuses = [c["status"] for c in cells.values()]
    status = min(statuses, key=order.index) if statuses else "pending"
    error = next((f"{key}: {c['error']}" for key, c in cells.items() if c["error"]), "")
    return {"status": status, "error": error, "done": statuses.count("done"), "total": len(statuses)}


def is_complete(report: dict) -> bool:
    cells = [c for row in report["slides"].values() for c in row.values()] + list(report["cohort"].values())
    return all(c["status"] == "done" for c in cells)
