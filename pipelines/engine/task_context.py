"""What a running task knows about itself, for the stage code it calls: its fingerprint, whether the
user forced it, and where to report progress. Set by the runner around each task (context variables,
so tasks on the threads of one Dask worker never see each other's)."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

# The fingerprint of the task being run, for stages that record it inside their artifacts.
TASK_FINGERPRINT: ContextVar[str | None] = ContextVar("TASK_FINGERPRINT", default=None)
# True when the user asked for the task with --force: stages that resume from checkpoints start over.
TASK_FORCED: ContextVar[bool] = ContextVar("TASK_FORCED", default=False)
# progress(done=…, total=…, unit=…, **extra) of the running task; None outside the runner.
TASK_PROGRESS: ContextVar[Callable[..., None] | None] = ContextVar("TASK_PROGRESS", default=None)


def progress_callback() -> Callable[..., None] | None:
    """The running task's progress reporter, to hand to a training loop (None outside the runner)."""
    return TASK_PROGRESS.get()
