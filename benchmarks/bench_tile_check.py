"""What checking every tile costs, by where it is done (``slides.verify_tiles``), in a real run.

    python benchmarks/bench_tile_check.py [--slides 2] [--width 40000] [--teacher vit_small] [--workdir /tmp/wsi-bench-check]

Writes ``--slides`` Aperio demo slides (``width`` × 3/4·width at 0.25 µm/px, fixed seeds) once, then runs
``wsi-pipeline run --until features`` on them three times, one run directory each, with the same tiling and
a random-weight ``--teacher`` (seed 0): ``off`` (no check), ``features`` (the default: the features read
checks each tile as it decodes it) and ``tiles`` (the tiles task reads every tile once more first). Prints,
per mode, the tiles and features tasks' ``duration_s`` summed over the slides (from ``state/``), their total,
and the extra over ``off``; and that the three runs stored the same tiles (none is corrupt here).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from features.precision import cpu_description
from wsi.demo_cohort import write_demo_slide

SETTINGS = ("tissue:\n  preset: tcga\ntiling:\n  target_mpp: 0.5\n  patch_size: 256\nslides:\n  verify_tiles: {mode}\n"
            "features:\n  teacher:\n    model: {teacher}\n    seed: 0\n")


def run(slides: list[Path], workdir: Path, mode: str, teacher: str) -> tuple[float, float, float, dict[str, np.ndarray]]:
    """(tiles seconds, features seconds, wall seconds, the stored coords per slide) of one run."""
    import shutil

    from features.store import open_store
    from pipelines.config import load_config

    out = workdir / f"run_{mode}"
    shutil.rmtree(out, ignore_errors=True)
    csv = workdir / "slides.csv"
    csv.write_text("slide_path\n" + "".join(f"{path}\n" for path in slides))
    config = workdir / f"config_{mode}.yaml"
    config.write_text(SETTINGS.format(mode=mode, teacher=teacher))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(csv), "--out", str(out), "--config", str(config),
                    "--until", "features"], check=True, capture_output=True)
    wall = time.perf_counter() - start
    label = load_config(config).features.teacher.label
    tiles = features = 0.0
    stored = {}
    for path in slides:
        tiles += json.loads((out / "state" / "tiles" / f"{path.stem}.json").read_text())["duration_s"]
        features += json.loads((out / "state" / "features" / f"{path.stem}.json").read_text())["duration_s"]
        stored[path.stem] = open_store(out, label, path.stem).coords
    return tiles, features, wall, stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=2)
    parser.add_argument("--width", type=int, default=40_000)
    parser.add_argument("--teacher", default="vit_small")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsi-bench-check"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    slides = []
    for i in range(args.slides):
        path = args.workdir / f"slide_{i}.svs"
        if not path.exists():
            write_demo_slide(path, height=args.width * 3 // 4, width=args.width, positive=i % 2 == 1, seed=800 + i)
        slides.append(path)
    results = {mode: run(slides, args.workdir, mode, args.teacher) for mode in ("off", "features", "tiles")}
    n_tiles = sum(len(c) for c in results["off"][3].values())
    print(f"{cpu_description()}; {args.slides} slides {args.width}×{args.width * 3 // 4}, {n_tiles} tiles of 256 px at "
          f"0.5 µm/px; teacher {args.teacher} (random weights); seconds summed over the slides\n")
    print("| `slides.verify_tiles` | tiles tasks | features tasks | total | over `off` | wall |")
    print("|---|---|---|---|---|---|")
    base = results["off"][0] + results["off"][1]
    for mode, (tiles, features, wall, _) in results.items():
        total = tiles + features
        print(f"| {mode} | {tiles:.2f} | {features:.2f} | {total:.2f} | {total - base:+.2f} s ({total / base - 1:+.1%}) "
              f"| {wall:.1f} |")
    same = all(np.array_equal(results[m][3][s], results["off"][3][s]) for m in results for s in results["off"][3])
    print(f"\nthe three runs stored the same tiles: {same}")


if __name__ == "__main__":
    main()
