"""``wsi-pipeline`` command line. Heavy imports stay inside commands so ``--help`` is fast."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipelines.cli_common import (
    BreakLockOpt,
    ForceOpt,
    RetriesOpt,
    SchedulerOpt,
    VerboseOpt,
    WorkersOpt,
    run_with_progress,
    setup_logging,
)
from pipelines.cli_deploy import register
from pipelines.demo_config import DEMO_CONFIG
from pipelines.viewer.cli import view

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Whole-slide images → tissue masks, tiles, features, CLAM models and heatmaps.")

def _version(value: bool) -> None:
    if value:
        from pipelines import __version__

        typer.echo(f"wsi-pipeline {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """wsi-pipeline: slides.csv in, slide-level diagnoses and heatmaps out."""


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Argument(help="folder to write the demo slides, slides.csv and run.yaml into")],
    n_slides: Annotated[int, typer.Option(min=1, help="number of slides (half tumour-positive)")] = 24,
    size: Annotated[int, typer.Option(min=1024, help="level-0 width in pixels of the 40× slides (height is 3/4)")] = 8192,
    seed: Annotated[int, typer.Option(help="random seed; the same seed gives the same cohort")] = 0,
    tumour_fraction: Annotated[float | None, typer.Option(min=0.001, max=0.999,
                                                             help="focal lesions: the tumour's share of each positive "
                                                                  "slide's tissue (e.g. 0.05); default: one or two "
                                                                  "large tumour regions")] = None,
    foci: Annotated[int | None, typer.Option(min=1, help="number of tumour foci per positive slide "
                                                            "(default: 1 with --tumour-fraction, else 1 or 2)")] = None,
    artefacts: Annotated[list[str] | None, typer.Option(help="artefacts to draw on every slide, with their truth "
                                                                 "(<id>.ink.png, .blur.png, .faint.png, .bubble.png, "
                                                                 ".fold.png): ink (pen strokes and a circle), blur "
                                                                 "(out-of-focus fields), faint (pale-stained tissue), "
                                                                 "ihc (the tissue IHC-stained), bubbles (air bubbles "
                                                                 "and a coverslip edge), fold (tissue folded on itself); "
                                                                 "repeat the option for several")] = None,
) -> None:
    """Write a small cohort of real pyramidal slides (Aperio SVS + generic TIFF) with ground truth."""
    from rich.progress import Progress

    from pipelines.engine.run_dir import write_text
    from wsi.demo_artefacts import ARTEFACTS
    from wsi.demo_cohort import make_demo_cohort

    if set(artefacts or ()) - set(ARTEFACTS):
        raise typer.BadParameter(f"unknown {sorted(set(artefacts) - set(ARTEFACTS))}; choose from {list(ARTEFACTS)}",
                                 param_hint="--artefacts")
    with Progress(transient=True) as progress:
        task = progress.add_task("writing demo slides", total=n_slides)
        csv_path = make_demo_cohort(out_dir, n_slides=n_slides, size=size, seed=seed, tumour_fraction=tumour_fraction,
                                    foci=foci, artefacts=tuple(artefacts or ()),
                                    progress=lambda done, total: progress.update(task, completed=done))
    folds = max(2, min(4, n_slides // 2))  # stratified folds: at most one per slide of the rarer label
    write_text(out_dir / "run.yaml", DEMO_CONFIG.replace("  folds: 4\n", f"  folds: {folds}\n"))
    typer.echo(f"wrote {n_slides} slides and {csv_path}")
    typer.echo(f"next: wsi-pipeline run {csv_path} --config {out_dir / 'run.yaml'} --out runs/demo")


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="where to write the config")] = Path("run.yaml"),
    force: Annotated[bool, typer.Option(help="overwrite an existing file")] = False,
) -> None:
    """Write a default run config, every field commented with what it does."""
    from pipelines.config import commented_template
    from pipelines.engine.run_dir import write_text

    if path.exists() and not force:
        typer.echo(f"{path} exists; use --force to overwrite it", err=True)
        raise typer.Exit(2)
    write_text(path, "# wsi-pipeline run config (wsi-pipeline init). Unknown keys are errors.\n" + commented_template() + "\n")
    typer.echo(f"wrote {path}")


@app.command()
def run(
    slides_csv: Annotated[Path, typer.Argument(help="slides.csv: slide_path, optional slide_id, label, case_id, split, mpp")],
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory (rerunning into it resumes)")] = Path("wsi_run"),
    config: Annotated[Path | None, typer.Option("--config", "-c", help="run config YAML (see `wsi-pipeline init`)")] = None,
    until: Annotated[str | None, typer.Option(help="run up to and including this stage")] = None,
    only: Annotated[list[str] | None, typer.Option(help="only these slide ids (repeatable); cohort stages are not run")] = None,
    force: ForceOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    retries: RetriesOpt = None,
    break_lock: BreakLockOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run (or resume) every stage for every slide of SLIDES_CSV into OUT. Exit code 0 only when all is done."""
    from pipelines.config import load_config

    run_with_progress(slides_csv, out, lambda: load_config(config), until=until, only=only, force=force, scheduler=scheduler,
         workers=workers, retries=retries, break_lock=break_lock, verbose=verbose)


STATUS_ROWS = 200  # slides in status's table, beyond which it shows counts and the slides that are not done


@app.command()
def status(
    out: Annotated[Path, typer.Argument(help="run directory")] = Path("wsi_run"),
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    every_slide: Annotated[bool, typer.Option("--all", help="a row for every slide, even in a large run")] = False,
) -> None:
    """Show every slide × stage of a run: done, failed (with the error), stale, interrupted or pending. A run of
    more than 200 slides shows each stage's counts and the slides that are not done (``--all``: every slide)."""
    import json
    import sys

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from pipelines.live import progress_text
    from pipelines.status import is_complete, run_status

    try:
        report = run_status(out)
    except (FileNotFoundError, ValueError) as exc:  # not a run directory; a prediction run whose bundle is gone
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        raise typer.Exit(0 if is_complete(report) else 1)
    colours = {"done": "green", "failed": "red", "stale": "yellow", "interrupted": "yellow", "running": "cyan",
               "skipped": "magenta", "pending": "white"}
    slide_stages = [s for s in report["stages"] if s not in report["cohort"]]
    table = Table(title=f"{report['out']}")
    table.add_column("slide")
    for stage in slide_stages:
        table.add_column(stage)
    table.add_column("first error, else first warning", overflow="fold")
    shown = report["slides"].items()
    if len(report["slides"]) > STATUS_ROWS and not every_slide:  # a table of 10,000 rows helps no one (and takes 30 s)
        shown = [(k, row) for k, row in shown if any(cell["status"] != "done" for cell in row.values())]
        counts = {s: {} for s in slide_stages}
        for row in report["slides"].values():
            for s in slide_stages:
                if s in row:
                    counts[s][row[s]["status"]] = counts[s].get(row[s]["status"], 0) + 1
        table.title = (f"{report['out']}: {len(report['slides'])} slides; "
                       + "; ".join(f"{s}: " + ", ".join(f"{n} {k}" for k, n in sorted(c.items())) for s, c in counts.items())
                       + f" — the {min(len(shown), STATUS_ROWS)} of {len(shown)} slides not done below (--all: every slide)")
        shown = shown[:STATUS_ROWS]
    for slide_id, row in shown:
        cells = [f"[{colours[row[s]['status']]}]{row[s]['status']}[/]" if s in row else "" for s in slide_stages]
        error = next((row[s]["error"] for s in slide_stages if s in row and row[s]["error"]), "") or next(
            (f"warning ({s}): {row[s]['warnings'][0]}" for s in slide_stages if row.get(s, {}).get("warnings")), "")
        table.add_row(escape(slide_id), *cells, escape(error))
    console = Console() if sys.stdout.isatty() else Console(width=200)  # piped or logged: do not squeeze the table
    console.print(table)
    for stage, cell in report["cohort"].items():
        if "tasks" in cell:  # a fold stage: one line, then its tasks that are not done
            console.print(f"stage {stage}: [{colours[cell['status']]}]{cell['status']}[/] ({cell['done']}/{cell['total']} "
                          f"tasks done)")
            for key, task in cell["tasks"].items():
                if task["status"] != "done":
                    console.print(f"  {stage}/{key}: [{colours[task['status']]}]{task['status']}[/]"
                                  f"{progress_text(task.get('progress'))} {escape(task['error'])}")
            continue
        console.print(f"cohort stage {stage}: [{colours[cell['status']]}]{cell['status']}[/]"
                      f"{progress_text(cell.get('progress'))} {escape(cell['error'])}")
    if report["locked_by"]:
        holder = report["locked_by"]
        console.print(f"a run is in progress: pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}")
    raise typer.Exit(0 if is_complete(report) else 1)


@app.command()
def report(out: Annotated[Path, typer.Argument(help="run directory")] = Path("wsi_run")) -> None:
    """Print the results table (strategies × ACC, balanced ACC, AUC, params, patches/s) of a run."""
    from pipelines.stages.results import read_report

    try:
        typer.echo(read_report(out), nl=False)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def heatmaps(
    out: Annotated[Path, typer.Argument(help="a run directory whose mil stage has finished")],
    slides: Annotated[list[str] | None, typer.Option("--slide", help="only these slide ids (repeatable; default: "
                                                                        "the slides heatmaps.slides selects, or all when it is 'none')")] = None,
    strategy: Annotated[str | None, typer.Option(help="results row: teacher, reuse, retrain, end2end or end2end:NAME "
                                                         "(default: heatmaps.strategy, or the run's first)")] = None,
    class_name: Annotated[str | None, typer.Option("--class", help="CLAM-MB: draw this class's attention (default: the predicted class)")] = None,
    width: Annotated[int | None, typer.Option(help="longer side of the overview in pixels (default: heatmaps.width)")] = None,
    overlap: Annotated[float | None, typer.Option(help="second pass with tiles overlapping by this fraction, e.g. 0.5")] = None,
    blur: Annotated[float | None, typer.Option(help="Gaussian sigma in overview pixels")] = None,
    cmap: Annotated[str | None, typer.Option(help="matplotlib colour map, e.g. jet or coolwarm")] = None,
    top_k: Annotated[int | None, typer.Option(help="highest- and lowest-attention tiles saved as images")] = None,
    image_format: Annotated[str | None, typer.Option(help="png or jpeg (default: heatmaps.image_format)")] = None,
    adapter: Annotated[Path | None, typer.Option(help="end2end:lora: draw with this LoRA adapter file on the frozen "
                                                         "student instead of the fold's own (switching tasks)")] = None,
) -> None:
    """Draw attention heatmaps (overlay, figure, QuPath GeoJSON, CSV, top tiles) for slides of a finished run."""
    from pipelines.stages.heatmaps import draw_slide, heatmap_dir, read_run, resolve_strategy, wants_heatmap

    setup_logging(False)
    try:
        cfg, entries, paths = read_run(out)
        overrides = {k: v for k, v in {"width": width, "overlap": overlap, "blur": blur, "cmap": cmap,
                                       "top_k": top_k, "image_format": image_format}.items() if v is not None}
        cfg = cfg.model_copy(update={"heatmaps": cfg.heatmaps.model_validate({**cfg.heatmaps.model_dump(), **overrides})})
        strategy = resolve_strategy(cfg, strategy)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if slides:
        known = {e.slide_id for e in entries}
        unknown = [s for s in slides if s not in known]
        if unknown:
            typer.echo(f"error: no slide with id {', '.join(unknown)} in {paths.manifest}", err=True)
            raise typer.Exit(2)
        chosen = [e for e in entries if e.slide_id in set(slides)]
    else:
        chosen = [e for e in entries if cfg.heatmaps.slides == "none" or wants_heatmap(cfg, e)]
    without = [e.slide_id for e in chosen if not e.has_pixels]
    if without:
        typer.echo(f"note: {len(without)} features-only slide(s) have no slide file to draw on: {', '.join(without[:5])}", err=True)
        chosen = [e for e in chosen if e.has_pixels]
    failed = 0
    for entry in chosen:
        try:
            meta = draw_slide(entry, cfg, paths, strategy=strategy, class_name=class_name, adapter=adapter)
        except (FileNotFoundError, ValueError, OSError) as exc:
            failed += 1
            typer.echo(f"{entry.slide_id}: failed: {exc}", err=True)
            continue
        typer.echo(f"{meta['caption']} → {heatmap_dir(paths, strategy, entry.slide_id)}")
    raise typer.Exit(1 if failed else 0)


register(app)  # encoders, export-model, predict, export, import-features
app.command()(view)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
