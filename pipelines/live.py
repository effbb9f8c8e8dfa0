"""The live display of ``run``: one progress row per running task that reports progress (distillation
epochs, CLAM epochs of a fold task, End2end steps), read from the task state files the workers write."""

from __future__ import annotations

import threading
from pathlib import Path

from pipelines.engine.run_dir import RunPaths
from pipelines.engine.state import read_state


def progress_text(progress: dict | None) -> str:
    """`` (epoch 12/200)`` from a state's ``progress`` record, with the distillation's held-out scores when it
    reports them; empty without one."""
    if not progress or progress.get("done") is None:
        return ""
    total = f"/{progress['total']}" if progress.get("total") else ""
    scores = "".join(f", {label} {progress[key]:.3f}" for key, label in (("val_cosine", "held-out cosine"),
                                                                          ("worst_cluster_r2", "worst cluster R²"))
                     if isinstance(progress.get(key), (int, float)))
    return f" ({progress.get('unit', 'step')} {progress['done']}{total}{scores})"


class LiveTasks:
    """Polls the running tasks' state files every ``interval`` seconds and mirrors their progress as rows
    of a rich ``Progress``; a row goes away when its task stops running."""

    def __init__(self, progress, out: Path, interval: float = 1.0):
        self.progress, self.paths, self.interval = progress, RunPaths(Path(out).absolute()), interval
        self.tasks: dict = {}
        self.rows: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="live-tasks")

    def watch(self, tasks: dict) -> None:
        self.tasks = tasks

    def poll(self) -> None:
        running = {tid: t for tid, t in list(self.tasks.items()) if t.status == "running"}
        for tid in [t for t in self.rows if t not in running]:
            self.progress.remove_task(self.rows.pop(tid))
        for tid, task in running.items():
            state = read_state(self.paths, task.stage, task.key) or {}
            record = state.get("progress") if state.get("status") == "running" else None
            if not record or record.get("done") is None:
                continue
            description = f"{tid} {record.get('unit', 'step')}"
            if tid not in self.rows:
                self.rows[tid] = self.progress.add_task(description, total=record.get("total"))
            self.progress.update(self.rows[tid], completed=record["done"], total=record.get("total"),
                                 description=description)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def __enter__(self) -> LiveTasks:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
