"""A MIL fold task on feature-only cohorts of growing size: its peak memory must not grow with the cohort.

    python benchmarks/bench_mil_scale.py [--sizes 100 1000] [--tiles 2000 10000] [--dim 768] [--epochs 2]
        [--cache-mb 512] [--workdir /tmp/wsi-bench-mil]

Per size: a synthetic cohort (``features.synthetic``: CLAM-layout h5, N tiles uniform in ``--tiles``,
``--dim`` features, half the slides with a planted signal) is written and imported once
(``import-features``); then one ``mil`` fold task (teacher strategy, fold 0 of 10) runs in a fresh
process for ``--epochs`` epochs, as the runner would run it. Prints the task's peak RSS, seconds per
epoch, bag reads and cache hits, and what holding every bag in memory (the former single mil task)
would take.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def config(args):
    from pipelines.config import RunConfig

    return RunConfig.model_validate({"features": {"teacher": {"model": "uni"}},
                                     "mil": {"strategies": ["teacher"], "folds": 10, "max_epochs": args.epochs,
                                             "min_epochs": 0, "bag_cache_mb": args.cache_mb}})


def child(args) -> None:
    """One fold task in this process; prints a JSON line."""
    import torch

    from pipelines.engine.run_dir import RunPaths
    from pipelines.manifest import FoldPayload, read_manifest
    from pipelines.stages.mil import fold_file, mil_fold_stage

    torch.set_num_threads(1)  # a fold task on a one-core worker, as the local cluster runs it
    run = args.workdir / f"run_{args.size}"
    entries = read_manifest(args.workdir / f"cohort_{args.size}" / "slides.csv")
    start = time.perf_counter()
    meta = mil_fold_stage(FoldPayload("teacher.fold0", entries), config(args), RunPaths(run))
    seconds = time.perf_counter() - start
    history = json.loads(fold_file(RunPaths(run), "teacher.fold0").read_text())["history"]
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "task_s": seconds,
                      "epoch_s": [h["seconds"] for h in history], "bag_reads": meta["bag_reads"],
                      "cache_hits": meta["bag_cache_hits"]}))


def prepare(args, size: int) -> float:
    """Write and import the cohort once; returns the GB that all its bags take at float16."""
    from features.store import open_store
    from features.synthetic import write_feature_cohort
    from pipelines.deploy.interop import import_dir
    from pipelines.manifest import read_manifest

    cohort, run = args.workdir / f"cohort_{size}", args.workdir / f"run_{size}"
    if not (cohort / "slides.csv").exists():
        print(f"writing and importing {size} slides …", file=sys.stderr, flush=True)
        write_feature_cohort(cohort, size, dim=args.dim, tiles=tuple(args.tiles), seed=size, dtype="float16")
        import_dir(cohort, run, "uni")
        for h5 in (cohort / "h5_files").glob("*.h5"):
            h5.unlink()  # imported: the Zarr stores are what the task reads
    entries = read_manifest(cohort / "slides.csv")
    return sum(len(open_store(run, "uni", e.slide_id)) for e in entries) * args.dim * 2 / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 1000])
    parser.add_argument("--tiles", nargs=2, type=int, default=[2000, 10000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cache-mb", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsi-bench-mil"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.size = args.child
        child(args)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        all_bags_gb = prepare(args, size)
        cmd = [sys.executable, __file__, "--child", str(size), "--tiles", *map(str, args.tiles), "--dim", str(args.dim),
               "--epochs", str(args.epochs), "--cache-mb", str(args.cache_mb), "--workdir", str(args.workdir)]
        result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        rows.append((size, all_bags_gb, result))
    print(f"\nteacher strategy, fold 0 of 10, {args.epochs} epoch(s), {args.tiles[0]}–{args.tiles[1]} tiles × {args.dim}-d "
          f"per slide, mil.bag_cache_mb {args.cache_mb}, one torch thread\n")
    print("| slides | all bags at float16 (GB) | fold task peak RSS (MB) | vs the first size | s / epoch | bag reads | cache hits |")
    print("|---|---|---|---|---|---|---|")
    base = rows[0][2]["peak_rss_mb"]
    for size, gb, r in rows:
        epochs = ", ".join(f"{s:.1f}" for s in r["epoch_s"])
        print(f"| {size} | {gb:.1f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base:.2f}× | {epochs} | {r['bag_reads']} "
              f"| {r['cache_hits']} |")


if __name__ == "__main__":
    main()
