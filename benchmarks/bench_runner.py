"""The runner's overhead: Dask tasks vs the same stage functions in a plain loop, and a no-op rerun.

    python benchmarks/bench_runner.py [--slides 1000] [--workers 2] [--workdir /tmp/wsi-bench-runner]

One small demo slide listed ``--slides`` times under distinct ids; stages tissue, tiles and qc. Prints:
  * baseline: tissue + tiles for every slide in a plain loop in this process (no state, no Dask);
  * the full run through ``run_cohort`` on a local cluster (startup separately), the per-task
    overhead against the loop, and the speed-up from the workers;
  * a no-op rerun over all finished slides (every task up to date: no cluster is started).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from pipelines.artifacts import RunPaths
from pipelines.config import RunConfig
from pipelines.manifest import read_manifest
from pipelines.runner import run_cohort
from pipelines.stages import tiles_stage, tissue_stage
from wsi.demo_cohort import write_demo_slide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=1000)
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
    start = time.perf_counter()
    for entry in entries:
        tissue_stage(entry, cfg, loop_paths)
        tiles_stage(entry, cfg, loop_paths)
    t_loop = time.perf_counter() - start

    marks: dict[str, float] = {}
    start = time.perf_counter()
    report = run_cohort(entries, args.workdir / "run", cfg, until="qc",
                        on_start=lambda link: marks.setdefault("cluster", time.perf_counter()))
    t_run = time.perf_counter() - start
    assert report.complete, [t.reason for t in report.failed]
    t_startup = marks["cluster"] - start
    t_tasks = t_run - t_startup

    start = time.perf_counter()
    rerun = run_cohort(entries, args.workdir / "run", cfg, until="qc")
    t_noop = time.perf_counter() - start
    assert all(t.status == "up-to-date" for t in rerun.tasks.values())

    per_task_loop = t_loop / (2 * len(entries))
    per_task_dask = t_tasks * args.workers / n_tasks
    print(f"{len(entries)} slides, {n_tasks} tasks (tissue + tiles per slide, 1 cohort qc), {args.workers} workers")
    print(f"{'measure':<48} {'seconds':>9}")
    print(f"{'baseline: plain loop, 1 process':<48} {t_loop:>9.2f}")
    print(f"{'runner: cluster startup':<48} {t_startup:>9.2f}")
    print(f"{'runner: tasks (after startup)':<48} {t_tasks:>9.2f}")
    print(f"{'runner: total':<48} {t_run:>9.2f}")
    print(f"{'no-op rerun, all up to date':<48} {t_noop:>9.2f}")
    print(f"stage time per task (loop): {per_task_loop * 1e3:.1f} ms; worker-time per task via Dask: "
          f"{per_task_dask * 1e3:.1f} ms → overhead {(per_task_dask - per_task_loop) * 1e3:+.1f} ms/task "
          f"({per_task_dask / per_task_loop:.2f}× the stage's own time)")
    print(f"speed-up of the run over the loop: {t_loop / t_run:.2f}× (tasks only: {t_loop / t_tasks:.2f}×)")
    print(f"no-op rerun: {t_noop / n_tasks * 1e6:.0f} µs per task ({t_noop / t_loop * 100:.1f} % of the loop's time)")


if __name__ == "__main__":
    main()
