"""Artefact rules with known answers: pen ink is excluded from the tissue, stained tissue is not."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from wsi.artefacts import InkConfig, ink_mask
from wsi.demo_artefacts import INK
from wsi.demo_cohort import _base_textures, write_demo_slide

PX_UM = 4.0  # the overview's pixel: a 40× scan masked at 16×


def overview_with_marks() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A 600 × 800 overview: H&E tissue on glass; a stroke of each marker colour across glass and tissue; a blood
    pool (a saturated red disc) and haematoxylin-dark specks (nuclei clusters) inside the tissue. Returns the
    image and the truth masks ``ink``, ``tissue``, ``blood``, ``nuclei``."""
    he, _ = _base_textures()
    image = np.full((600, 800, 3), (244, 242, 245), np.uint8)
    tissue = np.zeros((600, 800), np.uint8)
    cv2.ellipse(tissue, (400, 300), (300, 200), 0, 0, 360, 1, -1)
    tiled = np.tile(np.clip(he, 0, 255).astype(np.uint8), (2, 2, 1))[:600, :800]
    image[tissue == 1] = tiled[tissue == 1]
    ink = np.zeros((600, 800), np.uint8)
    for row, (_, rgb) in enumerate(INK.values()):  # 16 px (64 µm) wide strokes, glass to tissue to glass
        stroke = np.zeros_like(ink)
        cv2.line(stroke, (20, 120 + 110 * row), (780, 90 + 120 * row), 1, 16)
        image[stroke == 1] = (0.15 * image[stroke == 1] + 0.85 * np.asarray(rgb)).astype(np.uint8)
        ink |= stroke
    clear = 1 - cv2.dilate(ink, np.ones((9, 9), np.uint8))  # away from a stroke's rim
    blood = np.zeros_like(ink)
    cv2.circle(blood, (300, 280), 22, 1, -1)
    blood &= tissue & clear
    image[blood == 1] = (170, 20, 30)
    nuclei = np.zeros_like(ink)
    rng = np.random.default_rng(0)
    for y, x in rng.integers((150, 200), (450, 600), size=(60, 2)):
        cv2.circle(nuclei, (int(x), int(y)), 2, 1, -1)
    nuclei &= tissue & clear
    image[nuclei == 1] = (60, 40, 110)
    return image, {"ink": ink.astype(bool), "tissue": (tissue & (1 - ink)).astype(bool), "blood": blood.astype(bool),
                   "nuclei": nuclei.astype(bool)}


def test_every_marker_colour_is_ink_and_stained_tissue_is_not():
    image, truth = overview_with_marks()
    found = ink_mask(image, PX_UM, InkConfig())
    assert found[truth["ink"]].mean() >= 0.95
    assert not found[truth["blood"]].any()  # a saturated red blob inside tissue is blood, not a stroke
    assert not found[truth["nuclei"]].any()  # haematoxylin-dark specks: too small
    rim = cv2.dilate(truth["ink"].view(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    assert found[truth["tissue"] & ~rim].mean() < 0.002  # beyond a stroke's rim, tissue stays tissue
    assert not ink_mask(image, PX_UM, InkConfig(enabled=False)).any()
    only_green = ink_mask(image, PX_UM, InkConfig(colours=("green",)))
    assert 0 < only_green.sum() < 0.4 * found.sum()


def test_a_slide_with_ink_is_masked_without_it_and_the_qc_shows_it(tmp_path):
    """A demo slide with pen strokes and a circle: ≥ 95 % of the ink is outside the mask, the tissue is kept
    (recall ≥ 0.92 next to strokes that cross it), the QC image has the legend, the GeoJSON an `Ink` annotation,
    and `qc/slides.csv` the ink's share."""
    from pipelines.artifacts import RunPaths
    from pipelines.config import RunConfig
    from pipelines.manifest import SlideEntry
    from pipelines.stages import qc_stage, tiles_stage, tissue_stage

    path = tmp_path / "inked.svs"
    write_demo_slide(path, height=3072, width=4096, positive=True, seed=41, artefacts=("ink",))
    cfg, paths = RunConfig.model_validate({"tissue": {"preset": "tcga"}}), RunPaths(tmp_path / "out")
    entry = SlideEntry("inked", path, line=2)
    meta = tissue_stage(entry, cfg, paths)
    tiles_stage(entry, cfg, paths)
    qc_stage([entry], cfg, paths)
    mask = np.asarray(Image.open(paths.tissue_mask("inked"))).astype(bool)
    size = mask.shape[::-1]
    truth = {k: cv2.resize((np.asarray(Image.open(tmp_path / f"inked.{k}.png")) > 0).view(np.uint8), size,
                           interpolation=cv2.INTER_NEAREST).astype(bool) for k in ("ink", "tissue")}
    assert mask[truth["ink"]].mean() <= 0.05
    assert mask[truth["tissue"]].mean() >= 0.92 and truth["tissue"][mask].mean() >= 0.78
    assert meta["excluded"]["ink"] > 0.02 and paths.tissue_excluded("inked", "ink").exists()
    classes = [f["properties"]["classification"]["name"] for f in json.loads(paths.tissue_outline("inked").read_text())["features"]]
    assert classes == ["Tissue", "Ink"]
    qc = np.asarray(Image.open(paths.tissue_qc("inked")).convert("RGB")).astype(int)
    assert (np.abs(qc - (255, 128, 0)).sum(axis=2) < 60).sum() > 10  # the legend's and the tint's orange
    row = paths.qc_table.read_text().splitlines()
    header = row[0].split(",")
    assert float(row[1].split(",")[header.index("ink_fraction")]) == pytest.approx(meta["excluded"]["ink"], abs=1e-4)
