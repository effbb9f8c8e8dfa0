"""What the engine knows of a stage: a declaration (:class:`Stage`) in a table handed to it (:class:`StageTable`).

The table names itself (``ref``, ``module:attribute``) so a worker process imports the same one; the engine never
imports a stage module itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from pipelines.config import RunConfig
    from pipelines.engine.run_dir import RunPaths
    from pipelines.manifest import SlideEntry


@dataclass(frozen=True)
class Stage:
    """A stage declaration: what it runs, on what, after what, which config it reads, what it writes."""

    name: str
    fn: Callable
    scope: Literal["slide", "cohort", "fold"]  # fold: several cohort-like tasks, one per key (``keys``)
    after: tuple[str, ...] = ()
    # cohort and fold stages: stages they also wait for when this config runs them, without pulling them into a
    # run that stops earlier (``--until``): qc waits for the features read when that read checks the tiles
    waits_for: Callable[[RunConfig], tuple[str, ...]] = lambda cfg: ()
    config: tuple[str, ...] = ()  # dotted RunConfig fields (or whole sections) whose values enter the fingerprint
    reads_slide: bool = False  # the slide file itself is an input
    artifacts: Callable[[RunPaths, str, RunConfig], list[Path]] = lambda paths, key, cfg: []
    resources: dict[str, float] = field(default_factory=dict)  # Dask resources, e.g. {"GPU": 1}
    extra_inputs: Callable[..., list] = lambda cfg, hashes: []  # more input fingerprints (e.g. weight files)
    slide_inputs: Callable[..., list] = lambda cfg, entry, hashes: []  # more per-slide inputs (a corrected mask)
    # a slide without pixels (imported features): the inputs that stand for the task instead, None: no such case
    stands_for: Callable[..., list] | None = None
    enabled: Callable[[RunConfig], bool] = lambda cfg: True  # False: this config does not need the stage
    applies: Callable[[RunConfig, SlideEntry], bool] = lambda cfg, entry: True  # slide stages: which slides get a task
    encoders: Callable[[RunConfig], list[str]] = lambda cfg: []  # dotted config fields of the encoders it builds from spec
    uses_torch: bool = False  # runs a model: the runner sets torch's threads to the cores the task owns
    # fold stages: the task keys, the keys of the same stage each waits for, what else enters its fingerprint,
    # and which upstream stages' fingerprints do (default: all of ``after``)
    keys: Callable[[RunConfig, list[SlideEntry]], list[str]] = lambda cfg, entries: []
    needs: Callable[[RunConfig, str], list[str]] = lambda cfg, key: []
    key_inputs: Callable[[RunConfig, str], list] = lambda cfg, key: []
    fingerprint_stages: Callable[[RunConfig, str], tuple[str, ...]] | None = None
    pixels: bool = False  # needs the slide files (not only their features): refused on a features-only cohort
    reads_labels: bool = True  # a cohort stage reads slides.csv's labels, cases or splits: editing them reruns it


@dataclass(frozen=True)
class StageTable:
    """The stages of a run in run order, and what the engine runs around them: ``check`` before any task
    (refuse a run that cannot work, naming the field), ``warm_up`` (``module:function``) once per worker."""

    stages: dict[str, Stage]
    ref: str  # ``module:attribute`` of this table, imported by workers (:func:`load_table`)
    check: Callable[[Any, set[str], list], None] = lambda cfg, stages, entries: None
    warm_up: str | None = None

    def __getitem__(self, name: str) -> Stage:
        return self.stages[name]

    def __contains__(self, name: object) -> bool:
        return name in self.stages

    def __iter__(self) -> Iterator[str]:
        return iter(self.stages)

    def upstream(self, stage: str) -> list[str]:
        """Every stage ``stage`` depends on, transitively, in run order."""
        needed: set[str] = set()
        todo = list(self.stages[stage].after)
        while todo:
            name = todo.pop()
            if name not in needed:
                needed.add(name)
                todo.extend(self.stages[name].after)
        return [s for s in self.stages if s in needed]

    def downstream(self, stage: str) -> list[str]:
        """``stage`` and every stage that depends on it, transitively, in run order."""
        return [s for s in self.stages if s == stage or stage in self.upstream(s)]


@lru_cache(maxsize=4)
def load_table(ref: str) -> StageTable:
    """The table a ``module:attribute`` reference names (a worker's copy of the client's)."""
    return _resolve(ref)


def load_callable(ref: str) -> Callable:
    """The function a ``module:function`` reference names (a worker plugin's warm-up)."""
    return _resolve(ref)


def _resolve(ref: str):
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)
