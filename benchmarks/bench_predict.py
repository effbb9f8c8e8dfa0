"""``wsi-pipeline predict`` with the teacher's bundle vs the distilled student's, on the same new cohort.

    python benchmarks/bench_predict.py [--run DIR] [--n-slides 12] [--size 16384] [--seed 21]
        [--workdir /tmp/wsi-bench-predict]

Without ``--run`` it trains first: the README demo cohort (24 slides, seed 0) with the demo's run.yaml and
the rows teacher and reuse. It exports both rows as bundles (the Reuse bundle is the student with the
teacher's fold CLAMs), writes a new demo cohort (``--seed``, never trained on) and predicts it with each
bundle three times, into fresh run directories: predictions only (``heatmaps.slides: none``), with the
default heatmaps (teacher: one pass; student: CLAM's overlapping second pass, overlap 0.5), and with the
same smooth heatmaps for both (overlap 0.5). Prints per
run: wall time, the embed stage's patches/s (tiles / task seconds, summed over slides), end-to-end tiles
per wall second, the largest peak RSS of a slide task, and slide AUC; then the student/teacher ratios.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml


def wsi(*args, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"wsi-pipeline {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return result


def train(workdir: Path) -> Path:
    cohort, out = workdir / "train_demo", workdir / "train_run"
    if not (cohort / "slides.csv").exists():
        wsi("demo", cohort, "--seed", 0, cwd=workdir)
    config = yaml.safe_load((cohort / "run.yaml").read_text())
    config["mil"]["strategies"] = ["teacher", "reuse"]
    config["heatmaps"] = {"slides": "none"}
    (workdir / "train.yaml").write_text(yaml.safe_dump(config))
    wsi("run", cohort / "slides.csv", "--config", workdir / "train.yaml", "--out", out, cwd=workdir)
    return out


def measure(out: Path) -> dict:
    """Figures of a finished prediction run, from its task states and tables."""
    def states(stage: str) -> list[dict]:
        return [json.loads(p.read_text()) for p in (out / "state" / stage).glob("*.json")]

    embed = states("embed")
    tiles = sum(s["meta"]["n_tiles"] for s in embed)
    seconds = sum(s["meta"]["seconds"] for s in embed)
    slide_tasks = [s for stage in ("tissue", "tiles", "embed", "predict", "predict_heatmaps") for s in states(stage)]
    metrics = {r["level"]: r for r in csv.DictReader((out / "metrics.csv").open())} if (out / "metrics.csv").exists() else {}
    return {"tiles": tiles, "embed_patches_per_s": tiles / seconds if seconds else 0.0,
            "peak_rss_mb": max(s.get("peak_rss_mb") or 0 for s in slide_tasks),
            "auc": float(metrics["slide"]["auc"]) if "slide" in metrics else float("nan"),
            "heatmap_s": sum(s["duration_s"] for s in states("predict_heatmaps"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a finished training run with the rows teacher and reuse")
    parser.add_argument("--n-slides", type=int, default=12)
    parser.add_argument("--size", type=int, default=16384, help="level-0 width of the new cohort's 40x slides")
    parser.add_argument("--seed", type=int, default=21, help="the new cohort's seed")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsi-bench-predict"))
    args = parser.parse_args()
    work = args.workdir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    run = args.run.absolute() if args.run else train(work)
    bundles = {}
    for row in ("teacher", "reuse"):
        bundles[row] = work / f"bundle_{row}"
        if not (bundles[row] / "bundle.json").exists():
            wsi("export-model", run, "--strategy", row, "--dest", bundles[row], cwd=work)
    cohort = work / f"new_seed{args.seed}_{args.size}"
    if not (cohort / "slides.csv").exists():
        wsi("demo", cohort, "--n-slides", args.n_slides, "--size", args.size, "--seed", args.seed, cwd=work)
    (work / "no_maps.yaml").write_text(yaml.safe_dump({"heatmaps": {"slides": "none"}}))
    (work / "smooth_maps.yaml").write_text(yaml.safe_dump({"heatmaps": {"overlap": 0.5}}))
    modes = {"predictions only": ["--config", work / "no_maps.yaml"], "with default heatmaps": [],
             "heatmaps with overlap 0.5 for both": ["--config", work / "smooth_maps.yaml"]}
    rows = []
    for mode, config in modes.items():
        for row in ("teacher", "reuse"):
            out = work / f"predict_{row}_{list(modes).index(mode)}"
            if out.exists():
                import shutil

                shutil.rmtree(out)
            start = time.perf_counter()
            wsi("predict", cohort / "slides.csv", "--model", bundles[row], "--out", out, *config, cwd=work)
            wall = time.perf_counter() - start
            rows.append({"mode": mode, "bundle": row, "wall_s": wall, **measure(out)})
    print(f"new cohort: {args.n_slides} demo slides, seed {args.seed}, {args.size} px wide at 40x; training run {run}\n")
    print("| mode | bundle | wall s | tiles | embed patches/s | end-to-end tiles/s | heatmap task s | max peak RSS MB per slide task | slide AUC |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['bundle']} | {r['wall_s']:.1f} | {r['tiles']} | {r['embed_patches_per_s']:.1f} | "
              f"{r['tiles'] / r['wall_s']:.1f} | {r['heatmap_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['auc']:.3f} |")
    for mode in modes:
        t, s = (next(r for r in rows if r["mode"] == mode and r["bundle"] == b) for b in ("teacher", "reuse"))
        print(f"\n{mode}: student/teacher embed patches/s {s['embed_patches_per_s'] / t['embed_patches_per_s']:.1f}x, "
              f"wall time teacher/student {t['wall_s'] / s['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
