"""Patches/s and peak memory of each encoder family of the zoo, at fp32 and at the precision ``auto`` picks, and
the demo's distilled student's speed-up against each teacher on the same tiles.

    python benchmarks/bench_encoders.py [--tiles 8] [--models uni,uni2_h,...] [--threads 2]

Weights do not change speed: each model is built with random weights (no file, no network), in its own
process so its peak resident memory (``ru_maxrss``) is its own. The tiles are the same random uint8
256-px tiles for every model, preprocessed as the model's preset says (resize, crop, normalise) and
timed with the forward pass, after one warm-up batch. Prints one row per model and precision and the
student / teacher ratio per teacher (the CPU is printed first: say which one a figure came from).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from features.precision import cpu_description

FAMILIES = ["lunit_s8", "ctranspath", "resnet50_trunc", "phikon", "h0_mini", "uni", "phikon_v2", "conch_v1_5",
            "virchow2", "uni2_h", "hoptimus0", "gigapath"]
STUDENT = {"model": "vit_tiny", "input_size": 112, "model_kwargs": {"img_size": 112}}  # the demo's student


def build(name: str, precision: str):
    import torch

    from features.encoders import EncoderConfig, resolve, wrap_encoder
    from features.loading import build_architecture, headless

    if name == "student":
        from distill.config import DistillConfig
        from distill.model import build_student

        torch.manual_seed(0)
        model, data_cfg = build_student(DistillConfig(student=STUDENT, seed=0), 1024)
        return wrap_encoder(model, EncoderConfig(**STUDENT, seed=0, precision=precision, device="cpu"), data_cfg)
    cfg = EncoderConfig(model=name, precision=precision, device="cpu", seed=0)
    spec = resolve(cfg)
    torch.manual_seed(0)  # speed only: torch's own fast initialisation, not the portable seeded one
    model = headless(build_architecture(spec, name), spec)
    data_cfg = {"input_size": (3, spec.input_size, spec.input_size), "resize": spec.resize,
                "interpolation": spec.interpolation, "mean": spec.mean, "std": spec.std}
    return wrap_encoder(model, cfg, data_cfg, zoo=spec.zoo)


def child(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    tiles = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (args.tiles, 256, 256, 3), dtype=np.uint8))
    encoder = build(args.name, args.precision)
    encoder(tiles[:2])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(tiles), args.batch):
        encoder(tiles[i:i + args.batch])
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"name": args.name, "precision": encoder.precision, "patches_per_s": len(tiles) / seconds,
                      "peak_gb": peak_gb, "dim": encoder.dim, "input": encoder.input_size}))


def run_one(name: str, precision: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--precision", precision, "--tiles", str(args.tiles),
           "--batch", str(args.batch), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default=",".join(FAMILIES))
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        args.name = args.child
        child(args)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from features.precision import resolve_precision

    auto = resolve_precision("auto", "cpu")
    print(f"CPU: {cpu_description()}; {args.threads} threads; {args.tiles} tiles of 256 px per model")
    precisions = ["fp32"] + ([auto] if auto != "fp32" else [])
    student = {p: run_one("student", p, args) for p in precisions}
    print(f"{'model':16s} {'dim':>5s} {'input':>5s} {'prec':>5s} {'patches/s':>10s} {'peak GB':>8s} {'student ×':>10s}")
    for p in precisions:
        s = student[p]
        print(f"{'student (demo)':16s} {s['dim']:5d} {s['input']:5d} {p:>5s} {s['patches_per_s']:10.2f} {s['peak_gb']:8.2f}")
    for name in args.models.split(","):
        for p in precisions:
            r = run_one(name, p, args)
            ratio = student[p]["patches_per_s"] / r["patches_per_s"]
            print(f"{name:16s} {r['dim']:5d} {r['input']:5d} {r['precision']:>5s} {r['patches_per_s']:10.2f} "
                  f"{r['peak_gb']:8.2f} {ratio:10.1f}", flush=True)


if __name__ == "__main__":
    main()
