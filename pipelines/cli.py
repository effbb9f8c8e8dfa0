"""``wsi-pipeline`` command line. Heavy imports stay inside commands so ``--help`` is fast."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Whole-slide images → tissue masks, tiles, features, CLAM models and heatmaps.")

DEMO_CONFIG = """\
# Run config for the demo cohort: its slides are biopsy-sized (a few mm²), so CLAM's biopsy
# preset with physical area thresholds (the same on its 40× and 20× slides).
tissue:
  preset: bwh_biopsy
  area_reference_mpp: 0.25
tiling:
  target_mpp: 0.5
  patch_size: 256
  min_tissue_fraction: 0.25
"""


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(show_path=False, show_time=False)], force=True)


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
    n_slides: Annotated[int, typer.Option(min=1, help="number of slides (half tumour-positive)")] = 12,
    size: Annotated[int, typer.Option(min=1024, help="level-0 width in pixels of the 40× slides (height is 3/4)")] = 8192,
    seed: Annotated[int, typer.Option(help="random seed; the same seed gives the same cohort")] = 0,
) -> None:
    """Write a small cohort of real pyramidal slides (Aperio SVS + generic TIFF) with ground truth."""
    from rich.progress import Progress

    from pipelines.artifacts import write_text
    from wsi.demo_cohort import make_demo_cohort

    with Progress(transient=True) as progress:
        task = progress.add_task("writing demo slides", total=n_slides)
        csv_path = make_demo_cohort(out_dir, n_slides=n_slides, size=size, seed=seed,
                                    progress=lambda done, total: progress.update(task, completed=done))
    write_text(out_dir / "run.yaml", DEMO_CONFIG)
    typer.echo(f"wrote {n_slides} slides and {csv_path}")
    typer.echo(f"next: wsi-pipeline run {csv_path} --config {out_dir / 'run.yaml'} --out runs/demo")


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="where to write the config")] = Path("run.yaml"),
    force: Annotated[bool, typer.Option(help="overwrite an existing file")] = False,
) -> None:
    """Write a default run config, every field commented with what it does."""
    from pipelines.artifacts import write_text
    from pipelines.config import commented_template

    if path.exists() and not force:
        typer.echo(f"{path} exists; use --force to overwrite it", err=True)
        raise typer.Exit(2)
    write_text(path, "# wsi-pipeline run config (wsi-pipeline init). Unknown keys are errors.\n" + commented_template() + "\n")
    typer.echo(f"wrote {path}")


@app.command()
def run(
    slides_csv: Annotated[Path, typer.Argument(help="slides.csv: slide_path, optional slide_id, label, case_id, split, mpp")],
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory")] = Path("wsi_run"),
    config: Annotated[Path | None, typer.Option("--config", "-c", help="run config YAML (see `wsi-pipeline init`)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    """Run the pipeline's stages for every slide of SLIDES_CSV into OUT. Exit code 0 only if all succeed."""
    _setup_logging(verbose)
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress

    from pipelines.config import ConfigError, load_config
    from pipelines.manifest import ManifestError, read_manifest
    from pipelines.run import run_cohort
    from pipelines.stages import SLIDE_STAGES

    console = Console(stderr=True)
    try:
        cfg = load_config(config)
        n_slides = len(read_manifest(slides_csv))
    except (ConfigError, ManifestError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("slides × stages", total=n_slides * len(SLIDE_STAGES))
        report = run_cohort(slides_csv, out, cfg, on_progress=lambda _: progress.advance(task))
    _print_summary(console, report)
    raise typer.Exit(0 if report.complete else 1)


def _print_summary(console, report) -> None:
    from rich.markup import escape
    from rich.table import Table

    stages = list(dict.fromkeys(o.stage for o in report.outcomes))
    table = Table(title=f"run {report.out}")
    table.add_column("slide")
    for stage in stages:
        table.add_column(stage)
    rows: dict[str, dict[str, str]] = {}
    for o in report.outcomes:
        cell = {"done": "[green]done[/green]", "failed": "[red]failed[/red]", "skipped": "[yellow]skipped[/yellow]"}[o.status]
        if o.stage == "tiles" and o.status == "done":
            cell = f"[green]{o.meta.get('n_tiles', 0)} tiles[/green]"
        rows.setdefault(o.slide_id, {})[o.stage] = cell
    for slide_id, cells in rows.items():
        table.add_row(slide_id, *(cells.get(s, "") for s in stages))
    console.print(table)
    for o in report.failed:
        console.print(f"[red]{escape(o.slide_id)}[/red] {o.stage}: {escape(o.reason)}", highlight=False)
    n_slides = len(rows)
    n_ok = sum(all(c.startswith("[green]") for c in cells.values()) for cells in rows.values())
    console.print(f"{n_ok}/{n_slides} slides complete; artifacts in {report.out}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
