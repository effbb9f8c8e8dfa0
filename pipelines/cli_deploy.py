"""The CLI's commands for models and features leaving or entering a run: `encoders`, `export-model`, `predict`,
`export`, `import-features` (registered on the app by :func:`register`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipelines.cli_common import BreakLockOpt, ForceOpt, RetriesOpt, SchedulerOpt, VerboseOpt, WorkersOpt, run_with_progress

COMMANDS: list[tuple[str | None, object]] = []  # (command name or None: the function's, function)


def command(name: str | None = None):
    """Mark a function as a command of the app :func:`register` is given."""
    def mark(fn):
        COMMANDS.append((name, fn))
        return fn
    return mark


def register(app: typer.Typer) -> None:
    for name, fn in COMMANDS:
        app.command(name)(fn)


@command()
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


@command("export-model")
def export_model(
    out: Annotated[Path, typer.Argument(help="a finished training run directory")],
    strategy: Annotated[str, typer.Option(help="results row: teacher, reuse, retrain, end2end or end2end:NAME")],
    dest: Annotated[Path, typer.Option(help="the bundle folder to write (new or empty)")],
    fold: Annotated[list[int] | None, typer.Option(help="keep only this fold's CLAM (repeatable; default: every fold "
                                                           "for teacher/reuse/retrain, the best-validated fold for End2end)")] = None,
) -> None:
    """Write a model bundle (encoder + CLAMs + settings + card, safetensors and JSON only) for `predict`."""
    from pipelines.deploy.bundle import BundleError, export_bundle

    try:
        meta = export_bundle(out, strategy, dest, fold)
    except (BundleError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    cv = meta["card"]["cv"]
    typer.echo(f"wrote {dest}: {strategy}, {meta['encoder']['kind']} encoder, CLAMs of folds {meta['clam']['folds']}, "
               f"CV AUC {cv['auc_mean']:.3f}")
    typer.echo(f"next: wsi-pipeline predict new_slides.csv --model {dest} --out predictions")


@command()
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
    from pipelines.deploy.bundle import load_bundle
    from pipelines.stages.predict import check_predict_slides, predict_config

    state: dict = {}

    def make_config():
        state["bundle"] = load_bundle(model)  # every file checked against its sha256
        return predict_config(state["bundle"], config)

    run_with_progress(slides_csv, out, make_config, check=lambda entries: check_predict_slides(state["bundle"], entries), only=only,
         force=force, scheduler=scheduler, workers=workers, retries=retries, break_lock=break_lock, verbose=verbose)


@command()
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
    from pipelines.deploy.interop import export_run

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


@command("import-features")
def import_features(
    h5_dir: Annotated[Path, typer.Argument(help="folder of CLAM/TRIDENT .h5 feature files (or its h5_files/)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory to import into")],
    encoder: Annotated[str, typer.Option(help="encoder name to file them under (OUT/features/<encoder>/)")],
) -> None:
    """Import existing CLAM/TRIDENT HDF5 features as this toolkit's Zarr feature stores."""
    from pipelines.deploy.interop import import_dir

    try:
        count = import_dir(h5_dir, out, encoder)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"imported {count} slides into {out / 'features' / encoder}")


