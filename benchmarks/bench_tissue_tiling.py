"""Time tissue masking + tiling per slide on a large demo slide, against the floor of merely reading the masking level.

    python benchmarks/bench_tissue_tiling.py [--width 60000] [--repeats 3] [--workdir /tmp/wsi-bench]

Writes two Aperio-style demo slides once (pyramids 1/4/16/64 and 1/4/16, the common Aperio
layout, where the mask level is 16× and 16 times larger), then for each slide and backend prints:
seconds per slide for tissue + tiling, tiles per second, the time to read the masking level alone
(the floor no implementation can beat), and the ratio of the two.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from wsi.demo_cohort import write_demo_slide
from wsi.slide import open_slide
from wsi.tiling import TilingConfig, tile_grid
from wsi.tissue import TissueConfig, mask_slide


def _best(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=60_000, help="level-0 width (height is 2/3 of it)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsi-bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    width, height = args.width, args.width * 2 // 3
    tissue_cfg = TissueConfig(preset="tcga")
    tiling_cfg = TilingConfig(target_mpp=0.5, patch_size=256)
    print(f"slides {width}×{height} at 0.25 µm/px; tissue preset tcga; tiles 256 px at 0.5 µm/px; best of {args.repeats}")
    print(f"{'pyramid':<10} {'backend':<10} {'mask px':>9} {'floor: read mask level (s)':>27} "
          f"{'tissue+tiles (s/slide)':>23} {'ratio':>6} {'tiles':>7} {'tiles/s':>9}")
    for pyramid in ((1, 4, 16, 64), (1, 4, 16)):
        path = args.workdir / f"large_{width}_{'-'.join(map(str, pyramid))}.svs"
        if not path.exists():
            start = time.perf_counter()
            write_demo_slide(path, height=height, width=width, positive=True, seed=1, downsamples=pyramid)
            print(f"(wrote {path.name}, {path.stat().st_size / 1e6:.0f} MB, in {time.perf_counter() - start:.1f} s)")
        for backend in ("openslide", "tiffslide"):
            _bench(path, pyramid, backend, tissue_cfg, tiling_cfg, args.repeats)


def _bench(path: Path, pyramid, backend: str, tissue_cfg: TissueConfig, tiling_cfg: TilingConfig, repeats: int) -> None:
    with open_slide(path, backend=backend) as slide:
        level = slide.best_level_for_downsample(tissue_cfg.seg_downsample)
        w, h = slide.level_dimensions[level]
        floor, _ = _best(lambda: slide.read_region((0, 0), level, (w, h)), repeats)

        def tissue_and_tiles():
            tissue, _ = mask_slide(slide, tissue_cfg)
            return tile_grid(slide.dimensions, slide.mpp, slide.level_downsamples, tissue, tiling_cfg)

        seconds, grid = _best(tissue_and_tiles, repeats)
    n = len(grid.coords)
    print(f"{'/'.join(map(str, pyramid)):<10} {backend:<10} {w * h / 1e6:>8.1f}M {floor:>27.3f} {seconds:>23.3f} "
          f"{seconds / floor:>6.2f} {n:>7} {n / seconds:>9.0f}")

if __name__ == "__main__":
    main()
