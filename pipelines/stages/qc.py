"""The qc stage: one table of every slide's tissue, tiles, artefacts and reasons."""

from __future__ import annotations

import json
import logging

import numpy as np

from pipelines.config import RunConfig
from pipelines.engine.run_dir import RunPaths, write_text
from pipelines.engine.state import read_state
from pipelines.manifest import SlideEntry
from pipelines.stages.tile_inspection import blurred_fraction

log = logging.getLogger(__name__)


def teacher_store(paths: RunPaths, cfg: RunConfig, slide_id: str):
    """The slide's teacher store (its ``tile_check`` attribute and ``sharpness``: what the features read's check of
    every tile found); None where there is none (the features failed, or have not run in this run yet)."""
    from features.store import open_store

    try:
        return open_store(paths.root, cfg.features.teacher.label, slide_id)
    except FileNotFoundError:
        return None


def qc_stage(entries: list[SlideEntry], cfg: RunConfig, paths: RunPaths) -> dict:
    """Cohort QC table ``qc/slides.csv``: per slide its reader, mpp and where it came from, tissue, tiles, unreadable
    parts and read plan; then a row per slide of the manifest that failed tissue, tiles or features, with the
    reason. Where the teacher's features read checks the tiles (``slides.verify_tiles: features``) the unreadable
    tiles, focus and tile count are that read's; before it ran (``--until qc``) they are the tiles stage's."""
    import csv
    import io

    from pipelines.manifest import read_manifest

    columns = ["slide_id", "status", "label", "case_id", "backend", "width", "height", "mpp", "mpp_source", "mpp_detail",
               "tissue_fraction", "ink_fraction", "bubble_fraction", "fold_fraction", "n_regions", "n_holes", "n_tiles",
               "n_unreadable_tiles", "unreadable_fraction", "blurred_fraction", "n_blurry_dropped", "n_fold_tiles",
               "n_fold_dropped",
               "read_level", "read_size", "level0_size", "delivered_mpp", "warnings"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    checked_by = cfg.tile_check()
    for entry in entries:
        tissue = json.loads(paths.tissue_meta(entry.slide_id).read_text())
        tiles = json.loads(paths.tile_meta(entry.slide_id).read_text())
        scores = None
        if checked_by == "features":  # the teacher's features read checked the tiles: its counts and focus scores
            store = teacher_store(paths, cfg, entry.slide_id)
            if store is not None and "tile_check" in store.attrs:
                tiles = {**tiles, **store.attrs["tile_check"], "n_tiles": len(store)}
                scores = store.sharpness
            tiles["warnings"] = tiles["warnings"] + (read_state(paths, "features", entry.slide_id) or {}).get("warnings", [])
        elif paths.tile_sharpness(entry.slide_id).exists():
            scores = np.load(paths.tile_sharpness(entry.slide_id))
        blurred = blurred_fraction(scores, cfg.tiling.blur_ratio) if scores is not None else None
        warnings = tissue["warnings"] + tiles["warnings"]
        if blurred is not None and blurred > 0.1:  # a tenth of the tissue out of focus: worth a look
            warnings.append(f"{blurred:.1%} of the tiles are blurred (below {cfg.tiling.blur_ratio:g} × the slide's "
                            f"median sharpness)")
        writer.writerow({
            "slide_id": entry.slide_id, "status": "ok", "label": entry.label or "", "case_id": entry.case_id or "",
            "backend": tissue["backend"], "width": tissue["dimensions"][0], "height": tissue["dimensions"][1],
            "mpp": tissue["mpp"], "mpp_source": tissue["mpp_source"], "mpp_detail": tissue.get("mpp_detail", ""),
            "tissue_fraction": round(tissue["tissue_fraction"], 4), "n_regions": tissue["n_regions"],
            "ink_fraction": round(tissue.get("excluded", {}).get("ink", 0.0), 4),
            "bubble_fraction": round(tissue.get("excluded", {}).get("bubble", 0.0), 4),
            "fold_fraction": round(tissue.get("flagged", {}).get("fold", 0.0), 4),
            "n_fold_tiles": tiles.get("n_fold_tiles", 0), "n_fold_dropped": tiles.get("n_fold_dropped", 0),
            "n_holes": tissue["n_holes"], "n_tiles": tiles["n_tiles"], "n_unreadable_tiles": tiles.get("n_unreadable_tiles", 0),
            "unreadable_fraction": round(tissue.get("unreadable_fraction", 0.0), 4),
            "blurred_fraction": "" if blurred is None else round(blurred, 4),
            "n_blurry_dropped": tiles.get("n_blurry_dropped", 0),
            "read_level": tiles["read_level"], "read_size": tiles["read_size"], "level0_size": tiles["level0_size"],
            "delivered_mpp": round(tiles["delivered_mpp"], 4), "warnings": "; ".join(warnings),
        })
    included = {e.slide_id for e in entries}
    others = read_manifest(paths.manifest) if paths.manifest.exists() else []
    for entry in others:
        if entry.slide_id in included or not entry.has_pixels:
            continue
        for stage in ("tissue", "tiles", "features"):
            state = read_state(paths, stage, entry.slide_id) or {}
            if state.get("status") == "failed":
                writer.writerow({"slide_id": entry.slide_id, "status": f"failed {stage}", "label": entry.label or "",
                                 "case_id": entry.case_id or "", "warnings": state.get("error", "")})
                break
    write_text(paths.qc_table, buffer.getvalue())
    return {"n_slides": len(entries), "slides": [e.slide_id for e in entries]}
