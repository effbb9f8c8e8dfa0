"""``wsi-pipeline view OUT --export DIR``: the viewer as static files any web server or file share can serve.

Every file is the server's own answer to the same URL (``ViewerContent.get``), so the export and the live
viewer show the same thing. ``--max-level L`` stops each pyramid at DZI level ``L`` (level ``L`` is the slide
at downsample 2^(max − L)); zoomed in further, the page stretches that level's pixels.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipelines.viewer.content import ViewerContent
from pipelines.viewer.run_index import slide_record, url_key


def _urls(content: ViewerContent, slide_id: str, max_level: int | None) -> list[str]:
    """Every URL of one slide the page can ask for, pyramids up to ``max_level``."""
    slide = content.run.slide(slide_id)
    urls = [f"slide/{slide_id}.dzi"]
    geometry = content.slide_zoom(slide_id).geometry
    top = geometry.max_level if max_level is None else min(max_level, geometry.max_level)
    pyramids = [f"slide/{slide_id}_files"] + [f"heatmap/{url_key(row)}/{slide_id}_files" for row in slide.heatmaps]
    for level in range(top + 1):
        cols, rows = geometry.tile_count(level)
        for prefix in pyramids:
            suffix = "jpeg" if prefix.startswith("slide/") else "png"
            urls += [f"{prefix}/{level}/{c}_{r}.{suffix}" for r in range(rows) for c in range(cols)]
    for row in slide.heatmaps:
        key = url_key(row)
        urls += [f"heatmap/{key}/{slide_id}.dzi", f"api/slides/{slide_id}/attention/{key}.json"]
        attention = json.loads(content.get(f"api/slides/{slide_id}/attention/{key}.json")[0])
        urls += [t["image"].split("?")[0] for kind in ("top", "bottom") for t in attention[kind]]
    if content.run.paths.tissue_outline(slide_id).exists():
        urls.append(f"api/slides/{slide_id}/tissue.geojson")
    if content.run.paths.tile_coords(slide_id).exists():
        urls.append(f"api/slides/{slide_id}/tiles.json")
    return urls


def export_viewer(content: ViewerContent, dest: Path, slide_ids: list[str] | None = None, max_level: int | None = None,
                  *, threads: int = 2) -> dict:
    """Write the viewer of the chosen slides (default: every slide with pixels) into ``dest``; returns counts."""
    run = content.run
    unknown = [s for s in slide_ids or [] if s not in run.slides]
    if unknown:
        raise ValueError(f"--slide: no slide {', '.join(map(repr, unknown))} in {run.root} (ids are slides.csv's slide_id)")
    if max_level is not None and max_level < 0:
        raise ValueError(f"--max-level {max_level}: Deep Zoom levels start at 0 (the whole slide in one pixel)")
    blank = [s for s in slide_ids or [] if run.slides[s].size is None or not run.slides[s].entry.slide_path]
    if blank:
        raise ValueError(f"--slide: {', '.join(blank)} has no pixels to show (no slide file, or it failed before the tissue stage)")
    chosen = [s for s in (slide_ids or list(run.slides)) if run.slides[s].size is not None and run.slides[s].entry.slide_path]
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} is a file: give an empty or new folder")
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty: give an empty or new folder (an export is never mixed with other files)")
    for name, data in content.static.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(data)
    document = json.loads(content.get("api/slides.json")[0])
    document["slides"] = [slide_record(run, run.slides[s]) for s in chosen]  # run (with its version) as served
    for record in document["slides"]:
        if max_level is not None:
            for dzi in [record["dzi"]] + [h["dzi"] for h in record["heatmaps"].values()]:
                dzi["max_level"] = max_level
    (dest / "api").mkdir(parents=True, exist_ok=True)
    (dest / "api" / "slides.json").write_text(json.dumps(document))  # the server's /api/slides too; a file cannot be both

    def write(url: str) -> int:
        data = content.get(url)[0]
        path = dest / url
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return len(data)

    urls = [u for s in chosen for u in _urls(content, s, max_level)]
    with ThreadPoolExecutor(threads) as pool:
        size = sum(pool.map(write, urls))
    return {"slides": len(chosen), "files": len(urls), "bytes": size}
