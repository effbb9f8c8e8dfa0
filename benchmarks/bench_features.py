"""Feature extraction: model-only vs end-to-end throughput, and peak memory on a small and a large slide.

    python benchmarks/bench_features.py [--models vit_small resnet18] [--precisions fp32 auto] [--large 32768]
        [--max-tiles 600] [--workdir /tmp/wsi-bench-features]

For each model and precision (``auto`` shows what it resolved to on this CPU), in one run, with
torch on every core of the machine (what a one-slide run's task gets): model-only throughput (preprocessing + forward on tiles already in
memory as uint8 tensors: the ceiling), end-to-end extraction throughput on a small and a large demo
slide (reading, JPEG decoding and resizing in DataLoader workers, inference, Zarr writes), their
ratio, the share of the extraction's wall time the model was computing (the rest it waited for
tiles: reading must overlap the model, never starve it), and the peak RSS of the extracting process for both slides (flat = memory does not grow
with the slide). Each measurement runs in its own process so peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def tissue_grid(slide_path: Path):
    from wsi.slide import open_slide
    from wsi.tiling import TilingConfig, tile_grid
    from wsi.tissue import TissueConfig, mask_slide

    with open_slide(slide_path) as slide:
        tissue, _ = mask_slide(slide, TissueConfig(preset="bwh_biopsy", area_reference_mpp=0.25))
        return tile_grid(slide.dimensions, slide.mpp, slide.level_downsamples, tissue, TilingConfig()), slide.mpp


def child(args) -> None:
    """One measurement in a fresh process; prints a JSON line."""
    import torch

    from features.encoders import EncoderConfig, create_encoder
    from features.extract import ExtractionConfig, TileDataset, encoder_attrs, extract_slide
    from pipelines.engine.cluster import machine_cores
    from wsi.slide import open_slide
    from wsi.tiling import read_tile

    torch.set_num_threads(machine_cores())  # the same threads for the model alone and for extraction
    encoder = create_encoder(EncoderConfig(model=args.model, precision=args.precision, seed=0))
    grid, mpp = tissue_grid(args.slide)
    grid.coords = grid.coords[:args.max_tiles]
    cfg = ExtractionConfig(batch_size=args.batch_size, num_workers=args.loader_workers)
    result = {"model": args.model, "slide": args.slide.name, "tiles": len(grid.coords), "precision": encoder.precision,
              "threads": torch.get_num_threads()}
    if args.what == "model":
        with open_slide(args.slide) as slide:
            tiles = torch.from_numpy(np.stack([read_tile(slide, x, y, grid.plan) for x, y in grid.coords[:args.batch_size * 4]]))
        encoder(tiles[: args.batch_size])  # warm-up
        start = time.perf_counter()
        from features.batch_threads import batches_in_threads

        batches = [tiles[i:i + args.batch_size] for i in range(0, len(tiles), args.batch_size)]
        for _ in range(2):  # as extraction runs them: a batch per thread, every thread busy
            for _ in batches_in_threads(batches, lambda b: encoder(b).cpu().numpy(), torch.get_num_threads()):
                pass
        result["patches_per_s"] = 2 * len(tiles) / (time.perf_counter() - start)
    else:
        encoder(torch.zeros(2, 256, 256, 3, dtype=torch.uint8))  # warm-up, as in model-only
        stats = extract_slide(TileDataset(args.slide, grid.coords, grid.plan, mpp=mpp), encoder,
                              args.out / f"{args.model}_{args.slide.stem}.zarr", cfg, encoder_attrs(encoder, grid.plan))
        result["patches_per_s"] = stats["patches_per_s"]
        result["model_busy"] = stats["model_seconds"] / stats["seconds"]  # 1.0: the model never waited for tiles
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["loader_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_small", "resnet18"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "auto"], choices=["fp32", "bf16", "fp16", "auto"])
    parser.add_argument("--precision", default="auto", help=argparse.SUPPRESS)  # one child's precision
    parser.add_argument("--max-tiles", type=int, default=600, help="tiles extracted per slide at most")
    parser.add_argument("--small", type=int, default=8192, help="level-0 width of the small slide")
    parser.add_argument("--large", type=int, default=32768, help="level-0 width of the large slide")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsi-bench-features"))
    parser.add_argument("--child", nargs=3, metavar=("WHAT", "MODEL", "SLIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.what, args.model, slide = args.child
        args.slide, args.out = Path(slide), args.workdir
        child(args)
        return
    from wsi.demo_cohort import write_demo_slide

    args.workdir.mkdir(parents=True, exist_ok=True)
    slides = []
    for width in (args.small, args.large):
        path = args.workdir / f"slide_{width}.svs"
        if not path.exists():
            write_demo_slide(path, height=width * 3 // 4, width=width, positive=True, seed=5, downsamples=(1, 4, 16, 64))
        slides.append(path)

    def run(what: str, model: str, slide: Path, precision: str) -> dict:
        cmd = [sys.executable, __file__, "--child", what, model, str(slide), "--workdir", str(args.workdir),
               "--precision", precision, "--batch-size", str(args.batch_size), "--loader-workers", str(args.loader_workers),
               "--max-tiles", str(args.max_tiles)]
        return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])

    print(f"batch {args.batch_size}, {args.loader_workers} loader worker(s), tiles 256 px at 0.5 µm/px read from 40× slides, "
          f"at most {args.max_tiles} per slide\n")
    print("| model | precision | threads | slide | tiles | model alone p/s | extraction p/s | extraction / model alone "
          "| model busy | peak RSS MB | loader RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    from features.precision import NATIVE_BF16_FLAGS, cpu_flags, resolve_precision

    alone: dict[tuple[str, str], float] = {}
    for model in args.models:
        for precision in args.precisions:
            ceiling = run("model", model, slides[0], precision)
            alone[model, ceiling["precision"]] = ceiling["patches_per_s"]
            for slide in slides:
                e2e = run("extract", model, slide, precision)
                shown = precision if precision == e2e["precision"] else f"{precision} → {e2e['precision']}"
                print(f"| {model} | {shown} | {e2e['threads']} | {slide.stem} | {e2e['tiles']} | {ceiling['patches_per_s']:.1f} "
                      f"| {e2e['patches_per_s']:.1f} | **{e2e['patches_per_s'] / ceiling['patches_per_s']:.2f}** "
                      f"| {e2e['model_busy']:.0%} | {e2e['peak_rss_mb']:.0f} | {e2e['loader_peak_rss_mb']:.0f} |")
    native = sorted(set(NATIVE_BF16_FLAGS) & cpu_flags())
    print(f"\nthis CPU: native bf16 {'yes (' + ', '.join(native) + ')' if native else 'no'}; precision auto → "
          f"{resolve_precision('auto', 'cpu')}")
    for model in args.models:
        if (model, "bf16") in alone and (model, "fp32") in alone:
            print(f"{model}: model alone bf16 / fp32 = {alone[model, 'bf16'] / alone[model, 'fp32']:.2f}×")


if __name__ == "__main__":
    main()
