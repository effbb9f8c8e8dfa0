"""Tissue + tiles per slide against CLAM's seg + patch and against the floor of reading the masking level.

    python benchmarks/bench_tissue_tiling.py [--width 40000] [--repeats 3] [--workdir /tmp/wsi-bench]

Writes two Aperio-style demo slides of ``width`` × 3/4·width at 0.25 µm/px once (pyramids 1/4/16/64
and 1/4/16, the common Aperio layouts; the second masks at 16×, a 16 times larger image), then per
slide prints, best of ``repeats``:

- ours: the ``tissue`` and ``tiles`` stage functions as the runner calls them (QC images and
  artifacts written), and the mask + grid alone;
- CLAM: its segmentation and four_pt patching (``benchmarks/clam_baseline.py``, OpenCV, CLAM's
  algorithm and parameters; CLAM's own scripts are not on this machine), 512-px level-0 patches,
  alone and with the files its script writes (mask JPEG, coords h5) — the like-for-like comparison
  with our stages, which write the QC JPEG, mask PNG, coords and metadata;
- the floor: reading the masking level, which no implementation can avoid;
- what ``slides.verify_tiles`` (on by default, off in the comparison: CLAM checks no tile) adds to the
  tiles stage: one read of every tile at its read level;
- tile precision / recall against the slide's true tissue mask (area of the tiles that is tissue;
  area of the tissue the tiles cover), for both.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from clam_baseline import clam_patch, clam_segment, clam_write
from PIL import Image

from pipelines.config import RunConfig
from pipelines.engine.run_dir import RunPaths
from pipelines.manifest import SlideEntry
from pipelines.stages.tiles import tiles_stage
from pipelines.stages.tissue import tissue_stage
from wsi.demo_cohort import load_truth, write_demo_slide
from wsi.slide import open_slide
from wsi.tiling import tile_grid
from wsi.tissue import PRESETS, mask_slide


def _best(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def precision_recall(coords: np.ndarray, size: int, truth: np.ndarray, downsample: float) -> tuple[float, float]:
    """(tissue share of the tiles' area, share of the tissue the tiles cover), at the truth mask's resolution."""
    covered = np.zeros_like(truth, bool)
    for x, y in coords:
        c0, r0 = int(x / downsample), int(y / downsample)
        c1, r1 = int(np.ceil((x + size) / downsample)), int(np.ceil((y + size) / downsample))
        covered[r0:r1, c0:c1] = True
    hit = (covered & truth).sum()
    return hit / max(covered.sum(), 1), hit / max(truth.sum(), 1)


def bench_slide(path: Path, repeats: int) -> None:
    settings = {"tissue": {"preset": "tcga"}, "tiling": {"target_mpp": 0.5, "patch_size": 256}}
    cfg = RunConfig.model_validate({**settings, "slides": {"verify_tiles": False}})  # CLAM checks no tile either
    checked = RunConfig.model_validate(settings)
    entry = SlideEntry("bench", path, line=2)
    truth, _, meta = load_truth(path)
    with tempfile.TemporaryDirectory() as tmp:
        paths = RunPaths(Path(tmp))
        stages_s, _ = _best(lambda: (tissue_stage(entry, cfg, paths), tiles_stage(entry, cfg, paths)), repeats)
        ours = np.load(paths.tile_coords("bench"))
        check_s, _ = _best(lambda: tiles_stage(entry, checked, paths), repeats)
        check_s -= _best(lambda: tiles_stage(entry, cfg, paths), repeats)[0]
    with open_slide(path, backend="auto") as slide:
        level = slide.best_level_for_downsample(cfg.tissue.seg_downsample)
        size = slide.level_dimensions[level]
        floor_s, _ = _best(lambda: slide.read_region((0, 0), level, size), repeats)
        core_s, _ = _best(lambda: tile_grid(slide.dimensions, slide.mpp, slide.level_downsamples,
                                            mask_slide(slide, cfg.tissue)[0], cfg.tiling), repeats)
    params = {k: v for k, v in PRESETS["tcga"].items() if k != "use_otsu"}
    with open_slide(path, backend="openslide") as slide:  # CLAM reads with OpenSlide
        dims = slide.dimensions
        scale = (dims[0] / size[0], dims[1] / size[1])

        def clam_seg():
            rgb = np.asarray(Image.fromarray(slide.read_region((0, 0), level, size)).convert("RGB"))
            return clam_segment(rgb, scale, **params)

        seg_s, (contours, holes) = _best(clam_seg, repeats)
    patch_s, clam = _best(lambda: clam_patch(contours, holes, dims, 512), repeats)
    with open_slide(path, backend="openslide") as slide, tempfile.TemporaryDirectory() as tmp:
        write_s, _ = _best(lambda: clam_write(slide, contours, holes, clam, Path(tmp)), repeats)
    p_ours, r_ours = precision_recall(ours, 512, truth, meta["downsample"])
    p_clam, r_clam = precision_recall(clam, 512, truth, meta["downsample"])
    clam_s = seg_s + patch_s
    print(f"| {path.name} | {size[0]}×{size[1]} | {floor_s:.3f} | {stages_s:.3f} | {clam_s + write_s:.3f} | "
          f"**{(clam_s + write_s) / stages_s:.2f}×** | {core_s:.3f} | {seg_s:.3f} + {patch_s:.3f} | "
          f"**{clam_s / core_s:.2f}×** | {stages_s / floor_s:.1f}× | "
          f"{len(ours)}: {p_ours:.3f} / {r_ours:.3f} | {len(clam)}: {p_clam:.3f} / {r_clam:.3f} | {check_s:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=40_000, help="level-0 width (height is 3/4 of it)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsi-bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    width, height = args.width, args.width * 3 // 4
    print(f"slides {width}×{height} at 0.25 µm/px; CLAM preset tcga; 512-px level-0 tiles; best of {args.repeats}; seconds\n")
    print("| slide | mask level | floor: read it | ours: tissue + tiles stages | CLAM: seg + patch + its writes "
          "| CLAM / our stages | ours: mask + grid | CLAM: seg + patch | CLAM / our mask + grid | our stages / floor "
          "| ours: tiles, precision / recall | CLAM: tiles, precision / recall | + reading every tile once "
          "(`slides.verify_tiles`) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for pyramid in ((1, 4, 16, 64), (1, 4, 16)):
        path = args.workdir / f"clam_{width}_{'-'.join(map(str, pyramid))}.svs"
        if not path.exists():
            write_demo_slide(path, height=height, width=width, positive=True, seed=1, downsamples=pyramid)
        bench_slide(path, args.repeats)


if __name__ == "__main__":
    main()
