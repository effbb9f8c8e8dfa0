"""Which tasks a run consists of, their dependencies and fingerprints, and which are already up to date.

Used by the runner (what to submit) and by ``status`` (what is done, stale or pending), so both
agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines.artifacts import RunPaths
from pipelines.config import RunConfig
from pipelines.manifest import SlideEntry
from pipelines.stages import STAGES, downstream, upstream
from pipelines.state import COHORT, HashCache, file_fingerprint, fingerprint, read_state


@dataclass
class Task:
    stage: str
    key: str  # slide id, or COHORT
    deps: list[str] = field(default_factory=list)  # task ids
    fingerprint: str | None = None  # None for cohort tasks until their slides are known
    forced: bool = False
    status: str = "pending"  # pending → up-to-date | done | failed | skipped
    reason: str = ""
    attempts: int = 0
    included: list[str] = field(default_factory=list)  # cohort tasks: the slides they run on

    @property
    def id(self) -> str:
        return f"{self.stage}/{self.key}"

    @property
    def cohort(self) -> bool:
        return self.key == COHORT


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
    return all(p.exists() for p in STAGES[task.stage].artifacts(paths, task.key, cfg))


def settle_cohort(cfg: RunConfig, task: Task, tasks: dict[str, Task], entries: dict[str, SlideEntry],
                  finished, hashes: HashCache | None = None) -> tuple[list[str], int]:
    """Decide which slides a cohort task runs on — those whose every upstream task passes ``finished`` —
    and set its fingerprint from them. Returns (included slide ids, slides left out)."""
    per_slide: dict[str, list[Task]] = {}
    for dep in task.deps:
        per_slide.setdefault(tasks[dep].key, []).append(tasks[dep])
    included = [key for key, deps in per_slide.items() if all(finished(d) for d in deps)]
    task.included = included
    task.fingerprint = cohort_fingerprint(cfg, task, [(entries[k], "|".join(d.fingerprint or "" for d in per_slide[k]))
                                                      for k in included], hashes)
    return included, len(per_slide) - len(included)


def cohort_fingerprint(cfg: RunConfig, task: Task, slides: list[tuple[SlideEntry, str]],
                       hashes: HashCache | None = None) -> str:
    """Over the included slides' upstream fingerprints and their manifest fields (labels, cases, splits)."""
    stage = STAGES[task.stage]
    rows = sorted((e.slide_id, fp, e.label, e.case_id, e.split) for e, fp in slides)
    return fingerprint(stage.name, config_values(cfg, stage.config), [*rows, *stage.extra_inputs(cfg, hashes)])


def slide_fingerprint(cfg: RunConfig, task: Task, entry: SlideEntry, dep_fps: list[str],
                      hashes: HashCache | None = None) -> str:
    """Over the stage's config fields, the slide file (stages that read it), upstream fingerprints and extras."""
    stage = STAGES[task.stage]
    inputs: list[Any] = []
    if stage.reads_slide:
        inputs.append({"slide": file_fingerprint(entry.slide_path, cfg.slides.fingerprint, hashes), "mpp": entry.mpp})
    inputs.extend(dep_fps)
    inputs.extend(stage.extra_inputs(cfg, hashes))
    return fingerprint(stage.name, config_values(cfg, stage.config), inputs)


def resolve_fingerprint(cfg: RunConfig, task: Task, tasks: dict[str, Task], entries: dict[str, SlideEntry],
                        hashes: HashCache | None = None) -> str | None:
    """A slide task's fingerprint once every dependency has one (cohort dependencies get theirs at run time)."""
    dep_fps = [tasks[d].fingerprint for d in task.deps]
    if task.cohort or any(fp is None for fp in dep_fps):
        return None
    return slide_fingerprint(cfg, task, entries[task.key], dep_fps, hashes)


def build_plan(entries: list[SlideEntry], cfg: RunConfig, paths: RunPaths, *, until: str | None = None,
               only: list[str] | None = None, force: list[str] | None = None,
               hashes: HashCache | None = None) -> dict[str, Task]:
    """All tasks of a run in dependency order, with fingerprints where they can be known before running.

    A cohort task depends on its ``after`` stage for every slide; a slide stage after a cohort stage
    depends on that cohort task. ``hashes`` caches file sha256s (weights; slides with ``slides.fingerprint: content``).
    """
    hashes = hashes if hashes is not None else HashCache(paths.hash_cache)
    for name in [until, *(force or [])]:
        if name is not None and name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages are {list(STAGES)}")
    selected = list(STAGES) if until is None else [*upstream(until), until]
    selected = [s for s in selected if STAGES[s].enabled(cfg)]  # e.g. no distillation for a teacher-only run
    forced = {s for name in (force or []) for s in downstream(name)}
    if only:
        known = {e.slide_id for e in entries}
        unknown = [s for s in only if s not in known]
        if unknown:
            raise ValueError(f"--only: no slide with id {', '.join(unknown)} in the manifest")
        entries = [e for e in entries if e.slide_id in set(only)]
        # cohort stages need the whole cohort, and so do the slide stages that come after one
        selected = [s for s in selected if STAGES[s].scope == "slide"
                    and not any(STAGES[u].scope == "cohort" for u in upstream(s))]
    by_id = {e.slide_id: e for e in entries}
    tasks: dict[str, Task] = {}
    for name in selected:
        stage = STAGES[name]
        if stage.scope == "cohort":
            deps = [f"{dep}/{e.slide_id}" for dep in stage.after for e in entries if f"{dep}/{e.slide_id}" in tasks]
            task = Task(name, COHORT, deps, None, name in forced)
            tasks[task.id] = task
            continue
        for entry in entries:
            if not stage.applies(cfg, entry):
                continue
            deps = [f"{dep}/{COHORT}" if STAGES[dep].scope == "cohort" else f"{dep}/{entry.slide_id}"
                    for dep in stage.after if dep in selected]
            task = Task(name, entry.slide_id, deps, None, name in forced)
            task.fingerprint = resolve_fingerprint(cfg, task, tasks, by_id, hashes)
            tasks[task.id] = task
    return tasks
