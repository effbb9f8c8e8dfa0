"""Tissue masks on slides with artefacts, against their truth: ours vs CLAM's own segmentation.

    python benchmarks/bench_tissue_artefacts.py [--slides 3] [--width 8192] [--workdir /tmp/wsi-bench-artefacts]

Writes ``--slides`` demo slides per kind (fixed seeds; `wsi-pipeline demo --artefacts KIND`): clean,
ink (pen strokes and a circle), faint (half an island at 30 % of its stain), ihc (the tissue an IHC
stain), blur (two out-of-focus fields). Per kind, pooled over its slides, at the mask's resolution:
tissue recall and precision against the truth mask, the share of ink pixels inside the mask, and for
blur the recall / precision of the tiles flagged blurred (a tile counts as blurred when at least half
of it lies in a field). Ours: the `tissue` and `tiles` stages with `bwh_biopsy` and `tcga`
(physical areas, `area_reference_mpp: 0.25`); CLAM: its algorithm with the same presets
(``benchmarks/clam_baseline.py``: median-blurred saturation, fixed threshold, contour filtering).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np
from clam_baseline import clam_segment
from PIL import Image

from pipelines.artifacts import RunPaths
from pipelines.config import RunConfig
from pipelines.manifest import SlideEntry
from pipelines.stages import tiles_stage, tissue_stage
from wsi.demo_cohort import write_demo_slide
from wsi.slide import open_slide
from wsi.tissue import PRESETS

KINDS = {"clean": (), "ink": ("ink",), "faint": ("faint",), "ihc": ("ihc",), "blur": ("blur",)}


def truth_at(path: Path, name: str, shape: tuple[int, int]) -> np.ndarray | None:
    file = path.with_suffix(f".{name}.png")
    if not file.exists():
        return None
    return cv2.resize((np.asarray(Image.open(file)) > 0).view(np.uint8), shape[::-1],
                      interpolation=cv2.INTER_NEAREST).astype(bool)


def clam_mask(path: Path, preset: str, shape: tuple[int, int]) -> np.ndarray:
    params = {k: v for k, v in PRESETS[preset].items() if k != "use_otsu"}
    with open_slide(path, backend="openslide") as slide:
        level = slide.best_level_for_downsample(64)
        size = slide.level_dimensions[level]
        rgb = slide.read_region((0, 0), level, size)
        scale = (slide.dimensions[0] / size[0], slide.dimensions[1] / size[1])
    contours, holes = clam_segment(rgb, scale, **params)
    mask = np.zeros(shape, np.uint8)
    factor = (shape[1] / slide.dimensions[0], shape[0] / slide.dimensions[1])
    for contour, contour_holes in zip(contours, holes):
        cv2.fillPoly(mask, [np.round(contour.reshape(-1, 2) * factor).astype(np.int32)], 1)
        for hole in contour_holes:
            cv2.fillPoly(mask, [np.round(hole.reshape(-1, 2) * factor).astype(np.int32)], 0)
    return mask.astype(bool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=3)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsi-bench-artefacts"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"{args.slides} slides per kind, {args.width}×{args.width * 3 // 4} px at 0.25 µm/px; pooled over the slides\n")
    print("| kind | preset | ours: recall / precision | CLAM: recall / precision | ink inside the mask: ours / CLAM "
          "| blurred tiles: recall / precision |")
    print("|---|---|---|---|---|---|")
    for k, (kind, artefacts) in enumerate(KINDS.items()):
        paths = []
        for i in range(args.slides):
            path = args.workdir / f"{kind}_{i}.svs"
            if not path.exists():
                write_demo_slide(path, height=args.width * 3 // 4, width=args.width, positive=i % 2 == 1,
                                 seed=100 * k + i, artefacts=artefacts)
            paths.append(path)
        for preset in ("bwh_biopsy", "tcga"):
            cfg = RunConfig.model_validate({"tissue": {"preset": preset, "area_reference_mpp": 0.25}})
            counts, blur_counts = np.zeros(8), np.zeros(3)  # blur: flagged ∧ blurred, blurred, flagged
            for path in paths:
                with tempfile.TemporaryDirectory() as tmp:
                    run = RunPaths(Path(tmp))
                    entry = SlideEntry(path.stem, path, line=2)
                    tissue_stage(entry, cfg, run)
                    tiles = tiles_stage(entry, cfg, run)
                    ours = np.asarray(Image.open(run.tissue_mask(path.stem))).astype(bool)
                    coords, scores = np.load(run.tile_coords(path.stem)), np.load(run.tile_sharpness(path.stem))
                clam = clam_mask(path, preset, ours.shape)
                tissue, ink = truth_at(path, "tissue", ours.shape), truth_at(path, "ink", ours.shape)
                counts[:2] += [(ours & tissue).sum(), ours.sum()]
                counts[2:4] += [(clam & tissue).sum(), clam.sum()]
                counts[7] += tissue.sum()
                if ink is not None:
                    counts[4:6] += [(ours & ink).sum(), (clam & ink).sum()]
                    counts[6] += ink.sum()
                blur_file = path.with_suffix(".blur.png")
                if blur_file.exists():
                    blur = np.asarray(Image.open(blur_file)) > 0
                    ds, size = args.width / blur.shape[1], tiles["level0_size"]
                    truth = np.array([blur[int(y / ds):int((y + size) / ds), int(x / ds):int((x + size) / ds)].mean() >= 0.5
                                      for x, y in coords])
                    flagged = scores < cfg.tiling.blur_ratio * np.nanmedian(scores)
                    blur_counts += [(flagged & truth).sum(), truth.sum(), flagged.sum()]
            ink_cell = f"{counts[4] / counts[6]:.3f} / {counts[5] / counts[6]:.3f}" if counts[6] else "–"
            blur_cell = (f"{blur_counts[0] / max(1, blur_counts[1]):.3f} / {blur_counts[0] / max(1, blur_counts[2]):.3f}"
                         if blur_counts[1] else "–")
            print(f"| {kind} | {preset} | {counts[0] / counts[7]:.3f} / {counts[0] / counts[1]:.3f} | "
                  f"{counts[2] / counts[7]:.3f} / {counts[2] / max(1, counts[3]):.3f} | {ink_cell} | {blur_cell} |")


if __name__ == "__main__":
    main()
