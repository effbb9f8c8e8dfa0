"""Tile grids: read-level arithmetic at 40× and 20× sources, tiles inside tissue, level alignment."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from wsi.demo_cohort import load_truth
from wsi.slide import open_slide
from wsi.tiling import TilingConfig, plan_for_input, plan_read, read_tile, tile_grid, tissue_fractions
from wsi.tissue import TissueMask, mask_slide

APERIO = (1.0, 4.0, 16.0, 32.0)


@pytest.mark.parametrize(
    "slide_mpp, downsamples, target, level, read_size, level0_size",
    [
        (0.25, APERIO, 0.5, 0, 512, 512),  # 40× → 20×: read 512 at level 0, resize to 256
        (0.5, APERIO, 0.5, 0, 256, 256),  # 20× → 20×: read as is
        (0.25, APERIO, 1.0, 1, 256, 1024),  # 40× → 10×: level 1 (4×) is exactly right
        (0.25, APERIO, 2.0, 1, 512, 2048),  # 40× → 5×: from level 1, halved
        (0.2527, APERIO, 0.5, 0, 507, 507),  # 39.6× scanner: read 507 px ≈ 256 at 0.5 µm/px
        (0.26, APERIO, 1.0, 1, 256, 1024),  # level 1 at 1.04 µm/px is within 5 %: no resize
        (0.5, APERIO, 0.25, 0, 128, 128),  # 20× → 40×: upsampled (warned)
    ],
)
def test_read_plan_arithmetic(slide_mpp, downsamples, target, level, read_size, level0_size):
    plan = plan_read(slide_mpp, downsamples, TilingConfig(target_mpp=target, patch_size=256))
    assert (plan.read_level, plan.read_size, plan.level0_size) == (level, read_size, level0_size)
    assert plan.level0_stride == level0_size
    assert plan.delivered_mpp == pytest.approx(target, rel=0.05)
    assert plan.upsampled == (target < slide_mpp)


def test_magnification_target_and_overlap():
    cfg = TilingConfig(target_magnification=20, patch_size=224, overlap=112)
    assert cfg.mpp == pytest.approx(0.5)
    plan = plan_read(0.25, APERIO, cfg)
    assert (plan.read_size, plan.level0_size, plan.level0_stride) == (448, 448, 224)
    plan1 = plan_read(0.25, APERIO, TilingConfig(target_mpp=1.0, patch_size=256, overlap=128))
    assert plan1.read_level == 1 and plan1.level0_stride == 512 and plan1.level0_stride % 4 == 0
    with pytest.raises(ValidationError, match="overlap"):
        TilingConfig(patch_size=256, overlap=256)
    with pytest.raises(ValidationError):
        TilingConfig(target_mpp=None, target_magnification=None)


def test_tissue_fraction_from_integral_image():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True
    tissue = TissueMask(mask, (16.0, 16.0), 1, 0)
    xs = np.array([0, 48, 80, 0])
    ys = np.array([0, 0, 0, 96])
    fractions = tissue_fractions(tissue, xs, ys, 64)  # 4×4 mask px squares
    np.testing.assert_allclose(fractions, [1.0, 0.5, 0.0, 1.0])


@pytest.mark.parametrize("name", ["demo_001.svs", "demo_002.tif"])
def test_tiles_lie_inside_tissue_and_are_level_aligned(cohort, demo_cfg, name):
    with open_slide(cohort / name) as slide:
        tissue, _ = mask_slide(slide, demo_cfg.tissue)
        grid = tile_grid(slide.dimensions, slide.mpp, slide.level_downsamples, tissue, demo_cfg.tiling)
        w, h = slide.dimensions
    truth, _, meta = load_truth(cohort / name)
    assert len(grid.coords) > 20
    size = grid.plan.level0_size
    assert size == (512 if name.endswith(".svs") else 256)
    assert (grid.coords >= 0).all() and (grid.coords[:, 0] + size <= w).all() and (grid.coords[:, 1] + size <= h).all()
    assert (grid.coords % int(grid.plan.read_downsample) == 0).all()
    assert len(np.unique(grid.coords, axis=0)) == len(grid.coords)
    gt = TissueMask(truth, (meta["downsample"], meta["downsample"]), 1, 0)
    gt_fraction = tissue_fractions(gt, grid.coords[:, 0], grid.coords[:, 1], size)
    assert gt_fraction.min() >= demo_cfg.tiling.min_tissue_fraction - 0.15
    assert gt_fraction.mean() > 0.6  # measured 0.73 on the small 20× slide: many edge tiles
    # and the tissue that is there is covered: most ground-truth tissue lies under some tile
    covered = np.zeros_like(truth)
    ds = meta["downsample"]
    for x, y in grid.coords:
        covered[y // ds:(y + size) // ds, x // ds:(x + size) // ds] = True
    assert covered[truth].mean() > 0.85


def test_read_tile_sizes_and_backends_agree(cohort, demo_cfg):
    with open_slide(cohort / "demo_003.svs", backend="openslide") as a, \
            open_slide(cohort / "demo_003.svs", backend="tiffslide") as b:
        tissue, _ = mask_slide(a, demo_cfg.tissue)
        cfg = TilingConfig(target_mpp=1.0, patch_size=128)  # read from level 1
        grid = tile_grid(a.dimensions, a.mpp, a.level_downsamples, tissue, cfg)
        assert grid.plan.read_level == 1
        for x, y in grid.coords[:5]:
            ta, tb = read_tile(a, x, y, grid.plan), read_tile(b, x, y, grid.plan)
            assert ta.shape == (128, 128, 3)
            np.testing.assert_array_equal(ta, tb)
        grid20 = tile_grid(a.dimensions, a.mpp, a.level_downsamples, tissue, demo_cfg.tiling)
        x, y = grid20.coords[0]
        tile = read_tile(a, x, y, grid20.plan)
        block_mean = a.read_region((x, y), 0, (512, 512)).reshape(256, 2, 256, 2, 3).astype(float).mean(axis=(1, 3))
        assert np.abs(tile - block_mean).max() <= 0.5  # the exact 2×2 area average, correctly rounded


def test_tiles_read_at_a_models_input_resolution(cohort, demo_cfg):
    """A 112-px model reads the 512-px level-0 tiles from the 4× level (1/16 of the pixels); a 224-px one
    still needs level 0. Same place on the slide, same picture at that resolution."""
    with open_slide(cohort / "demo_003.svs") as slide:
        tissue, _ = mask_slide(slide, demo_cfg.tissue)
        grid = tile_grid(slide.dimensions, slide.mpp, slide.level_downsamples, tissue, demo_cfg.tiling)
        plan = grid.plan
        assert (plan.read_level, plan.level0_size, plan.patch_size) == (0, 512, 256)
        small = plan_for_input(plan, slide.level_downsamples, 112)
        assert (small.read_level, small.read_size, small.patch_size, small.level0_size) == (1, 128, 112, 512)
        assert small.delivered_mpp == pytest.approx(0.25 * 512 / 112) and not small.upsampled
        assert plan_for_input(plan, slide.level_downsamples, 224).read_level == 0
        assert plan_for_input(plan, slide.level_downsamples, 128).read_level == 1  # exactly the 4× level's pixels
        assert plan_for_input(plan, slide.level_downsamples, 134).read_level == 1  # 5 % short: still that level
        assert plan_for_input(plan, slide.level_downsamples, 140).read_level == 0
        coarse = tile_grid(slide.dimensions, slide.mpp, slide.level_downsamples, tissue,
                           TilingConfig(target_mpp=1.0, patch_size=128)).plan  # tiles read at the 4× level
        big = plan_for_input(coarse, slide.level_downsamples, 224)  # a model larger than the tiles
        assert (big.read_level, big.read_size, big.upsampled) == (1, 128, True)  # never a finer level than the tiling's
        for x, y in grid.coords[:4]:
            fast = read_tile(slide, x, y, small).astype(float)
            full = read_tile(slide, x, y, plan_for_input(plan, (1.0,), 112)).astype(float)  # from level 0
            assert fast.shape == full.shape == (112, 112, 3)
            assert np.abs(fast - full).mean() < 6  # the scanner's own 4× level vs area-averaging level 0


def test_empty_mask_gives_no_tiles():
    empty = TissueMask(np.zeros((100, 100), bool), (16.0, 16.0), 0, 0)
    grid = tile_grid((1600, 1600), 0.25, APERIO, empty, TilingConfig())
    assert grid.coords.shape == (0, 2) and grid.metadata()["n_tiles"] == 0


def test_tissue_fraction_weights_partial_mask_pixels():
    mask = np.zeros((3, 3), bool)
    mask[:, 0] = True  # coarse mask: 1000 level-0 px per mask pixel
    tissue = TissueMask(mask, (1000.0, 1000.0), 1, 0)
    fractions = tissue_fractions(tissue, np.array([512, 744, 0]), np.array([0, 0, 2600]), 512)
    np.testing.assert_allclose(fractions, [488 / 512 * 1.0, 256 / 512, 1.0], atol=1e-6)


def test_rounded_level_downsample_uses_the_documented_rule(tmp_path):
    from wsi.tiff_writer import write_pyramid

    def texture(level, y0, x0, h, w):
        yy, xx = np.mgrid[y0:y0 + h, x0:x0 + w]
        return np.stack([(xx * 7) % 251, (yy * 5) % 241, (xx + yy) % 239], axis=2).astype(np.uint8)

    path = write_pyramid(tmp_path / "odd.svs", 3077, 4099, texture, quality=95)
    with open_slide(path, backend="tiffslide") as slide:
        ds = slide.level_downsamples[1]
        assert not float(ds).is_integer()  # 4099 / 1024 = 4.0029...
        everything = TissueMask(np.ones((10, 10), bool), (slide.dimensions[0] / 10, slide.dimensions[1] / 10), 1, 0)
        grid = tile_grid(slide.dimensions, 0.25, slide.level_downsamples, everything,
                         TilingConfig(target_mpp=1.0, patch_size=128, mpp_tolerance=0.05))
        assert grid.plan.read_level == 1 and grid.plan.read_size == 128
        level = slide.read_region((0, 0), 1, slide.level_dimensions[1])
        for x, y in grid.coords[::37]:
            xl, yl = int(x // ds), int(y // ds)
            assert xl % grid.plan.level_stride == 0 and yl % grid.plan.level_stride == 0
            np.testing.assert_array_equal(read_tile(slide, x, y, grid.plan), level[yl:yl + 128, xl:xl + 128])
