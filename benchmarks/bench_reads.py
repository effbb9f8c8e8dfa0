"""Region reads per slide format and backend: ms per 512-px level-0 region, and which reader `auto` chose.

    python benchmarks/bench_reads.py [--width 8000] [--regions 60] [--formats svs svs-j2k ...]
        [--workdir /tmp/wsi-bench-reads]

One demo slide (``--width`` × 3/4 of it, 0.25 µm/px, levels 1/4/16×) is written as Aperio SVS, then its
decoded pixels in every format of ``wsi.vendor_writers`` (the same pixels: JPEG formats reuse the
encoder, JPEG 2000 is lossless). Each backend that opens a file reads the regions feature extraction
reads (512 px at level 0 for 256-px tiles at 0.5 µm/px, on the reference's tissue grid), with a fresh
reader per repeat (no decoded tile kept from one repeat to the next), best of 3; "tiffslide (Zarr)" is
tiffslide's own read path, "tiffslide" the backend's direct tile reads where the page allows them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from wsi.backends import BACKENDS, TiffSlideReader, open_reader
from wsi.vendor_writers import WRITERS, write_format

READERS = {"openslide": BACKENDS["openslide"], "tiffslide": BACKENDS["tiffslide"],
           "tiffslide (Zarr)": lambda path: TiffSlideReader(path, direct_tile_reads=False)}


def reference_levels(workdir: Path, width: int) -> tuple[Path, list[np.ndarray]]:
    """The reference SVS (a demo slide) and its decoded levels."""
    from wsi.demo_cohort import write_demo_slide

    path = workdir / f"reference_{width}.svs"
    if not path.exists():
        write_demo_slide(path, height=width * 3 // 4, width=width, positive=True, seed=11)
    reader = open_reader(path, "tiffslide")
    levels = [reader.read_region((0, 0), level, size) for level, size in enumerate(reader.level_dimensions)]
    reader.close()
    return path, levels


def region_ms(open_fn, path: Path, coords: np.ndarray, size: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        reader = open_fn(path)
        start = time.perf_counter()
        for x, y in coords:
            reader.read_region((int(x), int(y)), 0, (size, size))
        best = min(best, time.perf_counter() - start)
        reader.close()
    return best / len(coords) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=8000)
    parser.add_argument("--regions", type=int, default=60)
    parser.add_argument("--formats", nargs="+", default=list(WRITERS), choices=list(WRITERS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsi-bench-reads"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from bench_features import tissue_grid

    reference, levels = reference_levels(args.workdir, args.width)
    grid, _ = tissue_grid(reference)
    coords = grid.coords[:: max(1, len(grid.coords) // args.regions)][:args.regions]
    size = grid.plan.read_size
    print(f"{args.width}×{args.width * 3 // 4} px slide, {len(coords)} regions of {size}×{size} px at level 0, "
          f"ms per region (best of 3, fresh reader each)\n")
    print("| format | " + " | ".join(READERS) + " | auto chose | auto vs slowest |")
    print("|---|" + "---|" * (len(READERS) + 2))
    for fmt in args.formats:
        path = write_format(fmt, args.workdir, fmt, levels, 0.25)
        shift = 512 if fmt == "leica-scn" else 0  # the scan sits 512 px into the Leica collection
        timings = {}
        for name, open_fn in READERS.items():
            try:
                timings[name] = region_ms(open_fn, path, coords + shift, size)
            except Exception as exc:  # a reader that cannot open or read this format: shown as such
                timings[name] = f"cannot: {type(exc).__name__}"
        chosen = open_reader(path).backend
        numbers = [t for t in timings.values() if isinstance(t, float)]
        cells = [f"{t:.2f}" if isinstance(t, float) else t for t in timings.values()]
        ratio = f"{max(numbers) / timings[chosen]:.1f}×" if isinstance(timings.get(chosen), float) else "–"
        print(f"| {fmt} | " + " | ".join(cells) + f" | {chosen} | {ratio} |")


if __name__ == "__main__":
    main()
