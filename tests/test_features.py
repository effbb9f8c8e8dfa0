"""Feature extraction: encoder registry and weights, streaming into Zarr, interop export/import."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from features.encoders import EncoderConfig, WeightsError, create_encoder, load_state_dict
from features.export import export_h5, import_clam_h5
from features.extract import ExtractionConfig, TileDataset, encoder_attrs, extract_slide
from features.store import FeatureStore, open_store, store_path
from pipelines.config import RunConfig
from wsi.slide import open_slide
from wsi.tiling import TilingConfig, read_tile, tile_grid
from wsi.tissue import mask_slide

BIOPSY = RunConfig.model_validate({"tissue": {"preset": "bwh_biopsy", "area_reference_mpp": 0.25}})


@pytest.fixture(scope="module")
def vit_tiny():
    return create_encoder(EncoderConfig(model="vit_tiny", seed=0))


@pytest.fixture(scope="module")
def slide_tiles(cohort):
    path = cohort / "demo_001.svs"
    with open_slide(path) as slide:
        tissue, _ = mask_slide(slide, BIOPSY.tissue)
        grid = tile_grid(slide.dimensions, slide.mpp, slide.level_downsamples, tissue, TilingConfig(target_mpp=1.0, patch_size=128))
        return path, grid, slide.mpp


def test_registry_presets_dims_and_pooling():
    assert create_encoder(EncoderConfig(model="resnet18", seed=0)).dim == 512
    trunc = create_encoder(EncoderConfig(model="resnet50_trunc", seed=0, input_size=64))
    assert trunc.dim == 1024  # CLAM's ResNet-50 truncated after layer3
    mean_pool = create_encoder(EncoderConfig(model="vit_tiny", seed=0, pool="mean"))
    cls_pool = create_encoder(EncoderConfig(model="vit_tiny", seed=0))
    x = torch.randint(0, 255, (2, 224, 224, 3), dtype=torch.uint8)
    torch.manual_seed(0)
    assert mean_pool.dim == cls_pool.dim == 192
    assert mean_pool.model.global_pool == "avg" and cls_pool.model.global_pool == "token"
    assert mean_pool(x).shape == (2, 192)
    with pytest.raises(ValueError, match="cls token"):
        create_encoder(EncoderConfig(model="resnet18", seed=0, pool="cls"))
    with pytest.raises(ValueError, match="cannot build"):
        create_encoder(EncoderConfig(model="no_such_model_v9", seed=0))
    assert EncoderConfig(model="hf-hub:MahmoodLab/UNI").label == "MahmoodLab_UNI"


def test_local_safetensors_weights_are_loaded_and_pickles_refused(tmp_path):
    from safetensors.torch import save_file

    source = create_encoder(EncoderConfig(model="resnet18", seed=0))
    state = {k: v.clone() + 0.01 for k, v in source.model.state_dict().items() if v.is_floating_point()}
    save_file(state, tmp_path / "r18.safetensors")
    loaded = create_encoder(EncoderConfig(model="resnet18", weights=tmp_path / "r18.safetensors"))
    some_key = next(iter(state))
    assert torch.equal(loaded.model.state_dict()[some_key], state[some_key])

    torch.save({"state_dict": source.model.state_dict()}, tmp_path / "ok.pth")  # tensors only: allowed
    assert create_encoder(EncoderConfig(model="resnet18", weights=tmp_path / "ok.pth")).dim == 512

    torch.save(source.model, tmp_path / "evil.pth")  # a whole pickled module: loading it would run arbitrary code
    with pytest.raises(WeightsError, match="refused: not loadable with torch.load\\(weights_only=True\\)"):
        load_state_dict(tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="does not fit"):
        create_encoder(EncoderConfig(model="vit_tiny", weights=tmp_path / "r18.safetensors"))
    with pytest.raises(WeightsError, match="not found"):
        load_state_dict(tmp_path / "missing.safetensors")


def test_pipeline_features_equal_a_direct_forward_pass(slide_tiles, vit_tiny, tmp_path):
    path, grid, mpp = slide_tiles
    assert grid.plan.read_level == 1 and len(grid.coords) > 40
    dataset = TileDataset(path, grid.coords, grid.plan, mpp=mpp)
    cfg = ExtractionConfig(batch_size=16, num_workers=2, loader_min_tiles=0, chunk_rows=32)  # two loader processes
    out = tmp_path / "store.zarr"
    stats = extract_slide(dataset, vit_tiny, out, cfg, encoder_attrs(vit_tiny, grid.plan, "fp-123"))
    assert stats["n_tiles"] == len(grid.coords)
    store = FeatureStore.open(out)
    features, coords = store.load()
    np.testing.assert_array_equal(coords, grid.coords)
    with open_slide(path, backend="tiffslide") as slide:  # read independently, other backend
        tiles = torch.from_numpy(np.stack([read_tile(slide, x, y, grid.plan) for x, y in grid.coords[:20]]))
    direct = vit_tiny(tiles).numpy()
    np.testing.assert_allclose(features[:20], direct, atol=2e-3 * np.abs(direct).max(), rtol=1e-2)
    attrs = store.attrs
    assert attrs["dim"] == 192 and attrs["dtype"] == "float16" and attrs["fingerprint"] == "fp-123"
    assert attrs["patch_size"] == 128 and attrs["target_mpp"] == 1.0 and attrs["read_level"] == 1
    assert attrs["encoder"]["model"] == "vit_tiny" and store.features.dtype == np.float16
    assert store.features.chunks[0] == 32
    chunks = list(store.iter_chunks())
    assert sum(len(f) for f, _ in chunks) == len(grid.coords) and len(chunks) == -(-len(grid.coords) // 32)


def _loader_kind_in_a_daemonic_process(queue) -> None:
    from features.tile_loader import resolve_loader

    queue.put(resolve_loader("auto"))


def test_loader_threads_give_the_processes_features_and_are_chosen_where_processes_cannot_start(slide_tiles, vit_tiny,
                                                                                                  tmp_path):
    """A daemonic process (a `dask worker`'s) may not start loader processes: auto reads there with threads, which
    give the same features in the same order; a tile's read error surfaces at its batch."""
    import multiprocessing

    from features.tile_loader import ThreadBatches, resolve_loader

    path, grid, mpp = slide_tiles
    dataset = TileDataset(path, grid.coords, grid.plan, mpp=mpp)
    stores = {}
    for kind in ("processes", "threads"):
        cfg = ExtractionConfig(batch_size=8, num_workers=2, loader_min_tiles=0, loader=kind)
        stats = extract_slide(dataset, vit_tiny, tmp_path / f"{kind}.zarr", cfg, encoder_attrs(vit_tiny, grid.plan))
        assert stats["loader"] == kind
        stores[kind] = FeatureStore.open(tmp_path / f"{kind}.zarr").load()
    np.testing.assert_array_equal(stores["threads"][0], stores["processes"][0])
    np.testing.assert_array_equal(stores["threads"][1], grid.coords)
    assert resolve_loader("auto") == "processes"  # pytest's own process is not daemonic
    queue = multiprocessing.get_context("spawn").Queue()
    child = multiprocessing.get_context("spawn").Process(target=_loader_kind_in_a_daemonic_process, args=(queue,),
                                                         daemon=True)
    child.start()
    assert queue.get(timeout=60) == "threads"
    child.join()

    class Failing:
        def __len__(self):
            return 10

        def __getitem__(self, i):
            if i == 7:
                raise ValueError("tile 7 does not decode")
            return torch.tensor([i])

    batches = iter(ThreadBatches(Failing(), batch_size=3, threads=2, ahead=4))
    assert next(batches).flatten().tolist() == [0, 1, 2] and next(batches).flatten().tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="tile 7"):
        next(batches)


def test_zero_tiles_give_an_empty_valid_store_and_failures_leave_nothing(slide_tiles, vit_tiny, tmp_path):
    path, grid, mpp = slide_tiles
    empty = TileDataset(path, np.zeros((0, 2), np.int64), grid.plan, mpp=mpp)
    extract_slide(empty, vit_tiny, tmp_path / "empty.zarr", ExtractionConfig(), encoder_attrs(vit_tiny, grid.plan))
    store = FeatureStore.open(tmp_path / "empty.zarr")
    assert len(store) == 0 and store.features.shape == (0, 192) and store.coords.shape == (0, 2)
    assert store.load()[0].shape == (0, 192)

    outside = TileDataset(tmp_path / "gone.svs", grid.coords[:3], grid.plan, mpp=mpp)
    with pytest.raises(Exception, match="file not found"):
        extract_slide(outside, vit_tiny, tmp_path / "broken.zarr", ExtractionConfig(num_workers=0), {})
    assert not (tmp_path / "broken.zarr").exists()
    assert not list(tmp_path.glob(".broken.zarr*"))


def test_a_checking_read_leaves_out_undecodable_and_blurred_tiles_and_stores_each_tiles_focus(cohort, vit_tiny, tmp_path):
    """The features read as the slide's tile check: the same undecodable tiles and focus scores as the tiles task's
    own pass (``inspect_tiles``), those tiles left out of the store with their coordinates, the focus stored beside
    the features; too many unreadable tiles fail the slide before any store is written."""
    import shutil

    from conftest import corrupt_jpeg_tiles, tissue_tile_indices

    from features.extract import TileChecks, UnreadableTiles
    from wsi.tiling import inspect_tiles

    path = shutil.copy(cohort / "demo_001.svs", tmp_path / "damaged.svs")
    broken = tissue_tile_indices(cohort / "demo_001.svs", 3)  # from the truth mask beside the original
    corrupt_jpeg_tiles(path, level=0, indices=broken)
    with open_slide(path) as slide:
        across = -(-slide.dimensions[0] // 256)
        grid = tile_grid(slide.dimensions, slide.mpp, slide.level_downsamples,
                         mask_slide(slide, BIOPSY.tissue)[0], TilingConfig(target_mpp=0.5, patch_size=128))
        assert grid.plan.read_level == 0 and grid.plan.read_size == 256
        hit = [np.flatnonzero((grid.coords[:, 0] // 256 == i % across) & (grid.coords[:, 1] // 256 == i // across))
               for i in broken]
        rows = np.unique(np.concatenate([*hit, np.arange(0, len(grid.coords), max(1, len(grid.coords) // 30))]))
        coords = grid.coords[rows]
        bad, scores = inspect_tiles(slide, coords, grid.plan)
    assert len(bad) == 3  # one grid tile on each corrupted TIFF tile

    dataset = TileDataset(path, coords, grid.plan, mpp=0.25, check=True)
    limit = float(np.nanmedian(scores))  # half the tiles are "blurred" against this bar
    checks = TileChecks(min_sharpness=limit, max_unreadable_fraction=0.5)
    out = tmp_path / "checked.zarr"
    extract_slide(dataset, vit_tiny, out, ExtractionConfig(batch_size=8, num_workers=2, loader="threads",
                                                           loader_min_tiles=0), encoder_attrs(vit_tiny, grid.plan), checks)
    assert checks.unreadable.keys() == bad.keys() and all(checks.unreadable.values())
    read = np.array([i not in bad for i in range(len(coords))])
    np.testing.assert_array_equal(checks.all_sharpness()[read], scores[read])
    kept = read & ~(scores < limit)
    store = FeatureStore.open(out)
    np.testing.assert_array_equal(store.coords, coords[kept])
    np.testing.assert_array_equal(store.sharpness, scores[kept])
    plain = tmp_path / "plain.zarr"
    extract_slide(TileDataset(path, coords[kept], grid.plan, mpp=0.25), vit_tiny, plain, ExtractionConfig(num_workers=0),
                  encoder_attrs(vit_tiny, grid.plan))
    np.testing.assert_array_equal(store.load()[0], FeatureStore.open(plain).load()[0])  # the same features, row by row
    assert FeatureStore.open(plain).sharpness is None

    strict = TileChecks(max_unreadable_fraction=2 / len(coords))
    with pytest.raises(UnreadableTiles, match=f"3 of {len(coords)} tissue tiles"):
        extract_slide(TileDataset(path, coords, grid.plan, mpp=0.25, check=True), vit_tiny, tmp_path / "strict.zarr",
                      ExtractionConfig(num_workers=0), encoder_attrs(vit_tiny, grid.plan), strict)
    assert not (tmp_path / "strict.zarr").exists() and not list(tmp_path.glob(".strict.zarr*"))


def test_h5_export_in_clam_layout_and_import_round_trip(slide_tiles, vit_tiny, tmp_path):
    path, grid, mpp = slide_tiles
    out = tmp_path / "s.zarr"
    extract_slide(TileDataset(path, grid.coords[:10], grid.plan, mpp=mpp), vit_tiny, out, ExtractionConfig(num_workers=0),
                  encoder_attrs(vit_tiny, grid.plan))
    store = FeatureStore.open(out)
    h5_file, pt_file = export_h5(store, tmp_path / "export", "slide_a", pt=True)
    assert h5_file == tmp_path / "export" / "h5_files" / "slide_a.h5"
    with h5py.File(h5_file, "r") as f:
        assert f["features"].shape == (10, 192) and f["features"].dtype == np.float32
        assert f["coords"].shape == (10, 2)
        np.testing.assert_array_equal(f["coords"][:], grid.coords[:10])
        attrs = dict(f["coords"].attrs)
        assert attrs["patch_level"] == 1 and attrs["patch_size"] == grid.plan.read_size
        assert attrs["patch_size_level0"] == grid.plan.level0_size
    bag = torch.load(pt_file, weights_only=True)
    assert bag.shape == (10, 192)
    np.testing.assert_allclose(bag.numpy(), store.load()[0])

    n = import_clam_h5(h5_file, tmp_path / "imported.zarr", encoder_label="vit_tiny")
    back = FeatureStore.open(tmp_path / "imported.zarr")
    assert n == 10 and back.attrs["read_level"] == 1
    np.testing.assert_allclose(back.load()[0], store.load()[0], atol=1e-3)
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_dataset("feats", data=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="no `features` dataset"):
        import_clam_h5(tmp_path / "bad.h5", tmp_path / "x.zarr", encoder_label="x")


def test_features_stage_in_the_pipeline_and_export_command(cohort, tmp_path):
    (tmp_path / "slides.csv").write_text(f"slide_path,slide_id\n{cohort / 'demo_002.tif'},tif\n")
    (tmp_path / "run.yaml").write_text("tissue: {preset: bwh_biopsy, area_reference_mpp: 0.25}\n"
                                       "features: {teacher: {model: resnet18, seed: 0}, num_workers: 0}\n")
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "pipelines.cli"]
    run = subprocess.run([*cli, "run", tmp_path / "slides.csv", "--config", tmp_path / "run.yaml", "--out", out,
                          "--until", "features"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    store = open_store(out, "resnet18-random-seed0", "tif")
    assert store.features.shape[1] == 512 and len(store) == len(np.load(out / "tiles" / "tif.coords.npy"))
    state = json.loads((out / "state" / "features" / "tif.json").read_text())
    assert store.attrs["fingerprint"] == state["fingerprint"]
    assert store_path(out, "resnet18-random-seed0", "tif") == out / "features" / "resnet18-random-seed0" / "tif.zarr"
    export = subprocess.run([*cli, "export", out, "--format", "h5", "--pt"], capture_output=True, text=True)
    assert export.returncode == 0, export.stderr
    with h5py.File(out / "export" / "resnet18-random-seed0" / "h5_files" / "tif.h5", "r") as f:
        assert f["features"].shape == (len(store), 512)
    assert (out / "export" / "resnet18-random-seed0" / "pt_files" / "tif.pt").exists()
    imported = subprocess.run([*cli, "import-features", out / "export" / "resnet18-random-seed0", "--out", tmp_path / "other",
                               "--encoder", "clam_r18"], capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    back = open_store(tmp_path / "other", "clam_r18", "tif")
    np.testing.assert_allclose(back.load()[0], store.load()[0], atol=1e-3)
