"""Tissue + tiles in a real run against CLAM's own `create_patches_fp.py`, per slide over a cohort.

    python benchmarks/bench_tissue_speed.py --clam-dir /path/to/CLAM [--clam-python /path/to/clam-env/bin/python]
        [--slides 6] [--width 40000] [--workers 2] [--workdir /tmp/wsi-bench-speed]

Writes ``--slides`` Aperio demo slides (``width`` × 3/4·width at 0.25 µm/px, pyramid ``--pyramid``: 1/4/16
by default, masked at 16× as CLAM does; 1/4/16/64 masked at 64×; fixed seeds) once. Then:

- ours: ``wsi-pipeline run slides.csv --until tiles`` on a local cluster of ``--workers`` workers (a
  real run: separate worker processes, state files, QC images, masks, coords), once with the default
  ``slides.verify_tiles: features`` (every tile is checked by the teacher's features read, which
  decodes it anyway: the tiles task reads none, as CLAM's patching) and once with ``tiles`` (the tiles
  task reads every tile once more: decode errors and sharpness); per slide the tissue task's and the
  tiles task's ``duration_s`` from ``state/``;
- CLAM: its script, ``--seg --patch --preset tcga.csv --patch_size 512 --step_size 512`` (the same
  level-0 tiles as our 256-px tiles at 0.5 µm/px), one slide after another in one process as it runs;
  per slide the "segmentation took" + "patching took" times it prints (they leave out opening the slide
  and writing its mask JPEG, which our task times include).

Runs CLAM and ours ``--repeats`` times, alternated, and pools each side's per-slide times. Prints the first
slide (the first task each worker ran: it pays what a cold worker pays; the median over the runs), the
median and worst over the pooled slides, the ratio CLAM / ours (> 1: we are faster), each run's median
(the spread between runs), with this CPU's model.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from features.precision import cpu_description
from wsi.demo_cohort import write_demo_slide

SETTINGS = "tissue:\n  preset: tcga\ntiling:\n  target_mpp: 0.5\n  patch_size: 256\nslides:\n  verify_tiles: {verify}\n"


def ours(slides: list[Path], workdir: Path, workers: int, verify: str) -> tuple[dict[str, float], list[str], float]:
    """Per slide, tissue + tiles task seconds; the slides whose tissue task ran first on a worker; the wall time."""
    out = workdir / f"run_verify_{verify}"
    shutil.rmtree(out, ignore_errors=True)
    csv = workdir / "slides.csv"
    csv.write_text("slide_path\n" + "".join(f"{path}\n" for path in slides))
    config = workdir / f"config_{verify}.yaml"
    config.write_text(SETTINGS.format(verify=verify))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(csv), "--out", str(out), "--config", str(config),
                    "--until", "tiles", "--workers", str(workers)], check=True, capture_output=True)
    wall = time.perf_counter() - start
    seconds, started = {}, {}
    for path in slides:
        tissue = json.loads((out / "state" / "tissue" / f"{path.stem}.json").read_text())
        tiles = json.loads((out / "state" / "tiles" / f"{path.stem}.json").read_text())
        seconds[path.stem] = tissue["duration_s"] + tiles["duration_s"]
        started[path.stem] = (tissue.get("worker"), tissue["started"])
    first = {}
    for slide, (worker, _when) in sorted(started.items(), key=lambda item: item[1][1]):
        first.setdefault(worker, slide)
    return seconds, list(first.values()), wall


def clam(slides: list[Path], workdir: Path, clam_dir: Path, python: str) -> tuple[dict[str, float], float]:
    """Per slide, CLAM's printed segmentation + patching seconds; the script's wall time."""
    source, save = workdir / "clam_source", workdir / "clam_out"
    shutil.rmtree(source, ignore_errors=True)
    shutil.rmtree(save, ignore_errors=True)
    source.mkdir()
    for path in slides:
        (source / path.name).symlink_to(path)
    start = time.perf_counter()
    done = subprocess.run([python, "create_patches_fp.py", "--source", str(source), "--save_dir", str(save), "--seg",
                           "--patch", "--preset", "tcga.csv", "--patch_size", "512", "--step_size", "512"],
                          cwd=clam_dir, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    names = re.findall(r"processing (\S+)", done.stdout)
    seg = [float(s) for s in re.findall(r"segmentation took ([\d.e-]+) seconds", done.stdout)]
    patch = [float(s) for s in re.findall(r"patching took ([\d.e-]+) seconds", done.stdout)]
    if not (len(names) == len(seg) == len(patch) == len(slides)):
        raise RuntimeError(f"CLAM's output does not list every slide's times:\n{done.stdout[-2000:]}")
    return {Path(name).stem: s + p for name, s, p in zip(names, seg, patch)}, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clam-dir", type=Path, required=True, help="a checkout of github.com/mahmoodlab/CLAM")
    parser.add_argument("--clam-python", default=sys.executable, help="the Python of CLAM's environment")
    parser.add_argument("--slides", type=int, default=6)
    parser.add_argument("--width", type=int, default=40_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pyramid", default="1,4,16", help="the slides' level downsamples: 1,4,16 (masked at 16×, "
                                                             "2,500 × 1,875 px at 40,000 wide) or 1,4,16,64 (at 64×)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsi-bench-speed"))
    parser.add_argument("--repeats", type=int, default=3, help="runs of CLAM and of ours, alternated (this kind of "
                                                               "machine's speed drifts by ±20 %% between minutes)")
    parser.add_argument("--modes", default="features,tiles", help="slides.verify_tiles values to run ours with")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    pyramid = tuple(int(d) for d in args.pyramid.split(","))
    slides = []
    for i in range(args.slides):
        path = args.workdir / f"slide_{i}{'' if pyramid == (1, 4, 16) else '_' + '-'.join(map(str, pyramid))}.svs"
        if not path.exists():
            write_demo_slide(path, height=args.width * 3 // 4, width=args.width, positive=i % 2 == 1, seed=700 + i,
                             downsamples=pyramid)
        slides.append(path)
    modes = args.modes.split(",")
    clam_runs, our_runs = [], {mode: [] for mode in modes}
    for _ in range(args.repeats):  # alternated, so a slow spell of the machine falls on both
        clam_runs.append(clam(slides, args.workdir, args.clam_dir, args.clam_python))
        for mode in modes:
            our_runs[mode].append(ours(slides, args.workdir, args.workers, mode))
    print(f"{cpu_description()}; {args.slides} slides {args.width}×{args.width * 3 // 4} at 0.25 µm/px, pyramid {args.pyramid}, "
          f"CLAM preset tcga, 512-px level-0 tiles; ours on {args.workers} workers; {args.repeats} runs of each, "
          f"alternated; seconds per slide, pooled over the runs (first slide: the median run's)\n")
    print("| tiles read (`slides.verify_tiles`) | first slide: ours / CLAM | ratio | median: ours / CLAM | ratio "
          "| worst slide: ours / CLAM | ratio | wall: ours / CLAM | median of each run: ours; CLAM |")
    print("|---|---|---|---|---|---|---|---|---|")
    clam_first = statistics.median(times[slides[0].stem] for times, _ in clam_runs)
    clam_all = [t for times, _ in clam_runs for t in times.values()]
    clam_median, clam_worst = statistics.median(clam_all), max(clam_all)
    clam_wall = statistics.median(wall for _, wall in clam_runs)
    clam_each = ", ".join(f"{statistics.median(times.values()):.3f}" for times, _ in clam_runs)
    for mode in modes:
        runs = our_runs[mode]
        first = statistics.median(max(seconds[s] for s in firsts) for seconds, firsts, _ in runs)  # the slower worker's
        pooled = [t for seconds, _, _ in runs for t in seconds.values()]
        median, worst = statistics.median(pooled), max(pooled)
        wall = statistics.median(w for _, _, w in runs)
        each = ", ".join(f"{statistics.median(seconds.values()):.3f}" for seconds, _, _ in runs)
        what = "every tile (`tiles`)" if mode == "tiles" else "none (`features`, the default; as CLAM)"
        print(f"| {what} | {first:.3f} / {clam_first:.3f} | "
              f"**{clam_first / first:.2f}×** | {median:.3f} / {clam_median:.3f} | **{clam_median / median:.2f}×** | "
              f"{worst:.3f} / {clam_worst:.3f} | {clam_worst / worst:.2f}× | {wall:.1f} / {clam_wall:.1f} | "
              f"{each}; {clam_each} |")

if __name__ == "__main__":
    main()
