"""Shared test data: a small demo cohort of real pyramidal slides with ground truth, made once per session."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from pipelines.config import RunConfig
from wsi.demo_cohort import make_demo_cohort
from wsi.tiff_writer import write_pyramid

# demo_000/001/003: 40× Aperio SVS (8192×6144); demo_002: 20× generic TIFF (4096×3072). 001, 003 positive.
N_SLIDES, SIZE = 4, 8192


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """Folder with demo_000..003 and slides.csv (read-only: copy a slide before damaging it)."""
    folder = tmp_path_factory.mktemp("cohort")
    make_demo_cohort(folder, n_slides=N_SLIDES, size=SIZE, seed=7)
    return folder


@pytest.fixture()
def demo_cfg() -> RunConfig:
    """The config `wsi-pipeline demo` writes: biopsy preset, physical area thresholds, 0.5 µm/px tiles."""
    return RunConfig.model_validate({"tissue": {"preset": "bwh_biopsy", "area_reference_mpp": 0.25},
                                     "tiling": {"target_mpp": 0.5, "patch_size": 256}})


def glass_render(level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Empty glass: a slide with no tissue at all."""
    rng = np.random.default_rng(level * 1_000_003 + y0 * 1009 + x0)
    return np.clip(rng.normal(243, 1.5, size=(h, w, 3)), 0, 255).astype(np.uint8)


def write_glass_slide(path: Path, **kwargs) -> Path:
    return write_pyramid(path, 3072, 4096, glass_render, **kwargs)


def corrupt_jpeg_tiles(path: Path, level: int = -1, indices: list[int] | None = None) -> None:
    """Overwrite the JPEG headers of the tiles ``indices`` (default: every tile) of one pyramid level with random bytes."""
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[level].keyframe
        offsets, counts = page.dataoffsets, page.databytecounts
    rng = np.random.default_rng(0)
    with open(path, "r+b") as f:
        for index in range(len(offsets)) if indices is None else indices:
            f.seek(offsets[index] + 2)
            f.write(rng.integers(0, 256, size=min(64, counts[index] - 4), dtype=np.uint8).tobytes())


def tissue_tile_indices(slide_path: Path, n: int, tile: int = 256) -> list[int]:
    """``n`` level-0 TIFF tiles of a demo slide that lie wholly in its tissue (from the truth mask beside it)."""
    from wsi.demo_cohort import load_truth

    tissue, _, meta = load_truth(slide_path)
    ds = meta["downsample"]
    across = -(-meta["width"] // tile)
    found = []
    for row in range(meta["height"] // tile):
        for col in range(meta["width"] // tile):
            window = tissue[int(row * tile / ds):int((row + 1) * tile / ds) + 1, int(col * tile / ds):int((col + 1) * tile / ds) + 1]
            if window.size and window.all():
                found.append(row * across + col)
    step = max(1, len(found) // n)
    return found[::step][:n]


def write_latin1_description(source: Path, path: Path) -> Path:
    """A copy of an Aperio slide whose ImageDescription holds a Latin-1 byte (ä), as some scanners write."""
    shutil.copy(source, path)
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags["ImageDescription"]
        tif.filehandle.seek(tag.valueoffset)
        at = tag.valueoffset + tif.filehandle.read(tag.count).index(b"Library")
    with open(path, "r+b") as f:
        f.seek(at)
        f.write("Libräry".encode("latin-1"))
    return path


# The cohort the teacher-baseline, heatmap and student tests share: 24 demo slides, 12 with a focal tumour
# (two foci, 10 % of the tissue: the case where a student that is only faithful on average fails),
# run through tissue → tiles → teacher features → CLAM (teacher only, 4 folds) → heatmaps by the CLI.
TEACHER_COHORT = {"n_slides": 24, "size": 8192, "seed": 3, "tumour_fraction": 0.1, "foci": 2}
TEACHER_RUN_CONFIG = {
    "tissue": {"preset": "bwh_biopsy", "area_reference_mpp": 0.25},
    "tiling": {"target_mpp": 0.5, "patch_size": 256, "min_tissue_fraction": 0.25},
    "features": {"teacher": {"model": "vit_small", "seed": 0, "pool": "mean"}},
    "mil": {"strategies": ["teacher"], "folds": 4, "val_fraction": 0.17, "max_epochs": 40, "min_epochs": 10,
            "patience": 10},
    "heatmaps": {"slides": "all", "width": 1024, "top_k": 3},
}


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """(slide folder, run directory, the run's completed process)."""
    folder = tmp_path_factory.mktemp("teacher_cohort")
    csv_path = make_demo_cohort(folder, **TEACHER_COHORT)
    (folder / "run.yaml").write_text(yaml.safe_dump(TEACHER_RUN_CONFIG))
    out = tmp_path_factory.mktemp("teacher_run") / "out"
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(csv_path), "--config", str(folder / "run.yaml"),
                             "--out", str(out)], capture_output=True, text=True, timeout=900)
    return folder, out, result


@pytest.fixture(scope="session")
def student_run(teacher_run, tmp_path_factory) -> tuple[Path, Path, Path, subprocess.CompletedProcess]:
    """(slide folder, the teacher run, a copy of it that also distilled the README's student at fp32 — as a CPU
    without bf16 runs it — and added the Reuse row, that run's completed process)."""
    from pipelines.cli import DEMO_CONFIG

    folder, teacher_out, first = teacher_run
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path_factory.mktemp("student_run") / "out"
    shutil.copytree(teacher_out, out)  # the teacher's features and CLAMs are reused, not recomputed
    distill = {**yaml.safe_load(DEMO_CONFIG)["distill"], "precision": "fp32"}
    config = {**TEACHER_RUN_CONFIG, "distill": distill, "mil": {**TEACHER_RUN_CONFIG["mil"], "strategies": ["teacher", "reuse"]},
              "heatmaps": {"slides": "none"}}
    (out.parent / "run.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(folder / "slides.csv"), "--config",
                             str(out.parent / "run.yaml"), "--out", str(out)], capture_output=True, text=True, timeout=900)
    return folder, teacher_out, out, result
