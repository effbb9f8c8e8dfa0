"""The ``view`` command: serve a run to a browser, or export it as static files (docs/viewer.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def view(
    out: Annotated[Path, typer.Argument(help="a finished run directory (`run` or `predict`)")] = Path("wsi_run"),
    port: Annotated[int, typer.Option(help="port to listen on (0: any free port)")] = 8765,
    host: Annotated[str, typer.Option(help="address to bind; anything but 127.0.0.1 lets other machines try the token")] = "127.0.0.1",
    strategy: Annotated[str | None, typer.Option(help="results row whose heatmap the page shows first (default: "
                                                      "heatmaps.strategy, else the first row with heatmaps)")] = None,
    allow_host: Annotated[list[str], typer.Option("--allow-host", help="another name the browser may use for this server "
                                                                       "(Host header), e.g. a machine name behind an SSH tunnel")] = [],  # noqa: B006
    token: Annotated[str | None, typer.Option(help="the URL's token (default: a new random one)", envvar="WSI_VIEWER_TOKEN")] = None,
    export: Annotated[Path | None, typer.Option(help="write the viewer as static files into this folder instead of serving")] = None,
    slide: Annotated[list[str], typer.Option("--slide", help="with --export: only these slide ids (repeatable)")] = [],  # noqa: B006
    max_level: Annotated[int | None, typer.Option(help="with --export: cut each pyramid at this DZI level (smaller export, "
                                                       "less zoom)")] = None,
) -> None:
    """Open a run in the browser: deep-zoom slides with attention heatmaps, predictions and top tiles (docs/viewer.md)."""
    import logging
    import time

    from pipelines.viewer.content import ViewerContent
    from pipelines.viewer.run_index import load_run

    try:
        run = load_run(out)
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="OUT") from None
    if strategy is not None:
        if strategy not in run.rows:
            raise typer.BadParameter(f"{strategy!r} has no heatmaps in {out}; rows with heatmaps: {run.rows}", param_hint="--strategy")
        run.cfg.heatmaps.strategy = strategy
    content = ViewerContent(run)
    if export is not None:
        from pipelines.viewer.export import export_viewer

        started = time.perf_counter()
        try:
            counts = export_viewer(content, export, slide or None, max_level)
        except (ValueError, FileExistsError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--export / --slide") from None
        typer.echo(f"wrote {counts['slides']} slide(s), {counts['files']} files, {counts['bytes'] / 2**20:.1f} MB to {export} "
                   f"in {time.perf_counter() - started:.0f} s; serve it with: python -m http.server -d {export} -b 127.0.0.1")
        return
    if slide or max_level is not None:
        raise typer.BadParameter("--slide and --max-level go with --export", param_hint="--slide / --max-level")
    import cv2

    from pipelines.viewer.server import ViewerServer

    cv2.setNumThreads(1)  # tiles are cut on a thread per core already: OpenCV's own pool would only contend with them
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        server = ViewerServer(content, host, port, token=token, allow_hosts=tuple(allow_host))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--token") from None
    except OSError as exc:
        raise typer.BadParameter(f"cannot listen on {host}:{port}: {exc.strerror or exc}", param_hint="--host / --port") from None
    content.warm_up()
    typer.echo(f"Viewing {len(run.slides)} slide(s) of {out} ({run.kind} run). Open in a browser:\n  {server.url}\n"
               "Ctrl-C stops the server.")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("stopped")
    finally:
        server.server_close()
