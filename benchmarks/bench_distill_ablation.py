"""The distillation's ablation on a demo cohort: each variant's held-out cosine / R² and Reuse / Retrain ACC and AUC.

    python benchmarks/bench_distill_ablation.py [--cohort-seed 1] [--variants default mlp ...] [--seeds 0]
        [--workdir /tmp/wsi-bench-ablation]

Writes a demo cohort (24 slides, ``wsi-pipeline demo --seed COHORT_SEED``; seed 1 by default, a cohort
the defaults were not tuned on) and runs it once with the demo's run.yaml and only the teacher row, up to
the teacher's CLAMs. Each variant then runs in a copy of that run directory with the demo's distillation
settings changed as the variant says and the rows teacher, reuse and retrain: distillation, student
features and the student's CLAMs rerun, the teacher's features and CLAMs are reused (their fingerprints do
not change), so every variant is scored on the same teacher folds. ``--seeds`` repeats each variant with
those ``distill.seed`` values. Prints one markdown row per run: distillation seconds (the task's wall time),
held-out cosine and R² to the teacher (the card's best epoch), and ACC / AUC (mean over the 4 folds) of
Teacher, Reuse and Retrain.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

VARIANTS: dict[str, dict] = {
    "default": {},  # the demo's: TransScan, whitening, de-whitening head, balanced draws, tiles read at the input size
    "no_head": {"dewhiten_head": False},  # the pool's average mean / std for every tile
    "no_whiten": {"whiten": False},  # regress the raw teacher feature
    "mlp": {"projector": "mlp"},
    "linear": {"projector": "linear"},
    "uniform_draws": {"balance": "none"},  # no cluster-balanced draws
    "tile_reads": {"read_at_input": False},  # the tiling's tiles (level 0), resized to the student's input
    "budget_x2": {"epochs": 10},  # twice the demo's 5 epochs × 384 tiles
    "budget_half": {"epochs": 3, "tiles_per_epoch": 320},
}


def wsi(*args, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"wsi-pipeline {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return result


def prepare(workdir: Path, cohort_seed: int) -> tuple[Path, dict]:
    """The demo cohort and a teacher-only run of it (tissue → features → teacher CLAMs)."""
    cohort = workdir / "demo"
    if not (cohort / "slides.csv").exists():
        wsi("demo", cohort, "--seed", cohort_seed, cwd=workdir)
    config = yaml.safe_load((cohort / "run.yaml").read_text())
    base = {**config, "mil": {**config["mil"], "strategies": ["teacher"]}, "heatmaps": {"slides": "none"}}
    (workdir / "base.yaml").write_text(yaml.safe_dump(base))
    wsi("run", cohort / "slides.csv", "--config", workdir / "base.yaml", "--out", workdir / "base", cwd=workdir)
    return cohort, config


def run_variant(workdir: Path, cohort: Path, config: dict, name: str, overrides: dict, seed: int | None) -> dict:
    label = name if seed is None else f"{name}.seed{seed}"
    out = workdir / "runs" / label
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(workdir / "base", out)
    distill = {**config.get("distill", {}), **overrides, **({} if seed is None else {"seed": seed})}
    variant = {**config, "distill": distill, "mil": {**config["mil"], "strategies": ["teacher", "reuse", "retrain"]},
               "heatmaps": {"slides": "none"}}
    (workdir / f"{label}.yaml").write_text(yaml.safe_dump(variant))
    wsi("run", cohort / "slides.csv", "--config", workdir / f"{label}.yaml", "--out", out, cwd=workdir)
    card = json.loads((out / "models" / "student" / "student.json").read_text())
    state = json.loads((out / "state" / "distill" / "_cohort.json").read_text())
    with (out / "results" / "summary.csv").open(newline="") as f:
        rows = {r["strategy"]: r for r in csv.DictReader(f)}
    best = card["metrics"]["best"]
    return {"variant": label, "distill_s": state["duration_s"], "precision": card["precision"], "cosine": best["cosine"],
            "r2": best["r2"], **{f"{row}_{m}": float(rows[row][f"{m}_mean"]) for row in ("teacher", "reuse", "retrain")
                                 for m in ("acc", "auc")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort-seed", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, help="distill.seed values to repeat each variant with")
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"],
                        help="the distillation's precision (fp32: what a CPU without native bf16 runs)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsi-bench-ablation"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    cohort, config = prepare(args.workdir, args.cohort_seed)
    config = {**config, "distill": {**config.get("distill", {}), "precision": args.precision}}
    results = []
    for name in args.variants:
        for seed in args.seeds or [None]:
            results.append(run_variant(args.workdir, cohort, config, name, VARIANTS[name], seed))
            print(json.dumps(results[-1]), flush=True)
    print(f"\ndemo cohort seed {args.cohort_seed} (24 slides, 4 folds), distillation at {args.precision}\n")
    print("| variant | distill s | held-out cosine | R² | Teacher ACC / AUC | Reuse ACC / AUC | Retrain ACC / AUC |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['distill_s']:.0f} | {r['cosine']:.3f} | {r['r2']:.3f} | "
              f"{r['teacher_acc']:.3f} / {r['teacher_auc']:.3f} | {r['reuse_acc']:.3f} / {r['reuse_auc']:.3f} | "
              f"{r['retrain_acc']:.3f} / {r['retrain_auc']:.3f} |")


if __name__ == "__main__":
    main()
