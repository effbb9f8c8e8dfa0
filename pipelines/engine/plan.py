"""Which tasks a run consists of, their dependencies and fingerprints, and which are already up to date.

Used by the runner (what to submit) and by ``status`` (what is done, stale or pending), so both
agree by construction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import RunConfig
from pipelines.engine.run_dir import RunPaths
from pipelines.engine.stage import Stage, StageTable
from pipelines.engine.state import COHORT, HashCache, file_fingerprint, fingerprint, read_state
from pipelines.manifest import SlideEntry


@dataclass
class Task:
    spec: Stage = field(repr=False)  # the stage's declaration, from the table the plan was built with
    stage: str
    key: str  # slide id, COHORT, or a fold stage's key
    deps: list[str] = field(default_factory=list)  # task ids
    fingerprint: str | None = None  # None for cohort and fold tasks until their slides are known
    forced: bool = False
    status: str = "pending"  # pending → up-to-date | done | failed | skipped
    reason: str = ""
    attempts: int = 0
    included: list[str] = field(default_factory=list)  # cohort and fold tasks: the slides they run on
    scope: str = "slide"  # the stage's scope: slide, cohort or fold
    state: dict | None = field(default=None, repr=False)  # its state file as read when found up to date (read once)

    @property
    def id(self) -> str:
        return f"{self.stage}/{self.key}"

    @property
    def cohort(self) -> bool:
        """Runs on a set of slides (a cohort or fold task), settled once every upstream task has."""
        return self.scope != "slide"


def config_values(cfg: RunConfig, fields: tuple[str, ...]) -> dict[str, Any]:
    """The values of dotted config fields (``"tissue"`` or ``"slides.backend"``) as plain data."""
    values = {}
    for dotted in fields:
        obj: Any = cfg
        for part in dotted.split("."):
            obj = getattr(obj, part)
        values[dotted] = obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj
    return values


def is_up_to_date(paths: RunPaths, task: Task, cfg: RunConfig) -> bool:
    """Done, same fingerprint, artifacts present, not forced."""
    if task.forced or task.fingerprint is None:
        return False
    state = read_state(paths, task.stage, task.key)
    if not state or state.get("status") != "done" or state.get("fingerprint") != task.fingerprint:
        return False
    if not all(os.path.exists(p) for p in task.spec.artifacts(paths, task.key, cfg)):
        return False
    task.state = state
    return True


def settle_cohort(cfg: RunConfig, task: Task, tasks: dict[str, Task], entries: dict[str, SlideEntry],
                  finished, hashes: HashCache | None = None) -> tuple[list[str], int, list[str]]:
    """Decide which slides a cohort or fold task runs on — those whose every upstream slide task passes
    ``finished`` — and set its fingerprint from them. A task that waits for other cohort or fold tasks runs
    on their slides, and only when all of them passed. Returns (included slide ids, slides left out,
    cohort/fold dependencies that did not finish)."""
    per_slide: dict[str, list[Task]] = {}
    groups = [tasks[dep] for dep in task.deps if tasks[dep].cohort]
    for dep in task.deps:
        if not tasks[dep].cohort:
            per_slide.setdefault(tasks[dep].key, []).append(tasks[dep])
    blocked = [g.id for g in groups if not finished(g)]
    included = [key for key, deps in per_slide.items() if all(finished(d) for d in deps)]
    if groups and not blocked:
        shared = set.intersection(*(set(g.included) for g in groups))
        included = [k for k in included if k in shared] if per_slide else [k for k in groups[0].included if k in shared]
    if blocked:
        included = []
    task.included = included
    stage = task.spec
    counted = stage.fingerprint_stages(cfg, task.key) if stage.fingerprint_stages else None
    rows = [(entries[k], "|".join(d.fingerprint or "" for d in per_slide.get(k, []) if counted is None or d.stage in counted))
            for k in included]
    task.fingerprint = cohort_fingerprint(cfg, task, rows, hashes, [g.fingerprint for g in groups])
    total = len(per_slide) if per_slide else len(groups[0].included) if groups else 0
    return included, total - len(included), blocked


def cohort_fingerprint(cfg: RunConfig, task: Task, slides: list[tuple[SlideEntry, str]],
                       hashes: HashCache | None = None, group_fps: list[str | None] = ()) -> str:
    """Over the included slides' upstream fingerprints and, for a stage that reads them, their manifest fields
    (labels, cases, splits: a corrected label reruns no label-free distillation), the cohort/fold tasks it waits
    for, and a fold task's key inputs."""
    stage = task.spec
    rows = sorted((e.slide_id, fp, *((e.label, e.case_id, e.split) if stage.reads_labels else ())) for e, fp in slides)
    extras = [*stage.extra_inputs(cfg, hashes), *(stage.key_inputs(cfg, task.key) if task.scope == "fold" else [])]
    return fingerprint(stage.name, config_values(cfg, stage.config), [*rows, *extras, *sorted(fp or "" for fp in group_fps)])


def slide_fingerprint(cfg: RunConfig, task: Task, entry: SlideEntry, dep_fps: list[str],
                      hashes: HashCache | None = None, root: Path | None = None) -> str:
    """Over the stage's config fields, the slide file (stages that read it), the stage's own per-slide inputs,
    upstream fingerprints and extras. A slide without pixels whose stage says what stands for it (an imported
    features store) is fingerprinted by that alone."""
    stage = task.spec
    if not entry.has_pixels and stage.stands_for is not None and root is not None:
        return fingerprint(stage.name, {}, stage.stands_for(cfg, entry, root, hashes))
    inputs: list[Any] = []
    if stage.reads_slide:
        inputs.append({"slide": file_fingerprint(entry.slide_path, cfg.slides.fingerprint, hashes), "mpp": entry.mpp})
    inputs.extend(stage.slide_inputs(cfg, entry, hashes))
    inputs.extend(dep_fps)
    inputs.extend(stage.extra_inputs(cfg, hashes))
    return fingerprint(stage.name, config_values(cfg, stage.config), inputs)


def resolve_fingerprint(cfg: RunConfig, task: Task, tasks: dict[str, Task], entries: dict[str, SlideEntry],
                        hashes: HashCache | None = None, root: Path | None = None) -> str | None:
    """A slide task's fingerprint once every dependency has one (cohort dependencies get theirs at run time)."""
    dep_fps = [tasks[d].fingerprint for d in task.deps]
    if task.cohort or any(fp is None for fp in dep_fps):
        return None
    return slide_fingerprint(cfg, task, entries[task.key], dep_fps, hashes, root)


def _stage_deps(table: StageTable, stages: tuple[str, ...], selected: list[str], tasks: dict[str, Task],
                entries: list[SlideEntry]) -> list[str]:
    """The planned tasks of ``stages`` a cohort or fold task waits for: all of a cohort or fold stage's, a slide
    stage's on every slide that has one."""
    deps = []
    for dep in stages:
        if dep in selected and table[dep].scope != "slide":
            deps += [tid for tid, t in tasks.items() if t.stage == dep]
        else:
            deps += [f"{dep}/{e.slide_id}" for e in entries if f"{dep}/{e.slide_id}" in tasks]
    return deps


def build_plan(table: StageTable, entries: list[SlideEntry], cfg: RunConfig, paths: RunPaths, *, until: str | None = None,
               only: list[str] | None = None, force: list[str] | None = None,
               hashes: HashCache | None = None) -> dict[str, Task]:
    """All tasks of a run in dependency order, with fingerprints where they can be known before running.

    A cohort task depends on its ``after`` stage for every slide; a slide stage after a cohort stage
    depends on that cohort task. ``hashes`` caches file sha256s (weights; slides with ``slides.fingerprint: content``).
    """
    hashes = hashes if hashes is not None else HashCache(paths.hash_cache)
    for name in [until, *(force or [])]:
        if name is not None and name not in table:
            raise ValueError(f"unknown stage {name!r}; stages are {list(table)}")
    selected = list(table) if until is None else [*table.upstream(until), until]
    selected = [s for s in selected if table[s].enabled(cfg)]  # e.g. no distillation for a teacher-only run
    forced = {s for name in (force or []) for s in table.downstream(name)}
    if only:
        known = {e.slide_id for e in entries}
        unknown = [s for s in only if s not in known]
        if unknown:
            raise ValueError(f"--only: no slide with id {', '.join(unknown)} in the manifest")
        entries = [e for e in entries if e.slide_id in set(only)]
        # cohort stages need the whole cohort, and so do the slide stages that come after one
        selected = [s for s in selected if table[s].scope == "slide"
                    and not any(table[u].scope == "cohort" for u in table.upstream(s))]
    by_id = {e.slide_id: e for e in entries}
    tasks: dict[str, Task] = {}
    for name in selected:
        stage = table[name]
        if stage.scope in ("cohort", "fold"):
            deps = _stage_deps(table, stage.after, selected, tasks, entries)
            if stage.after and not deps:  # e.g. qc on a features-only cohort: no slide has tiles
                continue
            slides = {tasks[d].key for d in deps if not tasks[d].cohort}  # what it waits for too, on those slides only
            deps += [d for d in _stage_deps(table, stage.waits_for(cfg), selected, tasks, entries)
                     if tasks[d].cohort or tasks[d].key in slides]
            for key in (stage.keys(cfg, entries) if stage.scope == "fold" else [COHORT]):
                own = [f"{name}/{k}" for k in stage.needs(cfg, key)] if stage.scope == "fold" else []
                task = Task(stage, name, key, deps + own, None, name in forced, scope=stage.scope)
                tasks[task.id] = task
            continue
        for entry in entries:
            if not stage.applies(cfg, entry):
                continue
            deps = [f"{dep}/{COHORT}" if table[dep].scope == "cohort" else f"{dep}/{entry.slide_id}"
                    for dep in stage.after if dep in selected]
            deps = [d for d in deps if d in tasks or d.endswith(f"/{COHORT}")]  # a features-only slide has no tiles task
            task = Task(stage, name, entry.slide_id, deps, None, name in forced)
            task.fingerprint = resolve_fingerprint(cfg, task, tasks, by_id, hashes, paths.root)
            tasks[task.id] = task
    return tasks
