"""One run, one machine: the tissue stage vs CLAM and the read floor, then extraction vs the model alone in
fp32 and bf16 (``precision: auto`` is one of the two: the run says which), and bf16 vs fp32 on this CPU.

    python benchmarks/bench_performance.py [--models vit_small resnet50_trunc] [--max-tiles 600]

Runs ``bench_tissue_tiling.py``, ``bench_reads.py`` and ``bench_features.py`` one after the other (nothing else should
run meanwhile: figures from a loaded or a different CPU are not comparable) and prints the CPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from features.precision import cpu_description

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_small", "resnet50_trunc"])
    parser.add_argument("--max-tiles", type=int, default=600)
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}\n\n## Tissue + tiles\n", flush=True)
    subprocess.run([sys.executable, str(HERE / "bench_tissue_tiling.py")], check=True)
    print("\n## Tile reads\n", flush=True)
    subprocess.run([sys.executable, str(HERE / "bench_reads.py")], check=True)
    print("\n## Extraction vs the model alone\n", flush=True)
    subprocess.run([sys.executable, str(HERE / "bench_features.py"), "--models", *args.models, "--precisions", "fp32",
                    "bf16", "--large", "32768", "--max-tiles", str(args.max_tiles)], check=True)


if __name__ == "__main__":
    main()
