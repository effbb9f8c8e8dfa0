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
    pigment = np.zeros_like(ink)  # a deposit of anthracotic pigment, black and 240 µm across: a blob, not a stroke
    cv2.ellipse(pigment, (520, 250), (30, 22), 30, 0, 360, 1, -1)
    pigment &= tissue & clear
    image[pigment == 1] = (38, 34, 36)
    return image, {"ink": ink.astype(bool), "tissue": (tissue & (1 - ink)).astype(bool), "blood": blood.astype(bool),
                   "nuclei": nuclei.astype(bool), "pigment": pigment.astype(bool)}


def test_every_marker_colour_is_ink_and_stained_tissue_is_not():
    image, truth = overview_with_marks()
    found = ink_mask(image, PX_UM, InkConfig())
    assert found[truth["ink"]].mean() >= 0.95
    assert not found[truth["blood"]].any()  # a saturated red blob inside tissue is blood, not a stroke
    assert truth["pigment"].sum() > 1000 and not found[truth["pigment"]].any()  # a black blob is pigment
    assert not found[truth["nuclei"]].any()  # haematoxylin-dark specks: too small
    rim = cv2.dilate(truth["ink"].view(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    assert found[truth["tissue"] & ~rim].mean() < 0.002  # beyond a stroke's rim, tissue stays tissue
    assert not ink_mask(image, PX_UM, InkConfig(enabled=False)).any()
    only_green = ink_mask(image, PX_UM, InkConfig(colours=("green",)))
    assert 0 < only_green.sum() < 0.4 * found.sum()


def test_the_pieces_of_a_red_stroke_that_other_strokes_cross_are_ink():
    """A red stroke under a green and a black one: the stubs left between them are each too small to be ink and,
    judged alone, no stroke; judged with the strokes they touch, they are ink. A blood pool apart stays tissue."""
    he, _ = _base_textures()
    image = np.full((300, 400, 3), (244, 242, 245), np.uint8)
    tissue = np.zeros((300, 400), np.uint8)
    cv2.ellipse(tissue, (200, 150), (190, 140), 0, 0, 360, 1, -1)
    image[tissue == 1] = np.clip(he, 0, 255).astype(np.uint8)[:300, :400][tissue == 1]
    red, crossing = np.zeros((300, 400), np.uint8), np.zeros((300, 400), np.uint8)
    cv2.rectangle(red, (60, 140), (379, 163), 1, -1)
    image[red == 1] = INK[8][1]
    for x, code in ((280, 6), (330, 7)):  # green, then black: 40 px (160 µm) wide, top to bottom
        image[20:280, x:x + 40] = INK[code][1]
        crossing[20:280, x:x + 40] = 1
    cv2.circle(image, (150, 60), 20, (170, 20, 30), -1)  # blood, away from the strokes
    stubs = (red == 1) & (crossing == 0)
    stubs[:, :280] = False  # the two 10-px pieces between and after the crossing strokes (160 µm² × 40 µm each)
    assert stubs.sum() == 2 * 10 * 24
    found = ink_mask(image, PX_UM, InkConfig())
    assert found[stubs].all() and found[red == 1].all() and found[crossing == 1].all()
    assert not found[40:80, 130:170].any()
    alone = ink_mask(np.where(crossing[..., None] == 1, np.uint8(244), image), PX_UM, InkConfig())
    assert alone[(red == 1) & ~stubs & (crossing == 0)].all() and not alone[stubs].any()  # on glass: too small


def test_ink_found_on_the_reduced_overview_is_the_ink_a_full_size_pass_finds():
    """Ink is looked for at ~8 µm/px and judged again at full size around what was found: on the marked overview
    (4 µm/px) the mask is exactly that of judging every full-size pixel."""
    from wsi.artefacts import judge_ink, widen

    image, _ = overview_with_marks()
    cfg = InkConfig()
    assert np.array_equal(ink_mask(image, PX_UM, cfg), widen(judge_ink(image, PX_UM, cfg), round(cfg.rim_um / PX_UM)))


def test_reductions_round_trip_on_any_size_even_smaller_than_a_block():
    """An overview is reduced by whole blocks and drawn back on its own shape, also when it is narrower or shorter
    than a block (a one-pixel-high overview) or not a multiple of it."""
    from wsi.artefacts import FoldConfig, expand_by, fold_mask, reduce_by

    for shape in ((1, 50), (7, 1), (9, 13), (40, 33)):
        mask = np.random.default_rng(sum(shape)).random(shape) > 0.5
        for factor in (1, 2, 3):
            small = reduce_by(mask.view(np.uint8), factor)
            back = expand_by(small > 0, factor, shape)
            assert back.shape == shape
            blocks = (shape[0] // factor) * factor, (shape[1] // factor) * factor
            if all(blocks):  # each whole block holds its own average's verdict
                assert np.array_equal(back[:blocks[0], :blocks[1]],
                                      np.kron(small > 0, np.ones((factor, factor), bool))[:blocks[0], :blocks[1]])
    overview = np.full((1, 50, 3), 200, np.uint8)
    assert fold_mask(overview, np.ones((1, 50), bool), 2.0, FoldConfig()).shape == (1, 50)


def test_a_slide_with_ink_is_masked_without_it_and_the_qc_shows_it(tmp_path):
    """A demo slide with pen strokes and a circle: ≥ 95 % of the ink is outside the mask, the tissue is kept
    (recall ≥ 0.92 next to strokes that cross it), the QC image has the legend, the GeoJSON an `Ink` annotation,
    and `qc/slides.csv` the ink's share."""
    from pipelines.config import RunConfig
    from pipelines.engine.run_dir import RunPaths
    from pipelines.manifest import SlideEntry
    from pipelines.stages.qc import qc_stage
    from pipelines.stages.tiles import tiles_stage
    from pipelines.stages.tissue import tissue_stage

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


def test_a_corrected_mask_replaces_ours_and_the_tiles_follow_it(cohort, tmp_path):
    """tissue.mask_dir: a QuPath GeoJSON with one region left and an `Ignore*` box cut out of it, then a PNG keeping
    the left half; the tiles follow each, and the tissue fingerprint follows the file's content, not its mtime."""
    import os

    from pipelines.config import RunConfig
    from pipelines.engine.plan import build_plan
    from pipelines.engine.run_dir import RunPaths
    from pipelines.manifest import SlideEntry
    from pipelines.stages.table import STAGES
    from pipelines.stages.tiles import tiles_stage
    from pipelines.stages.tissue import tissue_stage

    entry = SlideEntry("demo_001", cohort / "demo_001.svs", line=2)
    settings = {"tissue": {"preset": "bwh_biopsy", "area_reference_mpp": 0.25}, "tiling": {"target_mpp": 0.5}}
    ours = RunPaths(tmp_path / "ours")
    tissue_stage(entry, RunConfig.model_validate(settings), ours)
    tiles_stage(entry, RunConfig.model_validate(settings), ours)
    before = np.load(ours.tile_coords("demo_001"))
    outline = json.loads(ours.tissue_outline("demo_001").read_text())
    polygons = outline["features"][0]["geometry"]["coordinates"]
    biggest = max(polygons, key=lambda rings: cv2.contourArea(np.asarray(rings[0], np.float32)))
    xs, ys = np.asarray(biggest[0])[:, 0], np.asarray(biggest[0])[:, 1]
    cx, cy = float(np.median(xs)), float(np.median(ys))
    cut = [[cx - 600, cy - 600], [cx + 600, cy - 600], [cx + 600, cy + 600], [cx - 600, cy + 600], [cx - 600, cy - 600]]
    edited = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": biggest}, "properties": {"classification": {"name": "Tissue"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [cut]}, "properties": {"classification": {"name": "Ignore*"}}}]}
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "demo_001.geojson").write_text(json.dumps(edited))
    cfg = RunConfig.model_validate({**settings, "tissue": {**settings["tissue"], "mask_dir": str(masks)}})
    paths = RunPaths(tmp_path / "edited")
    meta = tissue_stage(entry, cfg, paths)
    tiles_stage(entry, cfg, paths)
    after = np.load(paths.tile_coords("demo_001"))
    assert meta["mask_source"].endswith("demo_001.geojson") and meta["n_regions"] == 1
    assert 0 < len(after) < len(before)
    centres = after + 256
    inside_cut = (np.abs(centres[:, 0] - cx) < 600 - 256) & (np.abs(centres[:, 1] - cy) < 600 - 256)
    assert not inside_cut.any()
    ring = np.asarray(biggest[0], np.float32)
    distance = [cv2.pointPolygonTest(ring, (float(x), float(y)), True) for x, y in centres]
    assert min(distance) >= -256 * 2**0.5  # every tile touches the kept region: the other regions' tiles are gone

    def tissue_fp(config):
        plan = build_plan(STAGES, [entry], config, RunPaths(tmp_path / "plan"))
        return next(t.fingerprint for t in plan.values() if t.stage == "tissue")

    first = tissue_fp(cfg)
    os.utime(masks / "demo_001.geojson", ns=(1, 10**18))
    assert tissue_fp(cfg) == first  # touched, same content: nothing to redo
    (masks / "demo_001.geojson").unlink()
    width, height = json.loads(ours.tissue_meta("demo_001").read_text())["dimensions"]
    half = np.zeros((300, 400), np.uint8)
    half[:, :200] = 255
    Image.fromarray(half).save(masks / "demo_001.png")
    assert tissue_fp(cfg) != first
    tissue_stage(entry, cfg, paths)
    tiles_stage(entry, cfg, paths)
    left = np.load(paths.tile_coords("demo_001"))
    assert (left[:, 0] + 512 <= width / 2 + 64).all()  # the PNG's left half, glass included, is the tissue now
    assert len(left) > (before[:, 0] + 512 <= width / 2).sum()


def test_sharpness_separates_out_of_focus_tissue_from_smooth_tissue_and_glass():
    from wsi.tiling import sharpness

    he, ihc = (np.clip(t, 0, 255).astype(np.uint8)[:256, :256] for t in _base_textures())
    sharp = sharpness(he)
    assert sharpness(cv2.GaussianBlur(he, (0, 0), 6)) < 0.1 * sharp  # 3 µm at 0.5 µm/px: out of focus
    assert sharpness(ihc) > 0.1 * sharp  # smooth but in focus (the demo's tumour): not blurred
    quarter = he.copy()
    quarter[:128, :128] = cv2.GaussianBlur(he, (0, 0), 6)[:128, :128]
    assert sharpness(quarter) > 0.5 * sharp  # the tile's majority decides
    assert np.isnan(sharpness(np.full((256, 256, 3), 244, np.uint8)))  # glass: nothing to judge


def test_blurred_fields_are_flagged_and_can_be_dropped(tmp_path):
    """A demo slide with two out-of-focus fields: the tiles mostly inside them are flagged blurred (recall and
    precision ≥ 0.8 on this one slide), QC reports their share, and `tiling.min_sharpness` drops them."""
    from pipelines.config import RunConfig
    from pipelines.engine.run_dir import RunPaths
    from pipelines.manifest import SlideEntry
    from pipelines.stages.qc import qc_stage
    from pipelines.stages.tiles import tiles_stage
    from pipelines.stages.tissue import tissue_stage

    path = tmp_path / "blurred.svs"
    write_demo_slide(path, height=6144, width=8192, positive=True, seed=51, artefacts=("blur",))
    # the tiles stage's own check (slides.verify_tiles: tiles); the features read scores the same tiles alike
    # (tests/test_features.py, tests/test_cli_run.py)
    settings = {"tissue": {"preset": "bwh_biopsy", "area_reference_mpp": 0.25}, "slides": {"verify_tiles": "tiles"}}
    entry, paths = SlideEntry("blurred", path, line=2), RunPaths(tmp_path / "out")
    tissue_stage(entry, RunConfig.model_validate(settings), paths)
    meta = tiles_stage(entry, RunConfig.model_validate(settings), paths)
    coords, scores = np.load(paths.tile_coords("blurred")), np.load(paths.tile_sharpness("blurred"))
    assert scores.shape == (len(coords),)
    blur = np.asarray(Image.open(tmp_path / "blurred.blur.png")) > 0
    size = meta["level0_size"]
    truth = np.array([blur[y // 8:(y + size) // 8, x // 8:(x + size) // 8].mean() >= 0.5 for x, y in coords])
    flagged = scores < 0.1 * np.nanmedian(scores)
    assert truth.sum() >= 5 and (flagged & truth).sum() >= 0.8 * truth.sum() and (flagged & truth).sum() >= 0.8 * flagged.sum()
    qc_stage([entry], RunConfig.model_validate(settings), paths)
    header, row = (line.split(",") for line in paths.qc_table.read_text().splitlines()[:2])
    assert abs(float(row[header.index("blurred_fraction")]) - truth.mean()) <= 0.05  # the share QC reports is the truth's
    threshold = float(0.1 * np.nanmedian(scores))
    dropped = tiles_stage(entry, RunConfig.model_validate({**settings, "tiling": {"min_sharpness": threshold}}), paths)
    assert dropped["n_blurry_dropped"] == flagged.sum() and dropped["n_tiles"] == len(coords) - flagged.sum()
    with pytest.raises(ValueError, match="min_sharpness needs slides.verify_tiles"):
        RunConfig.model_validate({"tiling": {"min_sharpness": 1.0}, "slides": {"verify_tiles": False}})


def test_faint_tissue_is_kept_but_a_stained_edge_halo_is_not():
    """Glass (saturation ~5), a stained disc whose edge fades over 4 px, and a pale field (saturation 12, 30 % of its
    pixels speckled up to 18): the fixed biopsy threshold (15) loses the field; the faint pass adds ≥ 95 % of it
    and nothing of the halo."""
    from wsi.thresholds import glass_threshold
    from wsi.tissue import TissueConfig, segment_tissue

    rng = np.random.default_rng(0)
    sat = np.clip(rng.normal(5, 1, (400, 600)), 0, 255)
    yy, xx = np.mgrid[:400, :600]
    r = np.hypot(yy - 200, xx - 150)
    sat = np.where(r < 80, 90, np.where(r < 84, 90 - (r - 80) * 21, sat))  # the halo: 90 → 6 over 4 px
    field = (np.abs(yy - 200) < 90) & (np.abs(xx - 440) < 110)
    sat[field] = 12 + 6 * (rng.random(field.sum()) < 0.3)
    hsv = np.stack([np.full_like(sat, 150), sat, np.full_like(sat, 230)], axis=-1).astype(np.uint8)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    assert glass_threshold(sat.astype(np.uint8), 11) < 12
    cfg = TissueConfig(preset="bwh_biopsy", ink={"enabled": False})
    fixed = segment_tissue(rgb, (16.0, 16.0), cfg.model_copy(update={"faint": False}), 0.25).mask
    faint = segment_tissue(rgb, (16.0, 16.0), cfg, 0.25).mask
    assert fixed[field].mean() < 0.5 and faint[field].mean() >= 0.95
    halo = (r >= 80) & (r < 90)
    assert faint[halo].sum() <= fixed[halo].sum() + 5  # the faint pass adds no ring around stained tissue


def test_thin_structures_on_the_glass_are_excluded_and_tissue_is_not():
    """At 4 µm/px: a bubble's rim (60 µm wide), a coverslip's edge (70 µm) with a bubble on it, next to an H&E
    section, a 200 µm-wide strip of tissue and a ring-shaped section: the rims and the edge are excluded as
    `bubble`, every piece of tissue is kept; switched off, the rims are tissue."""
    from wsi.artefacts import thin_parts
    from wsi.tissue import TissueConfig, segment_tissue

    he, _ = _base_textures()
    image = np.full((600, 800, 3), (244, 242, 245), np.uint8)
    tissue = np.zeros((600, 800), np.uint8)
    cv2.ellipse(tissue, (250, 300), (150, 110), 0, 0, 360, 1, -1)
    cv2.rectangle(tissue, (450, 150), (700, 200), 1, -1)  # a strip 50 px = 200 µm wide
    cv2.circle(tissue, (600, 400), 90, 1, -1)
    cv2.circle(tissue, (600, 400), 40, 0, -1)  # a section with a hole
    tiled = np.tile(np.clip(he, 0, 255).astype(np.uint8), (2, 2, 1))[:600, :800]
    image[tissue == 1] = tiled[tissue == 1]
    rims = np.zeros_like(tissue)
    cv2.circle(rims, (120, 520), 50, 1, 15)
    cv2.line(rims, (0, 580), (799, 585), 1, 17)
    cv2.circle(rims, (400, 560), 45, 1, 15)  # a bubble on the edge: where they cross, a wide disc fits
    rims &= 1 - cv2.dilate(tissue, np.ones((15, 15), np.uint8))
    image[rims == 1] = (128, 112, 98)
    cfg = TissueConfig(preset="bwh_biopsy", ink={"enabled": False}, folds={"enabled": False})
    found = segment_tissue(image, (16.0, 16.0), cfg, 0.25)
    rims, tissue = rims.astype(bool), tissue.astype(bool)
    assert not found.mask[rims].any() and found.excluded["bubble"][rims].mean() > 0.9
    assert found.mask[tissue].mean() > 0.97 and not found.excluded["bubble"][tissue].any()
    assert found.n_regions == 3
    labels = np.zeros((64, 64), np.int32)
    labels[20:23, 20:23] = 1  # a region the sampling of a large reduction misses is not judged thin
    assert not thin_parts(labels, np.bincount(labels.ravel()), 30.0, 16)[1]
    off = segment_tissue(image, (16.0, 16.0), TissueConfig(preset="bwh_biopsy", ink={"enabled": False},
                                                           folds={"enabled": False}, bubbles={"enabled": False}), 0.25)
    assert off.mask[rims].mean() > 0.8 and "bubble" not in off.excluded


def test_a_fold_is_flagged_and_denser_tissue_is_not():
    """A section with a band where it lies on itself (transmission squared) and a tumour 1.3× as dense: the fold
    is flagged (≥ 90 % of its pixels), the tumour is not, nor the rest but a fold's blurred rim; and still when
    half the section is faintly stained (the reference is the stained tissue, not a median the pale half drags)."""
    from wsi.artefacts import FoldConfig, fold_mask

    he, _ = _base_textures()  # the H&E texture as an overview at 16× shows it
    small = cv2.resize(np.clip(he, 0, 255).astype(np.uint8), None, fx=1 / 16, fy=1 / 16, interpolation=cv2.INTER_AREA)
    tiled = np.tile(small, (40, 40, 1))[:600, :800].astype(np.float32)
    tissue = np.zeros((600, 800), np.uint8)
    cv2.ellipse(tissue, (400, 300), (330, 220), 0, 0, 360, 1, -1)
    fold, dense = np.zeros_like(tissue), np.zeros_like(tissue)
    cv2.line(fold, (150, 150), (600, 420), 1, 50)  # 200 µm wide
    cv2.circle(dense, (500, 200), 70, 1, -1)
    fold, dense, tissue = fold.astype(bool) & tissue.astype(bool), dense.astype(bool) & ~fold.astype(bool), tissue.astype(bool)
    image = np.full((600, 800, 3), 244, np.float32)
    image[tissue] = tiled[tissue]
    image[dense] = 255 * (image[dense] / 255) ** 1.3
    image[fold] = image[fold] ** 2 / 255
    found = fold_mask(image.astype(np.uint8), tissue, 4.0, FoldConfig())
    assert found[fold].mean() >= 0.9 and found[dense].mean() < 0.01 and found[tissue & ~fold].mean() < 0.03
    pale = tissue & ~fold & ~dense & (np.mgrid[:600, :800][1] < 420)  # half the rest faintly stained (30 %)
    image[pale] = 0.3 * image[pale] + 0.7 * 244
    found = fold_mask(image.astype(np.uint8), tissue, 4.0, FoldConfig())  # ordinary tissue is not twice the pale
    assert found[fold].mean() >= 0.9 and found[tissue & ~fold & ~pale].mean() < 0.03
    generous = fold_mask(image.astype(np.uint8), np.ones_like(tissue), 4.0, FoldConfig())  # a mask drawn with glass
    assert generous[fold].mean() >= 0.9 and generous[tissue & ~fold & ~pale].mean() < 0.03
    assert not fold_mask(image.astype(np.uint8), tissue, 4.0, FoldConfig(enabled=False)).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_stained_density_is_the_median_of_the_values_left_after_each_round(dtype):
    """The sorted-once reference equals its definition (a median per round over the values ≥ 0.6 × the last):
    odd and even counts, ties, a pale majority that moves it, and values already all above the bound."""
    from wsi.artefacts import stained_density

    def by_definition(values, pale=0.6, rounds=3):
        reference, kept = float(np.median(values)), values
        for _ in range(rounds):
            remaining = kept[kept >= pale * reference]
            if not len(remaining) or len(remaining) == len(kept):
                break
            kept, reference = remaining, float(np.median(remaining))
        return reference

    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 10, 999, 1000):
        for values in (rng.gamma(2.0, 0.3, n), np.round(rng.gamma(2.0, 0.3, n), 1),
                       np.concatenate([rng.normal(1.0, 0.1, n), np.full(2 * n, 0.2)]), np.full(n, 0.7)):
            values = values.astype(dtype)
            assert stained_density(values) == by_definition(values)
    pale_share = np.concatenate([np.full(450, 0.2), np.linspace(0.5, 1.5, 550)]).astype(dtype)
    assert np.median(pale_share) < 0.6 < 1.0 < stained_density(pale_share)  # the pale 45 % no longer drag it down


def test_sections_are_numbered_left_to_right_on_their_tissue():
    from wsi.tissue_qc import section_order

    mask = np.zeros((200, 300), np.uint8)
    cv2.circle(mask, (220, 60), 40, 1, -1)
    cv2.circle(mask, (80, 120), 60, 1, -1)
    cv2.circle(mask, (80, 120), 30, 0, -1)  # a ring: its centre is glass
    mask[190:192, 5:7] = 1  # a speck is no section
    points = section_order(mask.astype(bool))
    assert len(points) == 2 and points[0][0] < points[1][0]
    assert all(mask[y, x] for x, y in points)


def test_a_slide_with_bubbles_and_a_fold_reports_them_in_qc_geojson_and_tiles(tmp_path):
    """A demo slide with bubbles, a coverslip edge and a fold: the rims are outside the mask, the fold is flagged
    (QuPath classes `Bubble` and `Fold`), QC has their shares, each tile its fold share, and
    `tiling.max_fold_fraction` drops the tiles mostly fold."""
    from pipelines.config import RunConfig
    from pipelines.engine.run_dir import RunPaths
    from pipelines.manifest import SlideEntry
    from pipelines.stages.qc import qc_stage
    from pipelines.stages.tiles import tiles_stage
    from pipelines.stages.tissue import tissue_stage

    path = tmp_path / "glass.svs"
    write_demo_slide(path, height=4608, width=6144, positive=False, seed=44, artefacts=("bubbles", "fold"))
    settings = {"tissue": {"preset": "bwh_biopsy", "area_reference_mpp": 0.25}, "slides": {"verify_tiles": False}}
    cfg, paths, entry = RunConfig.model_validate(settings), RunPaths(tmp_path / "out"), SlideEntry("glass", path, line=2)
    meta = tissue_stage(entry, cfg, paths)
    tiles = tiles_stage(entry, cfg, paths)
    qc_stage([entry], cfg, paths)
    mask = np.asarray(Image.open(paths.tissue_mask("glass"))).astype(bool)
    truth = {k: cv2.resize((np.asarray(Image.open(tmp_path / f"glass.{k}.png")) > 0).view(np.uint8), mask.shape[::-1],
                           interpolation=cv2.INTER_NEAREST).astype(bool) for k in ("bubble", "fold", "tissue")}
    assert mask[truth["bubble"]].mean() <= 0.05 and mask[truth["tissue"]].mean() >= 0.97
    assert meta["excluded"]["bubble"] > 0 and meta["flagged"]["fold"] > 0
    classes = {f["properties"]["classification"]["name"] for f in json.loads(paths.tissue_outline("glass").read_text())["features"]}
    assert {"Tissue", "Bubble", "Fold"} <= classes
    header, row = (line.split(",") for line in paths.qc_table.read_text().splitlines()[:2])
    assert float(row[header.index("fold_fraction")]) == pytest.approx(meta["flagged"]["fold"], abs=1e-4)
    shares = np.load(paths.tile_folds("glass"))
    assert len(shares) == tiles["n_tiles"] and tiles["n_fold_tiles"] == (shares >= 0.5).sum() > 0
    dropped = tiles_stage(entry, RunConfig.model_validate({**settings, "tiling": {"max_fold_fraction": 0.5}}), paths)
    assert dropped["n_fold_dropped"] == (shares > 0.5).sum() and dropped["n_tiles"] == tiles["n_tiles"] - (shares > 0.5).sum()
    kept = np.load(paths.tile_folds("glass"))
    assert len(kept) == len(np.load(paths.tile_coords("glass"))) and kept.max() <= 0.5
    off = RunConfig.model_validate({**settings, "tissue": {**settings["tissue"], "folds": {"enabled": False}}})
    tissue_stage(entry, off, paths)  # a rerun that no longer flags folds leaves no fold file behind
    tiles_stage(entry, off, paths)
    assert not paths.tissue_flagged("glass", "fold").exists() and not paths.tile_folds("glass").exists()
