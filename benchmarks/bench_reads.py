"""Tile reads per backend: milliseconds per tile region on an Aperio demo slide, and the ratio to OpenSlide.

    python benchmarks/bench_reads.py [--width 32768] [--tiles 300] [--workdir /tmp/wsi-bench-features]

Reads the regions feature extraction reads (512-px level-0 regions for 256-px tiles at 0.5 µm/px
from a 40× slide, on the tissue grid) with OpenSlide, with tiffslide through its Zarr layer, and
with the tiffslide backend's direct tile reads (tifffile decoding each JPEG tile), best of 3.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench_features import tissue_grid

from wsi.backends import TiffSlideReader, open_reader
from wsi.demo_cohort import write_demo_slide


def per_tile_ms(reader, coords, size: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for x, y in coords:
            reader.read_region((int(x), int(y)), 0, (size, size))
        best = min(best, time.perf_counter() - start)
    return best / len(coords) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=32768)
    parser.add_argument("--tiles", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsi-bench-features"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / f"slide_{args.width}.svs"
    if not path.exists():
        write_demo_slide(path, height=args.width * 3 // 4, width=args.width, positive=True, seed=5, downsamples=(1, 4, 16, 64))
    grid, _ = tissue_grid(path)
    coords, size = grid.coords[:args.tiles], grid.plan.read_size
    openslide = open_reader(path, "openslide")
    direct = per_tile_ms(TiffSlideReader(path), coords, size)
    zarr = per_tile_ms(TiffSlideReader(path, direct_tile_reads=False), coords, size)
    base = per_tile_ms(openslide, coords, size)
    print(f"{path.name}: {len(coords)} regions of {size}×{size} px at level 0, ms per region (best of 3)\n")
    print("| reader | ms / region | vs OpenSlide |")
    print("|---|---|---|")
    for name, ms in (("OpenSlide", base), ("tiffslide via Zarr", zarr), ("tiffslide backend, direct tile reads", direct)):
        print(f"| {name} | {ms:.2f} | {base / ms:.1f}× |")


if __name__ == "__main__":
    main()
