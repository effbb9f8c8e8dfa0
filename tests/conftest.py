"""Shared test data: a small demo cohort of real pyramidal slides with ground truth, made once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

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


def corrupt_jpeg_tiles(path: Path, level: int = -1) -> None:
    """Overwrite the JPEG headers of every tile of one pyramid level with random bytes."""
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[level].keyframe
        offsets, counts = page.dataoffsets, page.databytecounts
    rng = np.random.default_rng(0)
    with open(path, "r+b") as f:
        for offset, count in zip(offsets, counts):
            f.seek(offset + 2)
            f.write(rng.integers(0, 256, size=min(64, count - 4), dtype=np.uint8).tobytes())
