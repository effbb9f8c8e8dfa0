"""Slide access: both backends on real SVS/TIFF files, white outside the slide, mpp chain, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import write_glass_slide

from wsi.backends import open_reader, rgba_to_rgb_on_white
from wsi.errors import SlideError
from wsi.mpp import tiff_tag_mpp
from wsi.slide import open_slide


@pytest.mark.parametrize("name", ["demo_001.svs", "demo_002.tif"])
def test_openslide_and_tiffslide_agree_at_level_0(cohort, name):
    with open_slide(cohort / name, backend="openslide") as a, open_slide(cohort / name, backend="tiffslide") as b:
        assert a.dimensions == b.dimensions
        assert a.level_count == b.level_count == 3
        w, h = a.dimensions
        for x, y in [(0, 0), (1000, 777), (w // 2 + 13, h // 3 + 5), (w - 300, h - 200)]:
            ra = a.read_region((x, y), 0, (300, 300))
            rb = b.read_region((x, y), 0, (300, 300))
            assert ra.shape == rb.shape == (300, 300, 3)
            assert ra.dtype == np.uint8
            np.testing.assert_array_equal(ra, rb)


def test_backends_agree_at_level_aligned_locations_on_lower_levels(cohort):
    with open_slide(cohort / "demo_003.svs", backend="openslide") as a, \
            open_slide(cohort / "demo_003.svs", backend="tiffslide") as b:
        assert a.level_downsamples[1] == 4.0
        for x, y in [(0, 0), (4 * 301, 4 * 157)]:  # multiples of the level's downsample
            np.testing.assert_array_equal(a.read_region((x, y), 1, (200, 150)), b.read_region((x, y), 1, (200, 150)))


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_outside_the_slide_is_white_not_black_or_transparent(cohort, backend):
    with open_slide(cohort / "demo_000.svs", backend=backend) as slide:
        w, h = slide.dimensions
        region = slide.read_region((w - 100, h - 50), 0, (300, 200))
        assert region.shape == (200, 300, 3)
        assert (region[60:, :] == 255).all()  # below the slide
        assert (region[:, 110:] == 255).all()  # right of the slide
        assert region[:50, :100].mean() < 252  # the glass inside is not pure white
        before = slide.read_region((-64, -64), 0, (128, 128))
        assert (before[:64, :] == 255).all() and (before[:, :64] == 255).all()


def test_rgba_compositing_onto_white():
    rgba = np.array([[[200, 100, 50, 255], [0, 0, 0, 0], [100, 100, 100, 128]]], np.uint8)
    rgb = rgba_to_rgb_on_white(rgba)
    assert rgb[0, 0].tolist() == [200, 100, 50]
    assert rgb[0, 1].tolist() == [255, 255, 255]
    assert rgb[0, 2].tolist() == [177, 177, 177]  # 100·128/255 + 255·127/255


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_metadata_mpp_power_and_associated_images(cohort, backend):
    with open_slide(cohort / "demo_000.svs", backend=backend) as svs:
        assert svs.backend == backend
        assert svs.mpp == pytest.approx(0.25) and svs.mpp_source == "properties"
        assert svs.objective_power == 40
        assert {"label", "macro", "thumbnail"} <= set(svs.associated_image_names())
        label = svs.associated_image("label")
        assert label.ndim == 3 and label.shape[2] == 3
        with pytest.raises(SlideError, match="no associated image"):
            svs.associated_image("barcode")
    with open_slide(cohort / "demo_002.tif", backend=backend) as tif:
        assert tif.mpp == pytest.approx(0.5)
        assert tif.objective_power is None


def test_auto_backend_picks_tiffslide_for_aperio_and_generic_tiff(cohort):
    assert open_reader(cohort / "demo_000.svs").backend == "tiffslide"
    assert open_reader(cohort / "demo_002.tif").backend == "tiffslide"
    assert open_reader(cohort / "demo_000.svs", "openslide").backend == "openslide"
    opaque = np.full((2, 2, 4), 255, np.uint8)
    opaque[..., :3] = 17
    assert rgba_to_rgb_on_white(opaque).tolist() == [[[17] * 3] * 2] * 2


def test_mpp_chain_csv_override_then_default_then_error(cohort, tmp_path, caplog):
    with open_slide(cohort / "demo_000.svs", mpp=0.2627) as slide:
        assert slide.mpp == 0.2627 and slide.mpp_source == "csv"
    no_mpp = write_glass_slide(tmp_path / "nompp.tif", flavour="generic", mpp=None)
    with pytest.raises(SlideError) as err:
        open_slide(no_mpp, slide_id="case-7")
    assert err.value.slide == "case-7" and "no mpp" in err.value.reason and "default_mpp" in err.value.reason
    with open_slide(no_mpp, default_mpp=0.5) as slide:
        assert slide.mpp == 0.5 and slide.mpp_source == "default"
        assert any("default" in w for w in slide.warnings)
    assert "default" in caplog.text


def test_an_absurd_mpp_fails_the_slide_naming_value_and_source_but_print_dpi_is_skipped(tmp_path):
    nm_as_um = write_glass_slide(tmp_path / "nm.svs", mpp=250.0)  # a scanner that wrote nanometres
    with pytest.raises(SlideError, match=r"mpp 250 µm/px from properties \(openslide.mpp-x\) is not a scan resolution"):
        open_slide(nm_as_um)
    with pytest.raises(SlideError, match="0.01 given for this slide is not strictly between 0.05 and 20"):
        open_slide(cohort_free := write_glass_slide(tmp_path / "ok.svs"), mpp=0.01)
    with open_slide(cohort_free) as slide:
        assert slide.mpp_detail == "openslide.mpp-x"
    dpi72 = tmp_path / "dpi72.tif"
    tifffile.imwrite(dpi72, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb",
                     resolution=(72, 72), resolutionunit="INCH")
    with open_slide(dpi72, default_mpp=0.5) as slide:  # 352.778 µm/px (72 dpi) is a print resolution: skipped, noted
        assert (slide.mpp, slide.mpp_source) == (0.5, "default")
        assert any("ignored TIFF resolution tags giving 352.778 µm/px" in w for w in slide.warnings)


def test_tiff_resolution_tags_in_cm_and_inch(tmp_path):
    data = np.zeros((64, 64, 3), np.uint8)
    tifffile.imwrite(tmp_path / "cm.tif", data, resolution=(20000, 20000), resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "inch.tif", data, resolution=(50800, 50800), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "none.tif", data)
    assert tiff_tag_mpp(tmp_path / "cm.tif") == pytest.approx(0.5)
    assert tiff_tag_mpp(tmp_path / "inch.tif") == pytest.approx(0.5)
    assert tiff_tag_mpp(tmp_path / "none.tif") is None


def test_read_downsampled_matches_levels_and_box_filter(cohort):
    with open_slide(cohort / "demo_001.svs") as slide:
        level2 = slide.read_region((0, 0), 2, slide.level_dimensions[2])
        np.testing.assert_array_equal(slide.read_downsampled(16.0), level2)  # the level in one read
        np.testing.assert_array_equal(slide.read_downsampled(16.0, block=100, max_read=100), level2)  # in strips
        w, h = slide.dimensions
        over = slide.read_downsampled(32.0, block=70)  # not a level: box-filtered from level 2
        assert over.shape == (round(h / 32), round(w / 32), 3)
        expected = level2.reshape(level2.shape[0] // 2, 2, level2.shape[1] // 2, 2, 3).mean(axis=(1, 3))
        assert np.abs(over.astype(float) - expected).mean() < 2.0
        thumb = slide.thumbnail(500)
        assert max(thumb.shape[:2]) <= 500 and thumb.shape[1] > thumb.shape[0]


def test_strips_of_a_level_whose_downsample_is_not_whole_start_on_their_own_pixel():
    """A level of 2,875 × 2,057 under 46,000 × 32,914 (downsample 16.0005 × 16.0010, as Aperio's are): read in
    strips, each strip starts at its own level pixel, so the strips join into the level itself (rounding the
    level-0 start put every strip after the first a pixel early). The reader floors level-0 / downsample, as
    tiffslide does."""
    from wsi.slide import Slide, level0_of

    width0, height0, width, height = 46_000, 32_914, 2875, 2057
    downsample = (width0 / width + height0 / height) / 2
    level = np.arange(width * height, dtype=np.uint32).reshape(height, width)

    class FlooringReader:
        backend, level_count, properties = "test", 2, {}
        level_dimensions, level_downsamples = ((width0, height0), (width, height)), (1.0, downsample)

        def read_region(self, location, lvl, size):
            x, y = int(location[0] / downsample), int(location[1] / downsample)
            out = np.zeros((size[1], size[0]), np.uint32)
            part = level[y:y + size[1], x:x + size[0]]
            out[:part.shape[0], :part.shape[1]] = part
            return np.stack([(out >> shift & 255).astype(np.uint8) for shift in (0, 8, 16)], axis=-1)

        def close(self):
            pass

    truth = np.stack([(level >> shift & 255).astype(np.uint8) for shift in (0, 8, 16)], axis=-1)
    slide = Slide("fractional", Path("fractional.tif"), FlooringReader(), 0.25, "test")
    np.testing.assert_array_equal(slide.read_downsampled(downsample, max_read=1024), truth)
    for pixel in range(0, 5000, 7):
        for ds in (downsample, 4.0, 16.0, 3.9999999, 4.0000001):
            start = level0_of(pixel, ds)  # lands on the pixel, and is the first level-0 coordinate that does
            assert int(start / ds) == pixel and (start == 0 or int((start - 1) / ds) < pixel)


def test_a_flat_slide_is_masked_in_bounded_strips_like_its_pyramid(cohort, tmp_path):
    """A one-level TIFF: the overview is reduced from level 0 in reads of at most `max_read` px a side (never the
    whole level), and its tissue mask is the pyramidal file's, up to the reduction's rounding; the pyramidal demo
    file's own overview does not change when it is read in strips."""
    from wsi.tissue import TissueConfig, mask_slide
    from wsi.vendor_writers import write_format

    cfg = TissueConfig(preset="bwh_biopsy", area_reference_mpp=0.25)
    with open_slide(cohort / "demo_001.svs") as pyramid:
        strips = pyramid.read_downsampled(16.0, max_read=300)
        np.testing.assert_array_equal(strips, pyramid.read_downsampled(16.0))  # level 2 (16×) read whole or in strips
        reference, _ = mask_slide(pyramid, cfg)
        base = pyramid.read_region((0, 0), 0, pyramid.dimensions)
    flat = write_format("flat-tiff", tmp_path, "flat", [base], 0.25)
    with open_slide(flat) as slide:
        assert slide.level_count == 1
        sizes = []
        read = slide.reader.read_region
        slide.reader.read_region = lambda loc, level, size: sizes.append(size) or read(loc, level, size)
        mask, overview = mask_slide(slide, cfg)
    assert max(max(s) for s in sizes) <= 4096 and len(sizes) > 1
    assert overview.shape == strips.shape and np.abs(overview.astype(int) - strips).mean() < 5  # level 2 has its own noise
    assert mask.mask.shape == reference.mask.shape and (mask.mask != reference.mask).mean() < 0.01


def test_missing_not_a_slide_and_truncated_files_raise_slide_errors(cohort, tmp_path):
    with pytest.raises(SlideError, match="file not found"):
        open_slide(tmp_path / "nope.svs")
    fake = tmp_path / "notes.svs"
    fake.write_text("this is a text file, not a slide\n")
    with pytest.raises(SlideError, match="not a readable slide") as err:
        open_slide(fake, slide_id="notes")
    assert err.value.slide == "notes"
    truncated = tmp_path / "truncated.svs"
    shutil.copy(cohort / "demo_000.svs", truncated)
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 3)
    with pytest.raises(SlideError):
        with open_slide(truncated) as slide:  # opening or reading must fail, naming the slide
            slide.read_downsampled(16.0)


@pytest.mark.parametrize("name", ["demo_001.svs", "demo_002.tif"])
def test_tiffslide_direct_tile_reads_equal_its_zarr_reads(cohort, name):
    """The tiffslide backend reads tiled pages tile by tile with tifffile (no Zarr layer): same pixels, any
    region, every level, inside, across and outside the edges, and from several threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    from wsi.backends import TiffSlideReader

    reader, zarr_path = TiffSlideReader(cohort / name), TiffSlideReader(cohort / name, direct_tile_reads=False)
    assert reader.direct_levels == list(range(reader.level_count)), "the demo's pages are all directly readable"
    assert zarr_path.direct_levels == []
    rng = np.random.default_rng(7)
    requests = []
    for level in range(reader.level_count):
        ds, (w, h) = reader.level_downsamples[level], reader.level_dimensions[level]
        for _ in range(12):
            size = tuple(int(v) for v in rng.integers(1, 600, 2))
            requests.append(((int(rng.integers(-400, w * ds)), int(rng.integers(-400, h * ds))), level, size))
    with ThreadPoolExecutor(4) as pool:
        direct = list(pool.map(lambda r: reader.read_region(*r), requests))
    for request, got in zip(requests, direct):
        want = zarr_path.read_region(*request)
        assert got.shape == want.shape and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want, err_msg=str(request))
    # decoded tiles are kept (bounded) and reused: the same requests again, from the cache, give the same pixels
    assert 0 < reader._decoded.bytes <= reader._decoded.max_bytes
    cached = [reader.read_region(*r) for r in requests]
    for request, got, first in zip(requests, cached, direct):
        np.testing.assert_array_equal(got, first, err_msg=str(request))
    reader.close()
    zarr_path.close()


def test_decoded_tile_cache_stays_within_its_byte_budget():
    from wsi.backends import DecodedTiles

    cache = DecodedTiles(max_bytes=3 * 64 * 64 * 3)
    tiles = {i: np.full((64, 64, 3), i, np.uint8) for i in range(5)}
    for i in range(3):
        cache.put((0, i), tiles[i])
    assert cache.get((0, 0)) is tiles[0]  # now the most recently used
    cache.put((0, 3), tiles[3])  # drops the least recently used: tile 1
    assert cache.get((0, 1)) is None and cache.get((0, 0)) is tiles[0] and cache.get((0, 3)) is tiles[3]
    assert cache.bytes == 3 * tiles[0].nbytes
    cache.put((0, 9), np.zeros((128, 128, 3), np.uint8))  # larger than the whole budget: not kept
    assert cache.get((0, 9)) is None and cache.bytes == 3 * tiles[0].nbytes


def test_ome_tiff_mpp_from_its_ome_xml_and_its_subifd_pyramid(tmp_path):
    """An OME-TIFF whose only scale is the OME-XML's PhysicalSizeX (here in nm), its pyramid in SubIFDs: the mpp comes
    from the XML, `auto` opens it with the reader that sees the pyramid, and both levels give the written pixels."""
    base = np.random.default_rng(3).integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    half = base[::2, ::2].copy()
    path = tmp_path / "scan.ome.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(base, subifds=1, tile=(256, 256), photometric="rgb", compression="zlib",
                  metadata={"axes": "YXS", "PhysicalSizeX": 460.0, "PhysicalSizeXUnit": "nm",
                            "PhysicalSizeY": 460.0, "PhysicalSizeYUnit": "nm"})
        tif.write(half, subfiletype=1, tile=(256, 256), photometric="rgb", compression="zlib")
    with open_slide(path) as slide:
        assert (slide.mpp, slide.mpp_source) == (pytest.approx(0.46), "ome-xml")
        assert slide.backend == "tiffslide" and slide.level_dimensions == ((1024, 768), (512, 384))
        np.testing.assert_array_equal(slide.read_region((256, 128), 0, (300, 200)), base[128:328, 256:556])
        np.testing.assert_array_equal(slide.read_region((512, 256), 1, (100, 80)), half[128:208, 256:356])


def test_objective_power_is_the_last_resort_for_mpp(tmp_path, caplog):
    """An Aperio file with AppMag but no MPP: a configured default wins; without one the mpp is estimated from the
    objective (10 / 20× = 0.5 µm/px) with a warning that says so."""
    path = write_glass_slide(tmp_path / "appmag_only.svs", mpp=None, magnification=20.0)
    with open_slide(path, default_mpp=0.3) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.3, "default")
    with open_slide(path) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.5, "objective-power") and slide.objective_power == 20
        assert any("20× objective" in w for w in slide.warnings)
    assert "estimated 0.5 µm/px" in caplog.text


def test_a_corrupt_tile_fails_only_itself_when_threads_share_an_openslide_reader(cohort, tmp_path):
    """OpenSlide's errors are sticky per handle: two threads reading one slide, one of them hitting a corrupt tile,
    must not fail the other's good tiles (each thread reads through its own handle)."""
    from conftest import corrupt_jpeg_tiles, tissue_tile_indices

    from wsi.tiling import TilingConfig, inspect_tiles, plan_read

    path = tmp_path / "one_bad.svs"
    shutil.copy(cohort / "demo_001.svs", path)
    bad = tissue_tile_indices(cohort / "demo_001.svs", 2)
    corrupt_jpeg_tiles(path, level=0, indices=bad)
    with open_slide(path, backend="openslide") as slide:
        plan = plan_read(slide.mpp, slide.level_downsamples, TilingConfig(target_mpp=0.25, patch_size=256))
        across = -(-slide.dimensions[0] // 256)
        coords = np.array([(c * 256, r * 256) for r in range(slide.dimensions[1] // 256)
                           for c in range(slide.dimensions[0] // 256)])
        failed, scores = inspect_tiles(slide, coords, plan, workers=2)
        expected = {i for i, (x, y) in enumerate(coords) if (y // 256) * across + x // 256 in bad}
        assert set(failed) == expected and len(expected) == 2
        assert np.isfinite(scores).sum() + np.isnan(scores).sum() == len(coords)
        slide.read_region((0, 0), 0, (64, 64))  # this thread's handle works after its errors


def test_threads_reading_one_tiffslide_reader_touch_the_file_only_under_its_lock(cohort):
    """Direct tile reads share one file position: every seek and read, tifffile's own included (its lazily built
    JPEG decoder reads the file), must happen under the handle's lock, or one thread's seek lands another's read
    in the wrong place (seen as 'Not a JPEG file' on a good tile)."""
    from concurrent.futures import ThreadPoolExecutor

    from wsi.backends import TiffSlideReader

    reader = TiffSlideReader(cohort / "demo_001.svs")
    handle = reader._slide.ts_tifffile.filehandle
    unlocked, locked = [], []

    class Watched:  # the open file under tifffile's handle, noting any seek or read made without the lock
        def __init__(self, raw):
            self.raw = raw

        def __getattr__(self, name):
            attribute = getattr(self.raw, name)
            if name in ("seek", "read", "readinto"):
                (locked if handle.lock._is_owned() else unlocked).append(name)
            return attribute

    handle._fh = Watched(handle._fh)
    width, height = reader.level_dimensions[0]
    boxes = [(x, y) for y in range(0, height, 512) for x in range(0, width, 512)]
    with ThreadPoolExecutor(2) as pool:
        regions = list(pool.map(lambda box: reader.read_region(box, 0, (512, 512)), boxes))
    assert len(regions) == len(boxes) and not unlocked and len(locked) > len(boxes)  # the file was read, locked
    reader.close()
