"""Time and peak memory of drawing one slide's attention heatmap files on a large slide, against reading its overview alone.

    python benchmarks/bench_heatmaps.py [--width 100000] [--overview 2048] [--workdir /tmp/wsi-bench]

Writes a 100k × 80k demo slide once (pyramid 1/4/16/64), masks and tiles it (256 px at 0.5 µm/px),
gives every tile a 384-d feature vector and scores it with a CLAM-SB, then — each in a fresh
process, so peak RSS is that step's own — measures:
  floor:   reading the overview image alone (what any heatmap must at least do);
  scores:  CLAM attention over the bag, percentiles;
  heatmap: every file of ``write_heatmap`` (overview, overlay, figure, GeoJSON, CSV, top tiles).
CLAM's own heatmap code paints on a canvas the size of a pyramid level, which for this slide at
level 1 would be 25,000 × 20,000 × 3 floats (6 GB) before blending.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np


def _peak_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it is not inherited across the spawn's exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _floor(slide_path: str, overview: int, queue) -> None:
    from wsi.slide import open_slide

    start = time.perf_counter()
    with open_slide(slide_path) as slide:
        slide.thumbnail(overview)
    queue.put((time.perf_counter() - start, _peak_mb()))


def _scores(bag_path: str, queue) -> None:
    import torch

    from mil.attention import percentile_of, slide_attention
    from mil.clam import CLAM

    torch.manual_seed(0)
    features = np.load(bag_path, mmap_mode="r")
    start = time.perf_counter()
    attention = slide_attention(CLAM(features.shape[1], 2), features)
    percentile_of(attention.raw, attention.raw)
    queue.put((time.perf_counter() - start, _peak_mb()))


def _heatmap(slide_path: str, grid_path: str, mask_path: str, out: str, overview: int, dense: bool, queue) -> None:
    from mil.heatmaps import HeatmapConfig, score_tiles, write_heatmap
    from wsi.slide import open_slide
    from wsi.tiling import ReadPlan

    grid = np.load(grid_path, allow_pickle=True).item()
    rng = np.random.default_rng(0)
    coords = grid["coords"]
    if dense:  # every tile position of the slide, as if it were all tissue
        size, (width, height) = grid["plan"]["level0_size"], grid["dimensions"]
        xs, ys = np.meshgrid(np.arange(0, width - size + 1, size), np.arange(0, height - size + 1, size))
        coords = np.stack([xs.ravel(), ys.ravel()], axis=1)
    raw = np.sin(coords[:, 0] / 9000.0) + np.cos(coords[:, 1] / 7000.0) + rng.normal(0, 0.1, len(coords))
    mask = np.load(mask_path)
    start = time.perf_counter()
    with open_slide(slide_path) as slide:
        write_heatmap(Path(out), slide, "large", score_tiles(coords, grid["plan"]["level0_size"], raw), mask,
                      HeatmapConfig(width=overview), caption="benchmark", plan=ReadPlan(**grid["plan"]))
    queue.put((time.perf_counter() - start, _peak_mb()))


def _measure(target, *args) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    from dataclasses import asdict

    from wsi.demo_cohort import write_demo_slide
    from wsi.slide import open_slide
    from wsi.tiling import TilingConfig, tile_grid
    from wsi.tissue import TissueConfig, mask_slide

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=100_000, help="level-0 width (height is 4/5 of it)")
    parser.add_argument("--overview", type=int, default=2048, help="longer side of the heatmap overview")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsi-bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    width, height = args.width, args.width * 4 // 5
    path = args.workdir / f"heatmap_{width}.svs"
    if not path.exists():
        start = time.perf_counter()
        write_demo_slide(path, height=height, width=width, positive=True, seed=5, downsamples=(1, 4, 16, 64))
        print(f"(wrote {path.name}, {path.stat().st_size / 1e6:.0f} MB, in {time.perf_counter() - start:.0f} s)")
    with open_slide(path) as slide:
        tissue, _ = mask_slide(slide, TissueConfig(preset="tcga"))
        grid = tile_grid(slide.dimensions, slide.mpp, slide.level_downsamples, tissue, TilingConfig(target_mpp=0.5))
    grid_path, mask_path, bag_path = (args.workdir / f"heatmap_{width}.{n}.npy" for n in ("grid", "mask", "bag"))
    np.save(grid_path, {"coords": grid.coords, "plan": asdict(grid.plan), "dimensions": (width, height)}, allow_pickle=True)
    np.save(mask_path, tissue.mask)
    np.save(bag_path, np.random.default_rng(0).normal(size=(len(grid.coords), 384)).astype(np.float16))
    print(f"slide {width} × {height} px (0.25 µm/px), {len(grid.coords):,} tiles of 256 px at 0.5 µm/px; "
          f"overview {args.overview} px; each step in a fresh process")
    print(f"{'step':<48} {'seconds':>8} {'peak RSS MB':>12} {'× floor time':>13}")
    floor_s, floor_mb = _measure(_floor, str(path), args.overview)
    n_dense = (width // grid.plan.level0_size) * (height // grid.plan.level0_size)
    heatmap_args = (str(path), str(grid_path), str(mask_path), str(args.workdir / "heatmap_out"), args.overview)
    rows = [("floor: read the overview alone", floor_s, floor_mb),
            ("CLAM attention + percentiles (384-d bag)", *_measure(_scores, str(bag_path))),
            (f"all heatmap files, {len(grid.coords):,} tissue tiles", *_measure(_heatmap, *heatmap_args, False)),
            (f"all heatmap files, {n_dense:,} tiles (whole slide)", *_measure(_heatmap, *heatmap_args, True))]
    for name, seconds, mb in rows:
        print(f"{name:<48} {seconds:>8.2f} {mb:>12.0f} {seconds / floor_s:>12.1f}×")
    print("all heatmap files: overview read, overlay and figure PNGs, GeoJSON, CSV, 8 top + 8 bottom tile images")


if __name__ == "__main__":
    main()
