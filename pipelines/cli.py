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
# A ViT-S/16 teacher with RANDOM weights (seed 0) keeps the demo offline and fast: its features mean
# nothing clinically, they only exercise the machinery. For real work give weights, e.g. `model: uni`
# with `pretrained: true` (hub access) or `weights: /path/to/uni.safetensors`, and drop `seed`.
# Mean-pooled patch tokens: an untrained CLS token says little about the tile, the tokens do.
features:
  teacher:
    model: vit_small
    pretrained: false
    seed: 0
    pool: mean
# EFCM stage 1: a ViT-Ti/16 student on 112-px inputs (7×7 token grid) with a TransScan projector,
# 20 epochs × 384 tiles in steps of 16 (about 4 min on 2 cores at fp32): enough to learn a tumour that is
# a few per cent of the tiles, which the card's verdict checks (5 epochs learn the average, not the tumour).
distill:
  student:
    model: vit_tiny
    input_size: 112
    model_kwargs: {img_size: 112}
  epochs: 20
  tiles_per_epoch: 384
  batch_size: 16
  lr: 0.001
  augment: false  # the random ViT teacher's features change under flips and rotations
  max_val_tiles: 128
# EFCM stage 2 on the 24 demo slides: 4 stratified folds by case (6 test, 3 validation, 15 training
# slides each), CLAM's own training schedule. With fewer slides, early stopping on one or two
# validation slides keeps near-initial weights and the results swing from run to run.
mil:
  folds: 4
  val_fraction: 0.17
"""


# options `run` and `predict` share
ForceOpt = Annotated[list[str] | None, typer.Option(help="rerun this stage and its dependants even if done (repeatable)")]
SchedulerOpt = Annotated[str | None, typer.Option(help="existing Dask scheduler, tcp://HOST:PORT (overrides runner.scheduler)")]
WorkersOpt = Annotated[int | None, typer.Option(min=1, help="local cluster worker processes (overrides runner.n_workers)")]
RetriesOpt = Annotated[int | None, typer.Option(min=0, help="retries per failed task (overrides runner.retries)")]
BreakLockOpt = Annotated[bool, typer.Option("--break-lock", help="take over the run directory's lock even if it looks live")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")]


def _setup_logging(verbose: bool, console=None) -> None:
    """Log through ``console`` (the one the live progress bar draws on), so log lines and warnings print above
    the bar instead of through it."""
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)], force=True)
    logging.captureWarnings(True)  # Python warnings too
    import distributed  # noqa: F401  (configures its loggers on import; quieten them after)

    for noisy in ("distributed", "tornado", "bokeh"):  # Dask's own chatter only with -v
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


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

    from pipelines.artifacts import write_text
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

    _run(slides_csv, out, lambda: load_config(config), until=until, only=only, force=force, scheduler=scheduler,
         workers=workers, retries=retries, break_lock=break_lock, verbose=verbose)


def _run(slides_csv: Path, out: Path, make_config, *, check=None, until=None, only=None, force=None, scheduler=None,
         workers=None, retries=None, break_lock=False, verbose=False) -> None:
    """What `run` and `predict` share: config (from ``make_config()``), manifest, ``check(entries)``, the runner,
    the report; exits 0 only when every task is done."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress

    console = Console(stderr=True, soft_wrap=True)
    _setup_logging(verbose, console)
    from pipelines.bundle import BundleError
    from pipelines.config import ConfigError
    from pipelines.live import LiveTasks
    from pipelines.manifest import ManifestError, read_manifest
    from pipelines.run_lock import LockError
    from pipelines.runner import ClusterError, run_cohort

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
                entries, out, cfg, until=until, only=only, force=force, break_lock=break_lock,
                on_plan=lambda tasks: (progress.update(bar, total=len(tasks)), live.watch(tasks)),
                on_start=lambda link: console.print(f"Dask dashboard: {link}", highlight=False),
                on_settled=lambda task: progress.advance(bar))
    except (ConfigError, ManifestError, LockError, ClusterError, BundleError, ValueError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    _print_report(console, report)
    raise typer.Exit(0 if report.complete else 1)


def _print_report(console, report) -> None:
    from rich.markup import escape

    counts: dict[str, int] = {}
    for task in report.tasks.values():
        counts[task.status] = counts.get(task.status, 0) + 1
    for task in report.failed:
        console.print(f"[red]failed[/red] {escape(task.id)}: {escape(task.reason)}", highlight=False)
    for note in report.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    from pipelines.artifacts import RunPaths
    from pipelines.state import read_state

    for task in report.tasks.values():  # this run's cohort tasks' warnings, e.g. a student not faithful on rare tissue
        if task.scope == "cohort" and task.status in ("done", "up-to-date"):
            for warning in (read_state(RunPaths(Path(report.out)), task.stage, task.key) or {}).get("warnings", []):
                console.print(f"[yellow]warning[/yellow] {task.stage}: {escape(warning)}", highlight=False)
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    console.print(f"{len(report.tasks)} tasks: {summary}; run directory {report.out}", highlight=False)
    console.print(f"see `wsi-pipeline status {report.out}`", highlight=False)


@app.command()
def status(
    out: Annotated[Path, typer.Argument(help="run directory")] = Path("wsi_run"),
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show every slide × stage of a run: done, failed (with the error), stale, interrupted or pending."""
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
    for slide_id, row in report["slides"].items():
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
    from pipelines.evaluation import read_report

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
    from pipelines.heatmaps import draw_slide, heatmap_dir, read_run, resolve_strategy, wants_heatmap

    _setup_logging(False)
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


@app.command()
def encoders(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    check: Annotated[bool, typer.Option("--check", help="build every model on the meta device (no memory, no network) and "
                                                        "show its measured dimension and parameters beside the published")] = False,
) -> None:
    """List the model zoo: dimension, parameters, input, normalisation, pooling, µm/px, precision, licence (--json: also
    where the weights come from)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from features.zoo_check import JSON_FIELDS, zoo_rows, zoo_table

    rows = zoo_rows(check)
    if as_json:
        print(json.dumps([{**{k: r[k] for k in JSON_FIELDS}, "weights_from": r["weights_from"], "hub": r["hub"]}
                          for r in rows], indent=1))
        return
    table = Table("model", "dim", "params", "input", "mean / std", "pool", "µm/px", "precision", "licence")
    for cells in zoo_table(rows):
        table.add_row(*cells)
    Console().print(table)
    if check:
        Console().print("In brackets: measured on the meta device; '!' marks a figure more than 0.5 % off the published.")


@app.command("export-model")
def export_model(
    out: Annotated[Path, typer.Argument(help="a finished training run directory")],
    strategy: Annotated[str, typer.Option(help="results row: teacher, reuse, retrain, end2end or end2end:NAME")],
    dest: Annotated[Path, typer.Option(help="the bundle folder to write (new or empty)")],
    fold: Annotated[list[int] | None, typer.Option(help="keep only this fold's CLAM (repeatable; default: every fold "
                                                           "for teacher/reuse/retrain, the best-validated fold for End2end)")] = None,
) -> None:
    """Write a model bundle (encoder + CLAMs + settings + card, safetensors and JSON only) for `predict`."""
    from pipelines.bundle import BundleError, export_bundle

    try:
        meta = export_bundle(out, strategy, dest, fold)
    except (BundleError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    cv = meta["card"]["cv"]
    typer.echo(f"wrote {dest}: {strategy}, {meta['encoder']['kind']} encoder, CLAMs of folds {meta['clam']['folds']}, "
               f"CV AUC {cv['auc_mean']:.3f}")
    typer.echo(f"next: wsi-pipeline predict new_slides.csv --model {dest} --out predictions")


@app.command()
def predict(
    slides_csv: Annotated[Path, typer.Argument(help="slides.csv of the slides to predict (label optional: metrics when given)")],
    model: Annotated[Path, typer.Option("--model", "-m", help="a model bundle from `wsi-pipeline export-model`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="prediction run directory (rerunning into it resumes)")] = Path("wsi_predict"),
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML with runner, slides, features, heatmaps "
                                                                         "or predict sections (tissue and tiling come from the bundle)")] = None,
    only: Annotated[list[str] | None, typer.Option(help="only these slide ids (repeatable); predictions.csv is not written")] = None,
    force: ForceOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    retries: RetriesOpt = None,
    break_lock: BreakLockOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Predict SLIDES_CSV with a model bundle into OUT: predictions.csv, heatmaps, metrics when labelled (resumable)."""
    from pipelines.bundle import load_bundle
    from pipelines.predict import check_predict_slides, predict_config

    state: dict = {}

    def make_config():
        state["bundle"] = load_bundle(model)  # every file checked against its sha256
        return predict_config(state["bundle"], config)

    _run(slides_csv, out, make_config, check=lambda entries: check_predict_slides(state["bundle"], entries), only=only,
         force=force, scheduler=scheduler, workers=workers, retries=retries, break_lock=break_lock, verbose=verbose)


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="run directory")],
    format: Annotated[str, typer.Option("--format", help="h5: CLAM/TRIDENT-layout HDF5 (h5_files/<slide>.h5)")] = "h5",
    encoder: Annotated[str | None, typer.Option(help="encoder folder under OUT/features (default: the run's teacher)")] = None,
    dest: Annotated[Path | None, typer.Option(help="destination (default: OUT/export/<encoder>)")] = None,
    pt: Annotated[bool, typer.Option("--pt", help="also write CLAM's pt_files/<slide>.pt feature bags")] = False,
    slides: Annotated[list[str] | None, typer.Option("--slide", help="only these slide ids (repeatable)")] = None,
) -> None:
    """Export a run's feature stores for other MIL tools (CLAM, TRIDENT)."""
    from pipelines.config import load_config
    from pipelines.interop import export_run

    if format != "h5":
        typer.echo(f"error: unknown format {format!r}; supported: h5", err=True)
        raise typer.Exit(2)
    label = encoder or load_config(out / "run.yaml").features.teacher.label
    target = dest or out / "export" / label
    written, missing = export_run(out, label, target, pt=pt, slides=slides)
    typer.echo(f"exported {written} slides to {target}")
    if missing:
        typer.echo(f"no finished feature store for: {', '.join(missing)}", err=True)
        raise typer.Exit(1)


@app.command("import-features")
def import_features(
    h5_dir: Annotated[Path, typer.Argument(help="folder of CLAM/TRIDENT .h5 feature files (or its h5_files/)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory to import into")],
    encoder: Annotated[str, typer.Option(help="encoder name to file them under (OUT/features/<encoder>/)")],
) -> None:
    """Import existing CLAM/TRIDENT HDF5 features as this toolkit's Zarr feature stores."""
    from pipelines.interop import import_dir

    try:
        count = import_dir(h5_dir, out, encoder)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"imported {count} slides into {out / 'features' / encoder}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
