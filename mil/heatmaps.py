"""Attention heatmaps of one slide, as files: overlay image, figure, QuPath GeoJSON, CSV, top and bottom tiles.

``write_heatmap`` is the library entry: give it an open slide, its tiles, their attention and its
tissue mask. Time and memory follow the overview size and the number of tiles, never the slide's
pixel count: the overview comes from the pyramid level nearest below it, read block by block.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mil.attention import percentile_of
from wsi.annotations import geojson_bytes, tiles_csv, tiles_geojson
from wsi.files import write_bytes, write_image, write_text
from wsi.heatmap import blend, figure, resize_mask, score_map
from wsi.tiling import ReadPlan, read_tile


class HeatmapConfig(BaseModel):
    """Which slides get heatmaps, from which model, and how they are drawn."""

    model_config = ConfigDict(extra="forbid")

    slides: Literal["none", "all", "test", "positive"] = Field(
        "test", description="slides the `heatmaps` stage of `run` draws: none (stage off), all, test (the split "
                            "column's test slides; every slide under k-fold, each by the fold that held it out), "
                            "positive (label not in negative_labels)")
    negative_labels: list[str] = Field(default_factory=lambda: ["normal", "negative", "benign"],
                                       description="labels that are not 'positive' for `slides: positive`")
    strategy: str | None = Field(
        None, description="whose attention: a results row — teacher, reuse, retrain, end2end or end2end:<fine-tuning> "
                          "(not end2end:fpt) — (null: the first of them the run has)")
    class_name: str | None = Field(None, description="CLAM-MB: draw this class's attention branch (null: the predicted class)")
    width: int = Field(2048, ge=64, le=16384, description="longer side of the overview image in pixels")
    overlap: float = Field(0.0, ge=0, lt=1, description="second pass with tiles overlapping by this fraction (CLAM: "
                                                         "0.5), scored against the first pass; 0: first pass only")
    blur: float = Field(0.0, ge=0, description="Gaussian smoothing of the map, sigma in overview pixels (0: none)")
    cmap: str = Field("jet", description="matplotlib colour map (jet, coolwarm, viridis, …)")
    alpha: float = Field(0.4, gt=0, le=1, description="opacity of the colours over the slide")
    image_format: Literal["png", "jpeg"] = Field("png", description="format of the overlay and figure images")
    top_k: int = Field(8, ge=0, description="highest- and lowest-attention tiles saved as images")
    geojson_object: Literal["detection", "annotation"] = Field(
        "detection", description="what QuPath makes of each tile: detections (fast, thousands) or annotations")


@dataclass
class TileScores:
    """Tiles of one slide (level-0 top-left x, y; side ``size``) and their attention."""

    coords: np.ndarray
    size: int
    raw: np.ndarray
    percentile: np.ndarray


def score_tiles(coords: np.ndarray, size: int, raw: np.ndarray, reference: np.ndarray | None = None) -> TileScores:
    """Percentiles within the slide, or against ``reference`` (the first pass) for an overlapping second pass."""
    raw = np.asarray(raw, dtype=np.float64)
    return TileScores(np.asarray(coords, dtype=np.int64).reshape(-1, 2), int(size), raw,
                      percentile_of(raw, raw if reference is None else reference))


def _top_tiles(out_dir: Path, slide, scores: TileScores, plan: ReadPlan, k: int) -> list[dict]:
    """The ``k`` highest- and lowest-attention tiles as images, named by rank and level-0 position."""
    order = np.argsort(-scores.raw, kind="stable")
    picks = [("top", i, r) for i, r in enumerate(order[:k])] + [("bottom", i, r) for i, r in enumerate(order[::-1][:k])]
    rows = []
    for kind, rank, row in picks:
        x, y = map(int, scores.coords[row])
        name = f"{kind}_{rank + 1:02d}_x{x}_y{y}.png"
        write_image(out_dir / "tiles" / name, read_tile(slide, x, y, plan))
        rows.append({"kind": kind, "rank": rank + 1, "x": x, "y": y, "score": float(scores.raw[row]),
                     "percentile": float(scores.percentile[row]), "file": f"tiles/{name}"})
    return rows


def write_heatmap(out_dir: Path, slide, slide_id: str, scores: TileScores, tissue: np.ndarray, cfg: HeatmapConfig,
                  *, caption: str, plan: ReadPlan | None = None, extra: dict | None = None) -> dict:
    """Write every heatmap file for one slide into ``out_dir``; returns (and writes) its ``heatmap.json``.

    ``tissue`` is the slide's boolean tissue mask at any resolution (resized to the overview);
    ``plan`` is the tiles' read plan, needed only for the top/bottom tile images.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    width0, height0 = slide.dimensions
    downsample = max(1.0, max(width0, height0) / cfg.width)
    background = slide.read_downsampled(downsample)
    shape = background.shape[:2]
    heat = score_map(scores.coords, scores.size, scores.percentile, shape, downsample, blur_sigma=cfg.blur)
    overlay = blend(background, heat, resize_mask(tissue, shape), cmap=cfg.cmap, alpha=cfg.alpha)
    suffix = "png" if cfg.image_format == "png" else "jpg"
    write_image(out_dir / f"overlay.{suffix}", overlay)
    write_image(out_dir / f"heatmap.{suffix}", figure(overlay, caption, cmap=cfg.cmap))
    measurements = {"attention": scores.raw, "attention_percentile": scores.percentile}
    geojson = tiles_geojson(scores.coords, scores.size, measurements, object_type=cfg.geojson_object)
    write_bytes(out_dir / "tiles.geojson", geojson_bytes(geojson))
    write_text(out_dir / "tiles.csv", tiles_csv(slide_id, scores.coords, scores.size,
                                                 {"score": scores.raw, "percentile": scores.percentile}))
    top = _top_tiles(out_dir, slide, scores, plan, cfg.top_k) if plan is not None and cfg.top_k else []
    meta = {"slide_id": slide_id, "n_tiles": len(scores.coords), "tile_size_level0": scores.size,
            "overview_downsample": downsample, "overview_shape": list(shape), "caption": caption,
            "top_tiles": top, **(extra or {})}
    write_text(out_dir / "heatmap.json", json.dumps(meta, indent=2))
    return meta
