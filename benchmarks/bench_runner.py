"""The runner at cohort scale: Dask tasks vs the same stage functions in a plain loop, planning, a no-op rerun,
``status``, and the memory of the scheduler's process.

    python benchmarks/bench_runner.py [--slides 10000] [--loop-slides 200] [--workers 2]
        [--workdir /tmp/wsi-bench-runner]

One small demo slide listed ``--slides`` times under distinct ids; stages tissue, tiles and qc. Prints:
  * baseline: tissue + tiles in a plain loop in this process (no state, no Dask), over ``--loop-slides``
    of them, per task;
  * planning all tasks before the run (nothing done yet);
  * the full run through ``run_cohort`` on a local cluster (startup separately), the per-task overhead
    against the loop, the speed-up from the workers, and the peak RSS of this process, which holds the
    client and the local cluster's scheduler;
  * a no-op rerun over all finished slides (every task up to date: no cluster is started);
  * ``wsi-pipeline status OUT --json`` as a user runs it (a fresh process each): the first call derives the
    report from every state file and keeps it, the next ones answer from it; then the table.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from features.precision import cpu_description
from pipelines.config import RunConfig
from pipelines.engine.plan import build_plan
from pipelines.engine.run_dir import RunPaths
from pipelines.engine.runner import run_cohort
from pipelines.manifest import read_manifest
from pipelines.stages.table import STAGES
from pipelines.stages.tiles import tiles_stage
from pipelines.stages.tissue import tissue_stage
from wsi.demo_cohort import write_demo_slide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=10_000)
    parser.add_argument("--loop-slides", type=int, default=200, help="slides of the plain-loop baseline")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsi-bench-runner"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    slide = args.workdir / "slide.svs"
    write_demo_slide(slide, height=1536, width=2048, positive=True, seed=3)
    csv = args.workdir / "slides.csv"
    csv.write_text("slide_path,slide_id\n" + "".join(f"slide.svs,s{i:05d}\n" for i in range(args.slides)))
    cfg = RunConfig.model_validate({"tissue": {"preset": "bwh_biopsy", "area_reference_mpp": 0.25},
                                    "runner": {"n_workers": args.workers}})
    entries = read_manifest(csv)
    n_tasks = 2 * len(entries) + 1

    loop_paths = RunPaths(args.workdir / "loop")
    sample = entries[:args.loop_slides]
    start = time.perf_counter()
    for entry in sample:
        tissue_stage(entry, cfg, loop_paths)
        tiles_stage(entry, cfg, loop_paths)
    per_task_loop = (time.perf_counter() - start) / (2 * len(sample))

    start = time.perf_counter()
    build_plan(STAGES, entries, cfg, RunPaths((args.workdir / "run").absolute()), until="qc")
    t_plan = time.perf_counter() - start

    marks: dict[str, float] = {}
    peak, stop = [0], threading.Event()
    me = psutil.Process()

    def sample_rss() -> None:
        while not stop.wait(0.2):
            peak[0] = max(peak[0], me.memory_info().rss)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    start = time.perf_counter()
    report = run_cohort(STAGES, entries, args.workdir / "run", cfg, until="qc",
                        on_start=lambda link: marks.setdefault("cluster", time.perf_counter()))
    t_run = time.perf_counter() - start
    stop.set()
    sampler.join()
    assert report.complete, [t.reason for t in report.failed]
    t_startup = marks["cluster"] - start
    t_tasks = t_run - t_startup

    start = time.perf_counter()
    rerun = run_cohort(STAGES, entries, args.workdir / "run", cfg, until="qc")
    t_noop = time.perf_counter() - start
    assert all(t.status == "up-to-date" for t in rerun.tasks.values())
    (args.workdir / "run" / "state" / "_status.json").unlink(missing_ok=True)  # the first status derives it all
    status = {}
    for name, flag in (("derived", "--json"), ("kept", "--json"), ("table", "")):
        command = [sys.executable, "-m", "pipelines.cli", "status", str(args.workdir / "run"), *([flag] if flag else [])]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        status[name] = time.perf_counter() - start
        assert done.returncode in (0, 1) and done.stdout, done.stderr  # 1: stages after qc not run

    per_task_dask = t_tasks * args.workers / n_tasks
    print(f"{psutil.cpu_count()} cores ({cpu_description()}); {len(entries)} slides, {n_tasks} tasks (tissue + tiles per "
          f"slide, 1 cohort qc), {args.workers} workers")
    print("| measure | value |\n|---|---|")
    print(f"| stage time per task, plain loop ({len(sample)} slides) | {per_task_loop * 1e3:.1f} ms |")
    print(f"| plan {n_tasks} tasks (nothing done) | {t_plan:.2f} s |")
    print(f"| runner: cluster startup | {t_startup:.2f} s |")
    print(f"| runner: tasks after startup | {t_tasks:.1f} s |")
    print(f"| worker-time per task via Dask | {per_task_dask * 1e3:.1f} ms ({(per_task_dask - per_task_loop) * 1e3:+.1f} ms "
          f"over the stage's own) |")
    print(f"| peak RSS of the client + scheduler process | {peak[0] / 2**20:.0f} MiB |")
    print(f"| no-op rerun, all up to date | {t_noop:.2f} s ({t_noop / n_tasks * 1e6:.0f} µs per task) |")
    print(f"| `wsi-pipeline status OUT --json`, derived from every state (first call) | {status['derived']:.2f} s |")
    print(f"| `wsi-pipeline status OUT --json`, from its kept report | {status['kept']:.2f} s |")
    print(f"| `wsi-pipeline status OUT` (table), from its kept report | {status['table']:.2f} s |")


if __name__ == "__main__":
    main()
