"""Teacher vs distilled student on one realistic-size slide: patches/s and where the time goes.

    python benchmarks/bench_student_speed.py [--width 40000] [--teacher-tiles 400] [--student-tiles 3000]
        [--precision auto] [--workdir /tmp/wsi-bench-student]

The demo's encoders (teacher: ViT-S/16 on 224 px, mean-pooled tokens; student: ViT-Ti/16 on 112 px
with a TransScan projector to the teacher's 384 dimensions; weights do not change speed, so both
are seeded random). The student runs twice: ``student`` reads its tiles at its input resolution
(``distill.read_at_input``: 128 px from the slide's 4× level, resized to 112), ``student_tiled``
reads them as the tiling delivers them (512 px at level 0, resized to 256, then 112), on a 40× Aperio demo slide of
``width`` × 3/4·width at 0.25 µm/px, 256-px tiles
at 0.5 µm/px. For each, in its own process with torch on every core and one loader process:
reading + decoding alone (the loader, no model), the model alone (tiles already in memory,
preprocessing + forward) and the whole extraction into a Zarr store. Prints the student / teacher
ratio of extraction patches/s (the EFCM promise: many times faster) and, per encoder, the time
per tile split into read/decode and model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench_features import tissue_grid

TEACHER = {"model": "vit_small", "pretrained": False, "seed": 0, "pool": "mean"}
STUDENT = {"model": "vit_tiny", "input_size": 112, "model_kwargs": {"img_size": 112}}


def build(which: str, precision: str):
    """teacher; student (its tiles read at its input resolution, as distilled); student_tiled (read as tiled, resized)."""
    from distill.config import DistillConfig
    from distill.model import build_student
    from features.encoders import EncoderConfig, create_encoder, wrap_encoder

    if which == "teacher":
        return create_encoder(EncoderConfig(**TEACHER, precision=precision))
    cfg = DistillConfig(student=STUDENT)
    model, data_cfg = build_student(cfg, 384)
    spec = EncoderConfig(**STUDENT, pretrained=False, seed=0, precision=precision)
    encoder = wrap_encoder(model, spec, data_cfg)
    encoder.read_at_input = which == "student"
    return encoder


def child(args) -> None:
    import torch

    from features.extract import ExtractionConfig, TileDataset, encoder_attrs, extract_slide, make_loader
    from pipelines.engine.cluster import machine_cores

    torch.set_num_threads(machine_cores())
    encoder = build(args.which, args.precision)
    grid, mpp = tissue_grid(args.slide)
    coords = grid.coords[: args.tiles]
    cfg = ExtractionConfig(batch_size=64, num_workers=1)
    dataset = TileDataset.for_encoder(encoder, args.slide, coords, grid.plan, mpp=mpp)
    start = time.perf_counter()
    for _ in make_loader(dataset, cfg, encoder.device):  # read + decode alone, in the loader process
        pass
    read_s = (time.perf_counter() - start) / len(coords)
    tiles = torch.stack([dataset[i][0] for i in range(min(len(coords), 256))])
    encoder(tiles[:64])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(tiles), 64):
        encoder(tiles[i:i + 64]).cpu().numpy()
    model_s = (time.perf_counter() - start) / len(tiles)
    stats = extract_slide(dataset, encoder, args.workdir / f"{args.which}.zarr", cfg, encoder_attrs(encoder, grid.plan))
    print(json.dumps({"tiles": len(coords), "precision": encoder.precision, "read_ms": read_s * 1000, "model_ms": model_s * 1000,
                      "extract_pps": stats["patches_per_s"], "busy": stats["model_seconds"] / stats["seconds"],
                      "params": int(sum(p.numel() for p in encoder.model.parameters()))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=40_000)
    parser.add_argument("--teacher-tiles", type=int, default=400)
    parser.add_argument("--student-tiles", type=int, default=3000)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsi-bench-student"))
    parser.add_argument("--child", nargs=2, metavar=("WHICH", "SLIDE"), help=argparse.SUPPRESS)
    parser.add_argument("--tiles", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.which, args.slide = args.child[0], Path(args.child[1])
        child(args)
        return
    from wsi.demo_cohort import write_demo_slide

    args.workdir.mkdir(parents=True, exist_ok=True)
    slide = args.workdir / f"slide_{args.width}.svs"
    if not slide.exists():
        write_demo_slide(slide, height=args.width * 3 // 4, width=args.width, positive=True, seed=2, downsamples=(1, 4, 16, 64))
    results = {}
    for which, tiles in (("teacher", args.teacher_tiles), ("student_tiled", args.student_tiles), ("student", args.student_tiles)):
        cmd = [sys.executable, __file__, "--child", which, str(slide), "--tiles", str(tiles), "--precision", args.precision,
               "--workdir", str(args.workdir)]
        results[which] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    print(f"{slide.name} ({args.width} × {args.width * 3 // 4} at 0.25 µm/px), 256-px tiles at 0.5 µm/px, batch 64, "
          f"1 loader process, torch on every core\n")
    print("| encoder | params | precision | tiles | read + decode ms/tile (loader) | model ms/tile | extraction p/s | model busy |")
    print("|---|---|---|---|---|---|---|---|")
    for which, r in results.items():
        print(f"| {which} | {r['params'] / 1e6:.1f} M | {r['precision']} | {r['tiles']} | {r['read_ms']:.2f} | {r['model_ms']:.2f} "
              f"| {r['extract_pps']:.1f} | {r['busy']:.0%} |")
    t, s = results["teacher"], results["student"]
    print(f"\nstudent / teacher, extraction patches/s: **{s['extract_pps'] / t['extract_pps']:.1f}×** "
          f"(model alone: {t['model_ms'] / s['model_ms']:.1f}×; with the tiling's reads, as before "
          f"distill.read_at_input: {results['student_tiled']['extract_pps'] / t['extract_pps']:.1f}×)")
    bound = "reading and decoding" if s["read_ms"] > s["model_ms"] else "the model"
    print(f"the student's extraction is bound by {bound}: {s['read_ms']:.2f} ms/tile to read vs {s['model_ms']:.2f} ms/tile "
          f"in the model; its ceiling is {1000 / max(s['read_ms'], s['model_ms']):.0f} p/s with one loader process")


if __name__ == "__main__":
    main()
