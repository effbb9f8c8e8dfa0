"""Tissue masks against the demo slides' ground truth, and CLAM's region/hole filtering rules."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_glass_slide
from PIL import Image
from pydantic import ValidationError
from scipy import ndimage

from wsi.demo_cohort import load_truth
from wsi.slide import open_slide
from wsi.tissue import PRESETS, TissueConfig, _filter_regions, mask_slide, saturation
from wsi.tissue_qc import qc_image


def _truth_at(mask_shape, truth: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(truth).resize(mask_shape[::-1], Image.Resampling.NEAREST))


@pytest.mark.parametrize("name", ["demo_000.svs", "demo_001.svs", "demo_002.tif", "demo_003.svs"])
def test_mask_matches_ground_truth_and_excludes_holes_and_artefacts(cohort, demo_cfg, name):
    with open_slide(cohort / name) as slide:
        tissue, overview = mask_slide(slide, demo_cfg.tissue)
    truth, _, _ = load_truth(cohort / name)
    gt = _truth_at(tissue.mask.shape, truth)
    iou = (gt & tissue.mask).sum() / (gt | tissue.mask).sum()
    assert iou >= 0.9, f"IoU {iou:.3f}"
    holes = ndimage.binary_erosion(ndimage.binary_fill_holes(gt) & ~gt, iterations=2)  # 2 px off the rim
    if holes.sum() > 50:
        assert tissue.mask[holes].mean() < 0.05, "holes must stay out of the mask"
        assert tissue.n_holes >= 1
    # pen stroke and debris lie on the glass ≥ 11 mask px away from tissue; closing may fill narrow inlets nearer
    far_from_tissue = ~ndimage.binary_dilation(gt, iterations=8)
    assert tissue.mask[far_from_tissue].mean() < 0.002
    assert overview.shape[:2] == tissue.mask.shape
    qc = qc_image(overview, tissue, max_size=300)
    assert max(qc.shape[:2]) == min(300, max(tissue.mask.shape)) and (qc == (0, 200, 0)).all(axis=2).any()


@pytest.mark.parametrize("preset", ["bwh_biopsy", "tcga_otsu"])
def test_opencv_masks_match_the_previous_scikit_image_masks(cohort, demo_cfg, preset):
    """The OpenCV path gives today's masks (tests/reference_tissue.py) up to a sliver of border pixels."""
    import reference_tissue

    cfg = demo_cfg.tissue if preset == "bwh_biopsy" else TissueConfig(preset="tcga", use_otsu=True, a_t=1, a_h=1)
    for name in ["demo_000.svs", "demo_001.svs", "demo_002.tif", "demo_003.svs"]:
        with open_slide(cohort / name) as slide:
            tissue, overview = mask_slide(slide, cfg)
            reference = reference_tissue.segment_tissue(overview, tissue.downsample, cfg, slide.mpp)
        # OpenCV's integer saturation (CLAM's own) rounds a few pixels one level away from the float formula
        assert np.abs(saturation(overview).astype(int) - reference_tissue.saturation(overview)).max() <= 1
        differ = (tissue.mask != reference.mask).mean()
        iou = (tissue.mask & reference.mask).sum() / max(1, (tissue.mask | reference.mask).sum())
        assert differ < 0.002 and iou > 0.99, (name, differ, iou)
        assert (tissue.n_regions, tissue.n_holes) == (reference.n_regions, reference.n_holes), name


def test_clam_default_thresholds_drop_biopsy_sized_tissue(cohort):
    """a_t = 100 level-0 patches (CLAM's default) is larger than every demo island: nothing kept."""
    with open_slide(cohort / "demo_000.svs") as slide:
        tissue, _ = mask_slide(slide, TissueConfig())
    assert tissue.n_regions == 0 and not tissue.mask.any()


def test_slide_without_tissue_gives_an_empty_mask(tmp_path, demo_cfg):
    with open_slide(write_glass_slide(tmp_path / "glass.svs")) as slide:
        tissue, _ = mask_slide(slide, demo_cfg.tissue)
    assert tissue.n_regions == 0 and tissue.tissue_fraction == 0.0
    with open_slide(tmp_path / "glass.svs") as slide:
        otsu, _ = mask_slide(slide, TissueConfig(preset="bwh_biopsy", use_otsu=True))
    assert otsu.tissue_fraction < 0.6  # Otsu splits noise, but the area filter still removes specks


def test_region_and_hole_filtering_rules():
    binary = np.zeros((200, 200), bool)
    binary[10:110, 10:110] = True  # big region, area 10000 minus holes
    binary[30:50, 30:50] = False  # big hole (400 px)
    binary[70:73, 70:73] = False  # small hole (9 px): filled
    binary[80:92, 30:42] = False  # medium hole (144 px)
    binary[150:155, 150:155] = True  # small region (25 px): dropped
    mask, n_regions, n_holes = _filter_regions(binary, min_tissue_px=100, min_hole_px=50, max_n_holes=8)
    assert n_regions == 1 and n_holes == 2
    assert not mask[40, 40] and not mask[85, 35]
    assert mask[71, 71]  # small hole filled
    assert not mask[152, 152]
    mask1, _, n1 = _filter_regions(binary, min_tissue_px=100, min_hole_px=50, max_n_holes=1)
    assert n1 == 1 and not mask1[40, 40] and mask1[85, 35]  # only the largest hole kept


def test_filtering_equals_the_reference_when_dropped_boxes_cover_the_image():
    """Nested thin rings (dropped, their boxes overlapping) take the lookup-table path; scattered specks
    and small holes take the bounding-box path. Both equal tests/reference_tissue.py exactly."""
    import reference_tissue

    rng = np.random.default_rng(3)
    rings = np.zeros((120, 120), bool)
    for r in range(2, 58, 4):
        rings[60 - r:60 + r, 60 - r:60 + r] = True
        rings[61 - r:59 + r, 61 - r:59 + r] = False
    specks = rng.random((300, 300)) > 0.93
    specks[50:250, 50:250] |= rng.random((200, 200)) > 0.05  # a big region riddled with small holes
    for binary, min_px in ((rings, 10_000), (specks, 20)):
        got = _filter_regions(binary, min_px, 3, 8)
        want = reference_tissue._filter_regions(binary, min_px, 3, 8)
        assert np.array_equal(got[0], want[0]) and got[1:] == want[1:]


def test_filtering_equals_the_reference_on_random_masks():
    """Holes are looked for within the kept regions' box only; sections, specks inside and outside their holes,
    regions touching the border and nothing kept all give the reference's mask and counts."""
    import reference_tissue

    rng = np.random.default_rng(11)
    for case in range(400):
        h, w = rng.integers(3, 60, 2)
        if case % 2:
            binary = rng.random((h, w)) < rng.uniform(0.3, 0.8)
        else:
            binary = np.zeros((h, w), bool)
            for _ in range(rng.integers(1, 5)):  # sections, riddled with holes, specks all around
                y, x = rng.integers(0, [h, w])
                binary[y:y + rng.integers(2, 30), x:x + rng.integers(2, 30)] = True
            binary &= rng.random((h, w)) < 0.85
            binary |= rng.random((h, w)) < 0.03
        args = (binary, float(rng.integers(0, 40)), float(rng.integers(0, 5)), int(rng.integers(0, 4)))
        got, want = _filter_regions(*args), reference_tissue._filter_regions(*args)
        assert np.array_equal(got[0], want[0]) and got[1:] == want[1:], case


def test_a_hole_ink_touches_stays_open_where_the_kept_box_is_away_from_the_corner():
    """Holes are labelled within the kept regions' box, offset from the image's corner: excluded ink must still
    be looked up at the holes' own pixels. Of two small holes (both below min_hole_px), the one under ink stays
    open, the other is filled; a speck outside the box changes nothing."""
    binary = np.zeros((120, 160), bool)
    binary[40:100, 60:150] = True  # the section, far from (0, 0)
    binary[50:54, 70:74] = False  # a small hole under ink
    binary[80:84, 120:124] = False  # a small hole elsewhere
    binary[5:7, 5:7] = True  # a speck near the corner: dropped
    ink = np.zeros_like(binary)
    ink[49:55, 69:75] = True  # the ink (widened) over the first hole and its rim
    mask, n_regions, n_holes = _filter_regions(binary, 100, 50, 8, ink)
    assert n_regions == 1 and n_holes == 0
    assert not mask[51:53, 71:73].any()  # under the ink: open
    assert mask[80:84, 120:124].all()  # filled
    assert not mask[5:7, 5:7].any()


def test_regions_and_holes_counted_from_contours_equal_their_labelling():
    """A given mask's regions (8-connected) and holes (4-connected background not reaching the edge) counted from
    OpenCV's contours equal the counts of labelling them, on masks of every density, touching the edges or not."""
    import cv2

    from wsi.tissue import count_regions_and_holes, enclosed_background

    rng = np.random.default_rng(21)
    for case in range(600):
        h, w = (int(n) for n in rng.integers(1, 70, 2))
        binary = rng.random((h, w)) < rng.uniform(0.1, 0.95)
        if case % 3 == 0:  # sections with holes and islands in them, away from the edge
            binary = np.zeros((h + 10, w + 10), bool)
            binary[5:-5, 5:-5] = rng.random((h, w)) < 0.75
        regions = cv2.connectedComponents(binary.view(np.uint8), connectivity=8)[0] - 1
        holes = cv2.connectedComponents(enclosed_background(binary).view(np.uint8), connectivity=4)[0] - 1
        assert count_regions_and_holes(binary) == (regions, holes), case
    assert count_regions_and_holes(np.zeros((5, 5), bool)) == (0, 0)
    assert count_regions_and_holes(np.ones((5, 5), bool)) == (1, 0)


def test_region_area_excludes_its_holes():
    binary = np.zeros((100, 100), bool)
    binary[10:60, 10:60] = True  # 2500 px
    binary[15:55, 15:55] = False  # hole of 1600 → tissue area 900
    assert _filter_regions(binary, 1000, 10, 8)[1] == 0
    assert _filter_regions(binary, 800, 10, 8)[1] == 1


def test_saturation_matches_opencv_definition():
    rgb = np.array([[[255, 0, 0], [200, 200, 200], [100, 50, 25], [0, 0, 0]]], np.uint8)
    assert saturation(rgb).tolist() == [[255, 0, 191, 0]]


def test_presets_fill_unset_fields_and_explicit_values_win():
    tcga = TissueConfig(preset="tcga")
    assert (tcga.a_t, tcga.a_h, tcga.sthresh) == (16, 4, 8)
    custom = TissueConfig(preset="bwh_biopsy", sthresh=20)
    assert custom.sthresh == 20 and custom.mthresh == PRESETS["bwh_biopsy"]["mthresh"]
    with pytest.raises(ValidationError, match="extra"):
        TissueConfig(sthres=3)
    with pytest.raises(ValidationError, match="odd"):
        TissueConfig(mthresh=6)
    with pytest.raises(ValidationError):
        TissueConfig(preset="tcga-ish")


def test_window_sums_at_the_sampled_pixels_equal_a_box_filter_of_the_whole_image():
    """The glass level's sample (wsi.thresholds.window_sums) is the box filter's sums, border and all, on every
    shape: sizes not a multiple of the step, images smaller than the window, kernels whose sums need 32 bits."""
    import cv2

    from wsi.thresholds import window_sums

    rng = np.random.default_rng(5)
    for shape in [(187, 250), (9, 7), (3, 50), (1, 1), (2, 2), (4, 5), (101, 37)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        for k in (1, 3, 7, 17):
            expected = cv2.boxFilter(image, cv2.CV_32S, (k, k), normalize=False, borderType=cv2.BORDER_REFLECT_101)
            got = window_sums(image, k, 4)
            assert np.array_equal(got.astype(np.int64), expected[::4, ::4]), (shape, k)


def test_the_glass_level_from_its_histogram_is_the_one_medians_of_the_sample_give():
    """glass_threshold takes its medians from the sample's histogram: the same threshold as np.median over the
    sample itself, on glass of any level and noise, half-stained fields, and every window size; and the weighted
    median is np.median of the repeated values, odd and even counts."""
    from wsi.thresholds import GLASS_MADS, GLASS_MARGIN, glass_threshold, weighted_median, window_sums

    def by_definition(sat, k):
        sample = window_sums(sat, k, 4).ravel() / float(k * k)
        level = float(np.median(sample))
        glass = sample[sample <= max(2 * level, level + 4)]
        spread = 1.4826 * float(np.median(np.abs(glass - np.median(glass))))
        return int(np.ceil(float(np.median(glass)) + max(GLASS_MARGIN, GLASS_MADS * spread)))

    rng = np.random.default_rng(11)
    for case in range(150):
        h, w = (int(n) for n in rng.integers(12, 160, 2))
        sat = np.clip(rng.normal(rng.integers(0, 30), rng.uniform(0.3, 25), (h, w)), 0, 255).astype(np.uint8)
        if case % 3 == 0:
            sat[: h // 2] = rng.integers(0, 256)  # a stained half
        for k in (1, 3, 7, 11):
            assert glass_threshold(sat, k) == by_definition(sat, k), (case, k)
    for n in (1, 2, 3, 10, 11):
        values = np.sort(rng.normal(0, 1, n))
        counts = rng.integers(1, 4, n)
        assert weighted_median(values, counts) == float(np.median(np.repeat(values, counts)))


@pytest.mark.parametrize("k, threshold", [(3, 8), (7, 8), (11, 15), (1, 20)])
def test_median_threshold_by_counting_equals_median_blur_then_threshold(cohort, k, threshold):
    import cv2

    from wsi.thresholds import median_threshold

    with open_slide(cohort / "demo_001.svs") as slide:
        sat = saturation(slide.read_downsampled(16))
    rng = np.random.default_rng(k)
    noisy = np.clip(sat.astype(int) + rng.integers(-12, 13, sat.shape), 0, 255).astype(np.uint8)  # many near-threshold pixels
    for image in (sat, noisy):
        expected = (cv2.medianBlur(image, k) if k > 1 else image) > threshold
        assert np.array_equal(median_threshold(image, k, threshold).astype(bool), expected)


@pytest.mark.parametrize("name", ["demo_001.svs", "demo_003.svs"])
def test_tissue_outline_geojson_for_qupath_has_every_region_and_hole_inside_the_tissue(cohort, demo_cfg, name):
    import json

    import geojson

    from wsi.annotations import tissue_geojson

    with open_slide(cohort / name) as slide:
        tissue, _ = mask_slide(slide, demo_cfg.tissue)
        width, height = slide.dimensions
    outline = tissue_geojson(tissue.mask, tissue.downsample)
    parsed = geojson.loads(json.dumps(outline))
    assert parsed.is_valid, parsed.errors()
    (feature,) = outline["features"]  # one annotation per slide
    assert feature["properties"]["objectType"] == "annotation" and feature["properties"]["classification"]["name"] == "Tissue"
    polygons = feature["geometry"]["coordinates"]
    assert len(polygons) == tissue.n_regions and sum(len(p) - 1 for p in polygons) == tissue.n_holes
    dx, dy = tissue.downsample
    for rings in polygons:
        for k, ring in enumerate(rings):
            xy = np.asarray(ring)
            assert (xy >= 0).all() and (xy[:, 0] <= width).all() and (xy[:, 1] <= height).all()
            cols, rows = (xy[:, 0] / dx).astype(int), (xy[:, 1] / dy).astype(int)
            # every vertex lies on a tissue pixel: exteriors a quarter pixel inside the region's edge, holes a
            # quarter pixel outside the hole (OpenCV traces a hole along the tissue pixels around it)
            assert tissue.mask[rows, cols].all(), (k, len(ring))
    assert feature["properties"]["measurements"]["tissue_area_px"] == pytest.approx(tissue.mask.sum() * dx * dy)
    assert tissue_geojson(np.zeros((8, 8), bool), (4.0, 4.0))["features"] == []  # no tissue: no annotation


@pytest.mark.parametrize("downsample", [(16.0, 16.0), (39_983 / 2499, 31_021 / 1939), (1.0, 1.0), (3.0, 3.0)])
def test_the_outline_file_is_the_geojson_of_its_rings_at_any_downsample(downsample):
    """The outline file (orjson over numpy rings) is json's text of the list rings, whole-number coordinates or
    not (a scanner's level downsample is rarely a whole number; holes are reversed to wind clockwise)."""
    import json

    import cv2

    from pipelines.stages.tissue import tissue_outline_json
    from wsi.annotations import tissue_geojson
    from wsi.tissue import mask_from

    mask = np.zeros((60, 80), np.uint8)
    cv2.ellipse(mask, (40, 30), (30, 20), 0, 0, 360, 1, -1)
    cv2.circle(mask, (40, 30), 6, 0, -1)  # a hole
    mask[2:6, 70:78] = 1  # a second region
    ink = np.zeros((60, 80), bool)
    ink[50:53, 5:60] = True
    tissue = mask_from(mask.astype(bool), downsample, {"ink": ink})
    expected = tissue_geojson(tissue.mask, downsample)
    expected["features"] += tissue_geojson(ink, downsample, name="Ink")["features"]
    assert tissue_outline_json(tissue) == json.dumps(expected, separators=(",", ":"))


def test_mask_pngs_are_1_bit_files_other_tools_read_and_any_png_reads_back_as_its_nonzero_pixels(tmp_path):
    """The tissue stage's masks are 1-bit PNGs (Pillow, QuPath and browsers read them); reading takes any PNG a
    person may have drawn (8-bit grey, RGB) as its nonzero pixels, and names a file that is not one."""
    import io

    from PIL import Image

    from wsi.mask_png import load_mask_png, save_mask_png

    mask = np.random.default_rng(3).random((37, 53)) > 0.6
    save_mask_png(mask, tmp_path / "mask.png")
    buffer = io.BytesIO()
    save_mask_png(mask, buffer)
    assert buffer.getvalue() == (tmp_path / "mask.png").read_bytes()
    image = Image.open(tmp_path / "mask.png")
    assert image.mode == "1" and np.array_equal(np.asarray(image), mask)
    assert np.array_equal(load_mask_png(tmp_path / "mask.png"), mask)
    drawn = np.zeros((37, 53, 3), np.uint8)
    drawn[mask] = (0, 0, 1)  # a faint colour is still drawn
    Image.fromarray(drawn).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([drawn, np.full((37, 53), 255, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(mask.astype(np.uint8) * 7).save(tmp_path / "grey.png")
    assert np.array_equal(load_mask_png(tmp_path / "rgb.png"), mask)
    assert np.array_equal(load_mask_png(tmp_path / "rgba.png"), mask)  # an opaque alpha is not the mask
    assert np.array_equal(load_mask_png(tmp_path / "grey.png"), mask)
    Image.fromarray(mask).save(tmp_path / "pillow_1bit.png")  # a 1-bit PNG another tool wrote, row filters and all
    assert np.array_equal(load_mask_png(tmp_path / "pillow_1bit.png"), mask)
    for shape in [(1, 1), (1, 9), (8, 8), (3, 17), (40, 1)]:  # rows of any length in bits
        small = np.random.default_rng(sum(shape)).random(shape) > 0.5
        save_mask_png(small, tmp_path / "small.png")
        assert np.array_equal(np.asarray(Image.open(tmp_path / "small.png")), small)
        assert np.array_equal(load_mask_png(tmp_path / "small.png"), small)
    import cv2

    old_writer = [cv2.IMWRITE_PNG_BILEVEL, 1, cv2.IMWRITE_PNG_COMPRESSION, 1]  # earlier runs' masks (OpenCV's)
    assert cv2.imwrite(str(tmp_path / "earlier.png"), mask.view(np.uint8) * np.uint8(255), old_writer)
    assert np.array_equal(load_mask_png(tmp_path / "earlier.png"), mask)
    whole = (tmp_path / "mask.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[:-12])  # no IEND: refused, as OpenCV refuses it
    with pytest.raises(ValueError, match="cut.png"):
        load_mask_png(tmp_path / "cut.png")
    damaged = bytearray(whole)
    damaged[60] ^= 0xFF  # inside the compressed pixels: the chunk's checksum no longer matches
    (tmp_path / "damaged.png").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="damaged.png"):
        load_mask_png(tmp_path / "damaged.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_mask_png(tmp_path / "broken.png")
    with pytest.raises(FileNotFoundError, match="gone.png"):
        load_mask_png(tmp_path / "gone.png")
