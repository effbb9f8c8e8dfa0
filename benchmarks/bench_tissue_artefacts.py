"""Tissue masks on slides with artefacts, against their truth: ours vs CLAM's own segmentation.

    python benchmarks/bench_tissue_artefacts.py [--slides 3] [--width 8192] [--workdir /tmp/wsi-bench-artefacts]
                                                [--kinds clean ink ...] [--seed 0]

Writes ``--slides`` demo slides per kind (fixed seeds; `wsi-pipeline demo --artefacts KIND`): clean,
ink (pen strokes and a circle), faint (half an island at 30 % of its stain), ihc (the tissue an IHC
stain), blur (two out-of-focus fields), bubbles (three bubbles and a coverslip edge on the glass),
fold (a band of tissue lying on itself). Per kind, pooled over its slides, at the mask's resolution:
tissue recall and precision against the truth mask, and the worst slide's; the share of ink and of
bubble pixels inside the mask; for blur the recall / precision of the tiles flagged blurred (a tile
counts as blurred when at least half of its tissue lies in a field: the score judges only stained
pixels), for fold those of the tiles flagged fold (half of the tile fold, by the truth and by
``tiles/<id>.fold.npy``). ``--seed`` draws other slides of the same kinds. Ours: the `tissue` and `tiles` stages with `bwh_biopsy` and `tcga`
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

from pipelines.config import RunConfig
from pipelines.engine.run_dir import RunPaths
from pipelines.manifest import SlideEntry
from pipelines.stages.tiles import tiles_stage
from pipelines.stages.tissue import tissue_stage
from wsi.demo_cohort import write_demo_slide
from wsi.slide import open_slide
from wsi.tissue import PRESETS

KINDS = {"clean": (), "ink": ("ink",), "faint": ("faint",), "ihc": ("ihc",), "blur": ("blur",),
         "bubbles": ("bubbles",), "fold": ("fold",)}


def tile_truth(path: Path, name: str, coords: np.ndarray, size: int, width: int, *, of_tissue: bool = False) -> np.ndarray | None:
    """Per tile, whether at least half of it lies in the artefact's truth mask (None: the slide has none).

    ``of_tissue``: half of the tile's *tissue* (by the truth tissue mask), not of its area. A sharpness score
    judges only the stained pixels, so a tile at the tissue's edge whose tissue is all in a blurred field is
    blurred to the model however much glass it holds."""
    file = path.with_suffix(f".{name}.png")
    if not file.exists():
        return None
    truth = np.asarray(Image.open(file)) > 0
    tissue = truth_at(path, "tissue", truth.shape) if of_tissue else np.ones_like(truth)
    ds = width / truth.shape[1]
    windows = [(slice(int(y / ds), int((y + size) / ds)), slice(int(x / ds), int((x + size) / ds))) for x, y in coords]
    return np.array([(truth[w] & tissue[w]).sum() >= 0.5 * max(1, tissue[w].sum()) for w in windows], bool)


def rates(counts: np.ndarray) -> str:
    """'recall / precision' of (hits, truths, flagged) counts, '–' without truths."""
    return f"{counts[0] / max(1, counts[1]):.3f} / {counts[0] / max(1, counts[2]):.3f}" if counts[1] else "–"


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
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS), help="slide kinds to run (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="added to every slide's seed: another draw of the same kinds "
                                                             "(held-out slides for rules tuned on the default draw)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"{args.slides} slides per kind (seeds {args.seed} + 100 × kind + slide), {args.width}×{args.width * 3 // 4} px at "
          "0.25 µm/px; pooled over the slides\n")
    print("| kind | preset | ours: recall / precision | worst slide | CLAM: recall / precision | worst slide "
          "| ink inside the mask: ours / CLAM | bubbles inside: ours / CLAM | blurred tiles: recall / precision "
          "| fold tiles: recall / precision |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, (kind, artefacts) in enumerate(KINDS.items()):
        if kind not in args.kinds:
            continue  # the others keep their seeds
        paths = []
        for i in range(args.slides):
            path = args.workdir / f"{kind}_{args.seed + 100 * k + i}.svs"  # the seed in the name: no stale slide
            if not path.exists():
                write_demo_slide(path, height=args.width * 3 // 4, width=args.width, positive=i % 2 == 1,
                                 seed=args.seed + 100 * k + i, artefacts=artefacts)
            paths.append(path)
        for preset in ("bwh_biopsy", "tcga"):
            cfg = RunConfig.model_validate({"tissue": {"preset": preset, "area_reference_mpp": 0.25},
                                            "slides": {"verify_tiles": "tiles"}})  # the same scores as the features read
            counts = np.zeros(8)  # ours ∧ truth, ours, CLAM ∧ truth, CLAM, ink in ours, ink in CLAM's, ink, truth
            bubble = np.zeros(3)  # in ours, in CLAM's, bubble pixels
            blur_counts, fold_counts = np.zeros(3), np.zeros(3)  # flagged ∧ truth, truth, flagged
            worst = [np.inf, np.inf, np.inf, np.inf]  # recall, precision: ours, CLAM
            for path in paths:
                with tempfile.TemporaryDirectory() as tmp:
                    run = RunPaths(Path(tmp))
                    entry = SlideEntry(path.stem, path, line=2)
                    tissue_stage(entry, cfg, run)
                    tiles = tiles_stage(entry, cfg, run)
                    ours = np.asarray(Image.open(run.tissue_mask(path.stem))).astype(bool)
                    coords, scores = np.load(run.tile_coords(path.stem)), np.load(run.tile_sharpness(path.stem))
                    folds = np.load(run.tile_folds(path.stem)) if run.tile_folds(path.stem).exists() else np.zeros(len(coords))
                clam = clam_mask(path, preset, ours.shape)
                tissue, ink = truth_at(path, "tissue", ours.shape), truth_at(path, "ink", ours.shape)
                counts[:2] += [(ours & tissue).sum(), ours.sum()]
                counts[2:4] += [(clam & tissue).sum(), clam.sum()]
                counts[7] += tissue.sum()
                worst = np.minimum(worst, [(ours & tissue).sum() / tissue.sum(), (ours & tissue).sum() / max(1, ours.sum()),
                                           (clam & tissue).sum() / tissue.sum(), (clam & tissue).sum() / max(1, clam.sum())])
                if ink is not None:
                    counts[4:6] += [(ours & ink).sum(), (clam & ink).sum()]
                    counts[6] += ink.sum()
                rims = truth_at(path, "bubble", ours.shape)
                if rims is not None:
                    bubble += [(ours & rims).sum(), (clam & rims).sum(), rims.sum()]
                size = tiles["level0_size"]
                blurred = tile_truth(path, "blur", coords, size, args.width, of_tissue=True)
                if blurred is not None:
                    flagged = scores < cfg.tiling.blur_ratio * np.nanmedian(scores)
                    blur_counts += [(flagged & blurred).sum(), blurred.sum(), flagged.sum()]
                folded = tile_truth(path, "fold", coords, size, args.width)
                if folded is not None:
                    flagged = folds >= 0.5
                    fold_counts += [(flagged & folded).sum(), folded.sum(), flagged.sum()]
            ink_cell = f"{counts[4] / counts[6]:.3f} / {counts[5] / counts[6]:.3f}" if counts[6] else "–"
            bubble_cell = f"{bubble[0] / bubble[2]:.3f} / {bubble[1] / bubble[2]:.3f}" if bubble[2] else "–"
            print(f"| {kind} | {preset} | {counts[0] / counts[7]:.3f} / {counts[0] / counts[1]:.3f} | "
                  f"{worst[0]:.3f} / {worst[1]:.3f} | {counts[2] / counts[7]:.3f} / {counts[2] / max(1, counts[3]):.3f} | "
                  f"{worst[2]:.3f} / {worst[3]:.3f} | {ink_cell} | {bubble_cell} | {rates(blur_counts)} | "
                  f"{rates(fold_counts)} |")


if __name__ == "__main__":
    main()
