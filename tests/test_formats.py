"""The format matrix: one demo image written as every vendor format this machine can produce, each run through
tissue → tiles → features, with its mpp, its pixels at two levels and its features checked against the plain SVS."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.config import RunConfig
from pipelines.engine.run_dir import RunPaths
from pipelines.manifest import SlideEntry
from pipelines.stages.features import features_stage
from pipelines.stages.tiles import tiles_stage
from pipelines.stages.tissue import tissue_stage
from wsi.backends import open_reader
from wsi.demo_cohort import write_demo_slide
from wsi.slide import open_slide
from wsi.vendor_writers import WRITERS, write_format

MPP = 0.25
# format: (the backend `auto` must choose, the mpp source and detail, level-0 offset of the image in the slide,
#          exact pixels?). The matrix of docs/slides-and-tiles.md.
MATRIX = {
    "svs-j2k": ("tiffslide", "properties", "openslide.mpp-x", 0, True),
    "ome-tiff": ("tiffslide", "ome-xml", "OME-XML PhysicalSizeX", 0, True),
    "philips-tiff": ("tiffslide", "properties", "openslide.mpp-x", 0, True),
    "ventana": ("openslide", "properties", "openslide.mpp-x", 0, True),
    "leica-scn": ("openslide", "properties", "openslide.mpp-x", 512, True),
    "ndpi": ("openslide", "properties", "openslide.mpp-x", 0, False),
    "bigtiff": ("tiffslide", "properties", "openslide.mpp-x", 0, True),
    "flat-tiff": ("tiffslide", "properties", "openslide.mpp-x", 0, True),
    "dicom": ("openslide", "properties", "openslide.mpp-x", 0, True),
}
CONFIG = {"tissue": {"preset": "bwh_biopsy", "area_reference_mpp": 0.25},
          "tiling": {"target_mpp": 0.5, "patch_size": 128},
          "features": {"teacher": {"model": "vit_tiny", "seed": 0}}}


def decode(path) -> list[np.ndarray]:
    reader = open_reader(path, "tiffslide")
    levels = [reader.read_region((0, 0), level, size) for level, size in enumerate(reader.level_dimensions)]
    reader.close()
    return levels


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(the plain SVS, its decoded levels, {format: file}) — every format holds the SVS's pixels: the JPEG-tiled ones
    encode the same tiles with the same encoder (the same bytes), JPEG 2000 is lossless from the decoded pixels,
    NDPI's one JPEG per level re-encodes them (the only lossy copy)."""
    folder = tmp_path_factory.mktemp("formats")
    demo = folder / "demo.svs"
    write_demo_slide(demo, height=3072, width=4096, positive=True, seed=21)
    source = decode(demo)
    svs = write_format("svs", folder, "svs", source, MPP)
    pixels = decode(svs)
    files = {}
    for fmt in MATRIX:
        try:
            files[fmt] = write_format(fmt, folder, fmt, pixels if fmt in ("svs-j2k", "ndpi") else source, MPP)
        except RuntimeError as exc:  # wsidicomizer without the OS's libturbojpeg0 (.ci/run installs it)
            if fmt != "dicom":
                raise
            files[fmt] = exc
    return svs, pixels, files


def run_slide(path, slide_id: str, out) -> tuple[dict, np.ndarray, np.ndarray]:
    """tissue → tiles → features in-process; (tissue metadata, tile coords, features)."""
    from features.store import open_store

    cfg, paths = RunConfig.model_validate(CONFIG), RunPaths(out)
    entry = SlideEntry(slide_id, path, line=2)
    tissue = tissue_stage(entry, cfg, paths)
    tiles_stage(entry, cfg, paths)
    features_stage(entry, cfg, paths)
    features, coords = open_store(paths.root, cfg.features.teacher.label, slide_id).load(np.float32)
    return tissue, coords, features


@pytest.fixture(scope="module")
def reference_run(written, tmp_path_factory):
    return run_slide(written[0], "svs", tmp_path_factory.mktemp("svs_run"))


def test_every_matrix_format_has_a_writer_and_the_matrix_is_documented():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "slides-and-tiles.md").read_text()
    assert set(MATRIX) | {"svs"} == set(WRITERS)
    for fmt in MATRIX:
        assert f"`{fmt}`" in doc, f"{fmt} missing from the format matrix in docs/slides-and-tiles.md"


@pytest.mark.parametrize("fmt", list(MATRIX))
def test_format_reads_the_same_slide(fmt, written, reference_run, tmp_path):
    """auto's reader, the mpp and where it came from, the pixels at levels 0 and 1, and tissue → tiles → features
    equal to the plain SVS's (on the tiles both grids share; a flat TIFF's mask comes from level 0)."""
    backend, source, detail, offset, exact = MATRIX[fmt]
    _, levels, files = written
    if isinstance(files[fmt], Exception):
        pytest.skip(str(files[fmt]))
    with open_slide(files[fmt]) as slide:
        assert slide.backend == backend
        assert (slide.mpp, slide.mpp_source, slide.mpp_detail) == (pytest.approx(MPP), source, detail)
        level1 = slide.level_downsamples.index(4.0) if fmt != "flat-tiff" else None
        tolerance = 0 if exact else 6
        got = slide.read_region((offset + 1024, offset + 512), 0, (700, 500)).astype(int)
        assert np.abs(got - levels[0][512:1012, 1024:1724]).mean() <= tolerance / 3 and \
            np.abs(got - levels[0][512:1012, 1024:1724]).max() <= (0 if exact else 80)
        if level1 is not None:
            got = slide.read_region((offset + 1024, offset + 512), level1, (300, 200)).astype(int)
            assert np.abs(got - levels[1][128:328, 256:556]).mean() <= tolerance / 3
    tissue, coords, features = run_slide(files[fmt], fmt.replace("-", "_"), tmp_path / "out")
    ref_tissue, ref_coords, ref_features = reference_run
    assert tissue["backend"] == backend and tissue["mpp"] == pytest.approx(MPP)
    assert abs(tissue["tissue_fraction"] * np.prod(tissue["dimensions"])
               - ref_tissue["tissue_fraction"] * np.prod(ref_tissue["dimensions"])) < 0.05 * np.prod(ref_tissue["dimensions"])
    ours = {(int(x) - offset, int(y) - offset): i for i, (x, y) in enumerate(coords)}
    theirs = {(int(x), int(y)): i for i, (x, y) in enumerate(ref_coords)}
    shared = sorted(set(ours) & set(theirs))
    # NDPI's lossy copy, masked from OpenSlide's DCT-scaled 16× level, loses a few edge tiles of the tissue
    assert len(shared) >= (0.9 if exact else 0.8) * max(len(ours), len(theirs)) and len(shared) > 30
    a = features[[ours[c] for c in shared]]
    b = ref_features[[theirs[c] for c in shared]]
    if exact:  # same pixels, same features: float16 storage is the only difference
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-3 * np.abs(b).max())
    else:
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.min() > 0.98
