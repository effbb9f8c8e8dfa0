"""What the CLI's commands share: options of `run` and `predict`, logging, running a cohort with live progress."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

# options `run` and `predict` share
ForceOpt = Annotated[list[str] | None, typer.Option(help="rerun this stage and its dependants even if done (repeatable)")]
SchedulerOpt = Annotated[str | None, typer.Option(help="existing Dask scheduler, tcp://HOST:PORT (overrides runner.scheduler)")]
WorkersOpt = Annotated[int | None, typer.Option(min=1, help="local cluster worker processes (overrides runner.n_workers)")]
RetriesOpt = Annotated[int | None, typer.Option(min=0, help="retries per failed task (overrides runner.retries)")]
BreakLockOpt = Annotated[bool, typer.Option("--break-lock", help="take over the run directory's lock even if it looks live")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")]



def _drop_connection_lost(record: logging.LogRecord) -> bool:
    """Drop Dask's and tornado's tracebacks of a closed connection (a callback still waiting on the scheduler when
    it died): the runner says what was lost and what to do in one line; ``-v`` shows them."""
    exc = record.exc_info[1] if record.exc_info else None
    while exc is not None:
        if type(exc).__name__ in ("CommClosedError", "StreamClosedError"):
            return False
        exc = exc.__cause__ or exc.__context__
    return True


def setup_logging(verbose: bool, console=None) -> None:
    """Log through ``console`` (the one the live progress bar draws on), so log lines and warnings print above
    the bar instead of through it."""
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_path=False, show_time=False)
    if not verbose:
        handler.addFilter(_drop_connection_lost)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler],
                        force=True)
    logging.captureWarnings(True)  # Python warnings too
    import distributed  # noqa: F401  (configures its loggers on import; quieten them after)

    for noisy in ("distributed", "tornado", "bokeh"):  # Dask's own chatter only with -v
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)



def run_with_progress(slides_csv: Path, out: Path, make_config, *, check=None, until=None, only=None, force=None, scheduler=None,
         workers=None, retries=None, break_lock=False, verbose=False) -> None:
    """What `run` and `predict` share: config (from ``make_config()``), manifest, ``check(entries)``, the runner,
    the report; exits 0 only when every task is done."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress

    console = Console(stderr=True, soft_wrap=True)
    setup_logging(verbose, console)
    from pipelines.config import ConfigError
    from pipelines.deploy.bundle import BundleError
    from pipelines.engine.run_lock import LockError
    from pipelines.engine.runner import ClusterError, run_cohort
    from pipelines.live import LiveTasks
    from pipelines.manifest import ManifestError, read_manifest
    from pipelines.stages.table import STAGES

    try:
        cfg = make_config()
        overrides = {k: v for k, v in {"scheduler": scheduler, "n_workers": workers, "retries": retries}.items() if v is not None}
        cfg = cfg.model_copy(update={"runner": cfg.runner.model_copy(update=overrides)})
        entries = read_manifest(slides_csv)
        if check is not None:
            check(entries)
        with Progress(console=console, transient=True) as progress, LiveTasks(progress, out) as live:
            bar = progress.add_task("tasks", total=None)
            report = run_cohort(
                STAGES, entries, out, cfg, until=until, only=only, force=force, break_lock=break_lock,
                on_plan=lambda tasks: (progress.update(bar, total=len(tasks)), live.watch(tasks)),
                on_start=lambda link: console.print(f"Dask dashboard: {link}", highlight=False),
                on_settled=lambda task: progress.advance(bar))
    except (ConfigError, ManifestError, LockError, ClusterError, BundleError, ValueError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    if any(task.status != "up-to-date" for task in report.tasks.values()):
        from pipelines.status import run_status

        try:
            run_status(out, use_cache=False)  # status's report kept for the next `status` (a no-op run changed nothing)
        except (OSError, ValueError) as exc:  # the run's own outcome stands; `status` will derive it again
            logging.getLogger(__name__).debug("status report not kept: %s", exc)
    print_report(console, report)
    raise typer.Exit(0 if report.complete else 1)


def print_report(console, report) -> None:
    from rich.markup import escape

    counts: dict[str, int] = {}
    for task in report.tasks.values():
        counts[task.status] = counts.get(task.status, 0) + 1
    for task in report.failed:
        console.print(f"[red]failed[/red] {escape(task.id)}: {escape(task.reason)}", highlight=False)
    for note in report.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    from pipelines.engine.run_dir import RunPaths
    from pipelines.engine.state import read_state

    for task in report.tasks.values():  # this run's cohort tasks' warnings, e.g. a student not faithful on rare tissue
        if task.scope == "cohort" and task.status in ("done", "up-to-date"):
            for warning in (read_state(RunPaths(Path(report.out)), task.stage, task.key) or {}).get("warnings", []):
                console.print(f"[yellow]warning[/yellow] {task.stage}: {escape(warning)}", highlight=False)
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    console.print(f"{len(report.tasks)} tasks: {summary}; run directory {report.out}", highlight=False)
    console.print(f"see `wsi-pipeline status {report.out}`", highlight=False)


