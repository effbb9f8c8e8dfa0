"""Batches on one thread each vs torch's threads inside each operation: speed, and whether the bits follow the cores.

    python benchmarks/bench_batch_threads.py [--models vit_small vit_tiny resnet18 efficientnet_b0 student]
        [--batches 6] [--batch-size 32] [--threads N]

For each model (random weights, fp32, 224 px; ``student`` is the demo's ViT-Ti/16 at 112 px with its TransScan
projector), in one process: ``--batches`` batches encoded one at a time with torch on ``--threads`` threads
(intra-op, as extraction ran before) and the same batches each on one thread, ``--threads`` at once
(:mod:`features.batch_threads`, as it runs now); the median of 3 passes each, their ratio (> 1: batches on
threads are faster), and, on a last batch of 7 tiles, whether each way gives the same bits on 1 and on
``--threads`` threads. MKL's strict mode is on (importing ``features`` sets it), so a difference that remains
in the intra-op way comes from oneDNN's convolutions.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def build(name: str):
    import timm
    import torch

    torch.manual_seed(0)
    if name == "student":
        import yaml

        from distill.config import DistillConfig
        from distill.model import build_student
        from pipelines.demo_config import DEMO_CONFIG

        cfg = DistillConfig.model_validate(yaml.safe_load(DEMO_CONFIG)["distill"])
        return build_student(cfg, 384)[0].eval(), 112
    return timm.create_model(name if name != "vit_small" and name != "vit_tiny" else f"{name}_patch16_224",
                             pretrained=False, num_classes=0).eval(), 224


def intra_op(model, batches, threads: int) -> list:
    import torch

    from features.batch_threads import torch_threads

    with torch_threads(threads), torch.inference_mode():
        return [model(b) for b in batches]


def batch_per_thread(model, batches, threads: int) -> list:
    import torch

    from features.batch_threads import batches_in_threads

    def encode(b):
        with torch.inference_mode():
            return model(b)

    return [out for _, out, _ in batches_in_threads(batches, encode, threads)]


def main() -> None:
    import features  # noqa: F401  (MKL's strict mode, as in a run)
    from features.precision import cpu_description
    from pipelines.engine.cluster import machine_cores

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_small", "vit_tiny", "resnet18", "efficientnet_b0", "student"])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=machine_cores())
    args = parser.parse_args()
    import torch

    print(f"{cpu_description()}; torch {torch.__version__}; fp32; {args.batches} batches of {args.batch_size}; "
          f"{args.threads} threads\n")
    print("| model | one batch at a time, intra-op (s) | a batch per thread (s) | ratio | same bits on 1 and "
          f"{args.threads} threads (7 tiles): intra-op | a batch per thread |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        model, size = build(name)
        rng = np.random.default_rng(0)
        batches = [torch.from_numpy(rng.standard_normal((args.batch_size, 3, size, size), dtype=np.float32))
                   for _ in range(args.batches)]
        intra_op(model, batches[:1], args.threads)  # warm-up
        times = {"intra": [], "batch": []}
        for _ in range(3):  # alternated: this kind of machine's speed drifts between minutes
            for way, run in (("intra", intra_op), ("batch", batch_per_thread)):
                start = time.perf_counter()
                run(model, batches, args.threads)
                times[way].append(time.perf_counter() - start)
        small = [torch.from_numpy(rng.standard_normal((7, 3, size, size), dtype=np.float32))]
        same = {way: torch.equal(run(model, small, 1)[0], run(model, small, args.threads)[0])
                for way, run in (("intra", intra_op), ("batch", batch_per_thread))}
        intra, batch = statistics.median(times["intra"]), statistics.median(times["batch"])
        print(f"| {name} | {intra:.2f} | {batch:.2f} | {intra / batch:.2f}× | {'yes' if same['intra'] else 'no'} | "
              f"{'yes' if same['batch'] else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
