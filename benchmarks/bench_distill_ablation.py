"""The distillation's ablation on demo cohorts, focal lesions included: each variant's fidelity where it matters
(R² on the truth's tumour tiles, worst label-free cluster) and every results row's ACC / AUC.

    python benchmarks/bench_distill_ablation.py [--cohort-seed 1] [--tumour-fraction 0.05 --foci 2]
        [--n-slides 24] [--variants default uniform_draws ...] [--seeds 0 1 2] [--rows teacher reuse retrain]
        [--workdir /tmp/wsi-bench-ablation]

Writes a demo cohort (``wsi-pipeline demo --seed COHORT_SEED``, focal with ``--tumour-fraction``) and runs
it once with the demo's run.yaml and only the teacher row, up to the teacher's CLAMs. Each variant then
runs in a copy of that run directory with the demo's distillation settings changed as the variant says
and the ``--rows`` asked for: distillation, student features and the student's CLAMs rerun, the teacher's
features and CLAMs are reused (their fingerprints do not change), so every variant is scored on the same
teacher folds. ``--seeds`` repeats each variant with those ``distill.seed`` values.

Fidelity from the truth (no label reaches the distillation): every slide's student features against its
teacher features, R² and cosine on the tiles whose centre lies in the truth's tumour mask and on the
others (R² around each set's own mean). Prints one JSON line per run, then a markdown table: distillation
seconds (the task's wall time) and epochs, the card's worst-cluster R² and verdict, the truth's tumour-tile
R², the R² on the teacher CLAMs' top-attended tiles (tumour slides' mean / worst slide), and ACC / AUC (mean
over the folds) of every row.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

VARIANTS: dict[str, dict] = {
    "default": {},  # the demo's run.yaml as written by `wsi-pipeline demo`
    "old_budget": {"epochs": 5, "lr": 0.0005},  # the demo's budget before: 5 epochs × 384 tiles at lr 5e-4
    # the distillation before the rare-tile work: the old demo budget in steps of 32, augmented inputs, no hard-example
    # draws, best epoch by the average cosine, every draw read from the slide, End2end's k tiles at random, LoRA's
    # head at the adapters' rate
    "legacy": {"hard_mining": 0.0, "select": "cosine", "tile_cache_mb": 0, "epochs": 5, "lr": 0.0005, "batch_size": 32,
               "augment": True,
               "mil": {"end2end_attended": 0.0, "finetune_options": {"lora": {"head_lr_scale": 1.0}}}},
    "no_hard_mining": {"hard_mining": 0.0},  # cluster-balanced draws only
    "augment": {"augment": True},  # flips, rot90 and jitter on the student's input (the default before)
    "batch_32": {"batch_size": 32},  # the demo's steps before: half as many steps for the same tiles
    "lr_5e-4": {"lr": 0.0005},  # the demo's learning rate before
    "select_cosine": {"select": "cosine"},  # best epoch by the average cosine
    "no_cache": {"tile_cache_mb": 0},  # every draw read from the slide
    "no_head": {"dewhiten_head": False},  # the pool's average mean / std for every tile
    "no_whiten": {"whiten": False},  # regress the raw teacher feature
    "mlp": {"projector": "mlp"},
    "linear": {"projector": "linear"},
    "uniform_draws": {"balance": "none", "hard_mining": 0.0},  # neither balanced nor hard-example draws
    "tile_reads": {"read_at_input": False},  # the tiling's tiles (level 0), resized to the student's input
    "e2e_random_tiles": {"mil": {"end2end_attended": 0.0}},  # End2end's k tiles all at random (before)
    "lora_head_fast": {"mil": {"finetune_options": {"lora": {"head_lr_scale": 1.0}}}},  # the head at the adapters' rate
    "budget_x2": {"epochs_x": 2},  # twice the demo's epochs
    "budget_x4": {"epochs_x": 4},
    "budget_half": {"epochs_x": 0.5},
}
ROWS = {"teacher": "teacher", "reuse": "reuse", "retrain": "retrain", "end2end": "end2end", "lora": "end2end:lora"}


def wsi(*args, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)], check=False, cwd=cwd,
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"wsi-pipeline {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return result


def prepare(workdir: Path, args) -> tuple[Path, dict]:
    """The demo cohort and a teacher-only run of it (tissue → features → teacher CLAMs)."""
    cohort = workdir / "demo"
    if not (cohort / "slides.csv").exists():
        focal = [] if args.tumour_fraction is None else ["--tumour-fraction", args.tumour_fraction, "--foci", args.foci]
        wsi("demo", cohort, "--seed", args.cohort_seed, "--n-slides", args.n_slides, *focal, cwd=workdir)
    config = yaml.safe_load((cohort / "run.yaml").read_text())
    config["distill"] = {**config.get("distill", {}), "precision": args.precision}
    base = {**config, "mil": {**config["mil"], "strategies": ["teacher"]}, "heatmaps": {"slides": "none"}}
    (workdir / "base.yaml").write_text(yaml.safe_dump(base))
    wsi("run", cohort / "slides.csv", "--config", workdir / "base.yaml", "--out", workdir / "base", cwd=workdir)
    return cohort, config


def truth_fidelity(out: Path, cohort: Path, teacher: str, student: str) -> dict:
    """R² and cosine of the student's features to the teacher's on the truth's tumour tiles and on the rest."""
    from distill.fidelity import subset_fidelity
    from features.store import open_store
    from wsi.demo_cohort import tumour_tiles

    preds, targets, tumour = [], [], []
    for row in csv.DictReader((cohort / "slides.csv").open()):
        sid = row["slide_id"]
        t, coords = open_store(out, teacher, sid).load(np.float32)
        p, _ = open_store(out, student, sid).load(np.float32)
        size = json.loads((out / "tiles" / f"{sid}.json").read_text())["level0_size"]
        preds.append(p), targets.append(t), tumour.append(tumour_tiles(cohort / row["slide_path"], coords, size))
    p, t, rare = np.concatenate(preds), np.concatenate(targets), np.concatenate(tumour)
    return {"tumour": subset_fidelity(p, t, rare), "other": subset_fidelity(p, t, ~rare), "tumour_tile_share": float(rare.mean())}


def run_variant(workdir: Path, cohort: Path, config: dict, name: str, overrides: dict, seed: int | None, rows: list[str]) -> dict:
    label = name if seed is None else f"{name}.seed{seed}"
    out = workdir / "runs" / label
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(workdir / "base", out)
    overrides = dict(overrides)
    mil_overrides = overrides.pop("mil", {})
    distill = {**config.get("distill", {}), **overrides, **({} if seed is None else {"seed": seed})}
    if "epochs_x" in distill:
        distill["epochs"] = max(1, round(distill.get("epochs", 20) * distill.pop("epochs_x")))
    strategies = sorted({ROWS[r].split(":")[0] for r in rows} | {"teacher"})
    mil = {**config["mil"], "strategies": strategies, **mil_overrides}
    if "lora" in rows:
        mil["finetune"] = ["full", "lora"]
    variant = {**config, "distill": distill, "mil": mil, "heatmaps": {"slides": "none"}}
    (workdir / f"{label}.yaml").write_text(yaml.safe_dump(variant))
    wsi("run", cohort / "slides.csv", "--config", workdir / f"{label}.yaml", "--out", out, cwd=workdir)
    card = json.loads((out / "models" / "student" / "student.json").read_text())
    state = json.loads((out / "state" / "distill" / "_cohort.json").read_text())
    with (out / "results" / "summary.csv").open(newline="") as f:
        summary = {r["strategy"]: r for r in csv.DictReader(f)}
    best = card["metrics"]["best"]
    teacher = variant["features"]["teacher"]
    teacher_label = f"{teacher['model']}-random-seed{teacher['seed']}" if not teacher.get("pretrained") else teacher["model"]
    truth = truth_fidelity(out, cohort, teacher_label, f"student_{distill['student']['model']}")
    result = {"variant": label, "distill_s": state["duration_s"], "epochs": card["metrics"]["epochs_run"],
              "precision": card["precision"], "cosine": best["cosine"], "r2": best["r2"],
              "worst_cluster_r2": best.get("worst_cluster_r2"), "faithful": card["fidelity"]["verdict"]["faithful"],
              "tumour_r2": truth["tumour"].get("r2"), "tumour_cosine": truth["tumour"].get("cosine"),
              "other_r2": truth["other"].get("r2"), "tumour_tile_share": round(truth["tumour_tile_share"], 4)}
    attended_file = out / "results" / "attended_fidelity.json"
    if attended_file.exists():  # the teacher CLAMs' top-attended tiles: the tumour slides' mean, the worst slide
        attended = json.loads(attended_file.read_text())
        result.update(attended_tumour_r2=attended["by_class"].get("tumor", {}).get("mean_r2"),
                      attended_worst_r2=attended["worst_r2"])
    for row in rows:
        match = summary.get(ROWS[row])
        result[f"{row}_acc"] = float(match["acc_mean"]) if match else None
        result[f"{row}_auc"] = float(match["auc_mean"]) if match else None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort-seed", type=int, default=1)
    parser.add_argument("--n-slides", type=int, default=24)
    parser.add_argument("--tumour-fraction", type=float, help="focal lesions: the tumour's share of a positive slide's tissue")
    parser.add_argument("--foci", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, help="distill.seed values to repeat each variant with")
    parser.add_argument("--rows", nargs="+", default=["teacher", "reuse", "retrain"], choices=list(ROWS))
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"],
                        help="the distillation's precision (fp32: what a CPU without native bf16 runs)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsi-bench-ablation"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    cohort, config = prepare(args.workdir, args)
    results = []
    for name in args.variants:
        for seed in args.seeds or [None]:
            results.append(run_variant(args.workdir, cohort, config, name, VARIANTS[name], seed, args.rows))
            print(json.dumps(results[-1]), flush=True)
    focal = "large tumours" if args.tumour_fraction is None else f"tumour {args.tumour_fraction:.0%} of tissue, {args.foci} foci"
    print(f"\ndemo cohort seed {args.cohort_seed} ({args.n_slides} slides, {focal}), distillation at {args.precision}\n")
    head = " | ".join(f"{r} ACC / AUC" for r in args.rows)
    print(f"| variant | distill s | epochs | worst cluster R² | faithful | tumour-tile R² | other R² | attended R² tumour "
          f"/ worst slide | {head} |")
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(args.rows))
    def fmt(v):
        return "–" if v is None else f"{v:.3f}"
    for r in results:
        cells = " | ".join(f"{fmt(r[f'{row}_acc'])} / {fmt(r[f'{row}_auc'])}" for row in args.rows)
        print(f"| {r['variant']} | {r['distill_s']:.0f} | {r['epochs']} | {fmt(r['worst_cluster_r2'])} | {r['faithful']} | "
              f"{fmt(r['tumour_r2'])} | {fmt(r['other_r2'])} | {fmt(r.get('attended_tumour_r2'))} / "
              f"{fmt(r.get('attended_worst_r2'))} | {cells} |")


if __name__ == "__main__":
    main()
