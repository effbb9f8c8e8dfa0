"""Teacher-baseline accuracy and attention heatmaps on a 24-slide demo cohort with planted tumour."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import geojson
import numpy as np
import pytest
from PIL import Image
from scipy.stats import percentileofscore
from sklearn.metrics import roc_auc_score

from mil.attention import percentile_of, slide_attention
from wsi.demo_cohort import load_truth
from wsi.heatmap import blend, resize_mask, score_map
from wsi.slide import open_slide

CLI = [sys.executable, "-m", "pipelines.cli"]


def _slide_file(folder: Path, slide_id: str) -> Path:
    return next(p for p in folder.glob(f"{slide_id}.*") if p.suffix in (".svs", ".tif"))


def _tiles_csv(path: Path) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    rows = list(csv.DictReader(path.open()))
    coords = np.array([[int(r["x"]), int(r["y"])] for r in rows])
    score, percentile = (np.array([float(r[key]) for r in rows]) for key in ("score", "percentile"))
    return coords, int(rows[0]["size"]), score, percentile


# ---------------------------------------------------------------- rendering and scoring, small and exact


def test_score_map_averages_overlaps_and_leaves_uncovered_pixels_empty():
    coords = np.array([[0, 0], [50, 0], [400, 400]])
    heat = score_map(coords, 100, np.array([10.0, 30.0, 90.0]), (60, 60), downsample=10.0)
    assert heat[2, 2] == 10 and heat[2, 7] == 20 and heat[2, 12] == 30  # tile 1 only, both, tile 2 only
    assert heat[45, 45] == 90 and np.isnan(heat[30, 30]) and np.isnan(heat[2, 20])
    blurred = score_map(coords, 100, np.array([10.0, 30.0, 90.0]), (60, 60), downsample=10.0, blur_sigma=2)
    assert np.isnan(blurred[30, 30]) and 10 < blurred[2, 7] < 30  # normalised: no pull towards 0 at edges
    assert np.nanmin(blurred) >= 10 - 1e-4 and np.nanmax(blurred) <= 90 + 1e-4


def test_blend_colours_only_scored_tissue():
    background = np.full((20, 30, 3), 240, np.uint8)
    scores = np.full((20, 30), np.nan, np.float32)
    scores[:, :20] = 80.0
    tissue = np.zeros((20, 30), bool)
    tissue[:, 10:] = True
    out = blend(background, scores, tissue, alpha=0.5)
    assert (out[:, :10] == 240).all() and (out[:, 20:] == 240).all()  # background; tissue without a score
    assert (out[:, 10:20] != 240).any(axis=-1).all()


def test_percentiles_match_scipy_and_a_second_pass_uses_the_first_pass_scale():
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=50).round(1), rng.normal(size=20)
    assert np.allclose(percentile_of(first, first), [percentileofscore(first, s, kind="mean") for s in first])
    assert np.allclose(percentile_of(second, first), [percentileofscore(first, s, kind="mean") for s in second])
    assert percentile_of(np.array([first.max() + 1]), first)[0] == 100


@pytest.mark.parametrize("multi_branch", [False, True])
def test_chunked_attention_matches_the_model_and_picks_the_branch(multi_branch):
    import torch

    from mil.clam import CLAM

    torch.manual_seed(0)
    model = CLAM(32, 3, multi_branch=multi_branch).eval()
    bag = np.random.default_rng(1).normal(size=(101, 32)).astype(np.float32)
    with torch.inference_mode():
        out = model(torch.from_numpy(bag))
    chunked = slide_attention(model, bag, batch=7)
    assert np.allclose(chunked.probabilities, torch.softmax(out["logits"], 1)[0].numpy(), atol=1e-5)
    branch = chunked.predicted if multi_branch else 0
    assert chunked.branch == branch and np.allclose(chunked.raw, out["attention"][branch].numpy(), atol=1e-5)
    if multi_branch:
        other = slide_attention(model, bag, class_index=2, batch=7)
        assert other.branch == 2 and np.allclose(other.raw, out["attention"][2].numpy(), atol=1e-5)


@pytest.mark.parametrize("multi_branch", [False, True])
def test_an_ensemble_averages_probabilities_and_scores_tiles_by_mean_percentile(multi_branch):
    import torch

    from mil.attention import ensemble_attention
    from mil.clam import CLAM

    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(CLAM(16, 3, multi_branch=multi_branch).eval())
    rng = np.random.default_rng(2)
    bag, more = rng.normal(size=(40, 16)).astype(np.float32), rng.normal(size=(25, 16)).astype(np.float32)
    alone = [slide_attention(m, bag) for m in models]
    ensemble = ensemble_attention(models, bag)
    assert np.allclose(ensemble.probabilities, np.mean([a.probabilities for a in alone], axis=0))
    assert ensemble.predicted == int(ensemble.probabilities.argmax())
    assert ensemble.branch == (ensemble.predicted if multi_branch else 0)  # every member on the ensemble's class
    raws = [slide_attention(m, bag, ensemble.branch).raw for m in models]
    assert np.allclose(ensemble.scores(), np.mean([percentile_of(r, r) for r in raws], axis=0))
    second = [slide_attention(m, more, ensemble.branch).raw for m in models]  # a second pass: on each member's scale
    assert np.allclose(ensemble.scores(second), np.mean([percentile_of(s, r) for s, r in zip(second, raws)], axis=0))
    single = ensemble_attention(models[:1], bag)
    assert np.array_equal(single.scores(), alone[0].raw) and np.allclose(single.probabilities, alone[0].probabilities)


def test_config_selects_slides_and_rejects_a_strategy_the_run_lacks(tmp_path):
    from pipelines.config import RunConfig
    from pipelines.engine.plan import build_plan
    from pipelines.engine.run_dir import RunPaths
    from pipelines.manifest import SlideEntry
    from pipelines.stages.table import STAGES

    entries = [SlideEntry("a", tmp_path / "a.svs", 2, "tumor", split="test"),
               SlideEntry("b", tmp_path / "b.svs", 3, "normal", split="test"),
               SlideEntry("c", tmp_path / "c.svs", 4, "tumor", split="train")]
    for choice, expected in (("all", ["a", "b", "c"]), ("test", ["a", "b"]), ("positive", ["a", "c"]), ("none", [])):
        cfg = RunConfig.model_validate({"heatmaps": {"slides": choice}})
        plan = build_plan(STAGES, entries, cfg, RunPaths(tmp_path / "out"))
        assert [t.key for t in plan.values() if t.stage == "heatmaps"] == expected
        assert all(t.deps == ["results/_cohort"] for t in plan.values() if t.stage == "heatmaps")
    teacher_only = build_plan(STAGES, entries, RunConfig.model_validate({"mil": {"strategies": ["teacher"]}}), RunPaths(tmp_path / "o2"))
    assert {t.stage for t in teacher_only.values()} == {"tissue", "tiles", "features", "qc", "mil", "results", "heatmaps"}
    with pytest.raises(ValueError, match="heatmaps.strategy 'retrain' is not a drawable results row"):
        RunConfig.model_validate({"mil": {"strategies": ["teacher"]}, "heatmaps": {"strategy": "retrain"}})


# ---------------------------------------------------------------- the 24-slide run


def test_run_without_student_strategies_skips_distillation(teacher_run):
    _, out, result = teacher_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "state" / "distill").exists() and not (out / "state" / "student_features").exists()
    assert len(list((out / "state" / "heatmaps").glob("*.json"))) == 24


def test_teacher_baseline_reaches_auc_0_9_on_held_out_slides(teacher_run):
    _, out, _ = teacher_run
    summary = {r["strategy"]: r for r in csv.DictReader((out / "results" / "summary.csv").open())}
    assert float(summary["teacher"]["auc_mean"]) >= 0.9, summary["teacher"]
    predictions = list(csv.DictReader((out / "results" / "predictions.csv").open()))
    assert sorted(r["slide_id"] for r in predictions) == [f"demo_{i:03d}" for i in range(24)]  # each held out once
    pooled = roc_auc_score([r["label"] == "tumor" for r in predictions], [float(r["p_tumor"]) for r in predictions])
    assert pooled >= 0.9


def test_attention_localises_the_planted_tumour(teacher_run):
    """Pixel-level AUC of each positive slide's percentile map against its ground-truth tumour mask."""
    folder, out, _ = teacher_run
    aucs = []
    for heat_dir in sorted((out / "heatmaps" / "teacher").iterdir()):
        meta = json.loads((heat_dir / "heatmap.json").read_text())
        if meta["label"] != "tumor":
            continue
        tissue, tumour, _ = load_truth(_slide_file(folder, heat_dir.name))
        coords, size, _, percentile = _tiles_csv(heat_dir / "tiles.csv")
        shape = tuple(meta["overview_shape"])
        heat = score_map(coords, size, percentile, shape, meta["overview_downsample"])
        truth, inside = resize_mask(tumour, shape), resize_mask(tissue, shape) & ~np.isnan(heat)
        aucs.append(roc_auc_score(truth[inside], heat[inside]))
    assert len(aucs) == 12
    # measured on two clean runs: median 0.90 both times; mean 0.86 and 0.79. A map blind to the tumour
    # scores 0.5; the tiles' own tumour fractions (the best a tile-level map can do) 0.985. On slides
    # this small some normal tiles share the top percentiles with the tumour, and on one or two
    # slides per run the CLAM reaches its decision from normal tissue (AUC 0.16–0.32 there).
    assert np.median(aucs) >= 0.85 and np.mean(aucs) >= 0.7, np.round(aucs, 3)


def test_geojson_is_valid_level0_and_one_feature_per_tile(teacher_run):
    folder, out, _ = teacher_run
    heat_dir = out / "heatmaps" / "teacher" / "demo_001"
    collection = geojson.loads((heat_dir / "tiles.geojson").read_text())
    assert collection.is_valid and collection["type"] == "FeatureCollection"
    coords = np.load(out / "tiles" / "demo_001.coords.npy")
    size = json.loads((out / "tiles" / "demo_001.json").read_text())["level0_size"]
    assert len(collection["features"]) == len(coords)
    with open_slide(_slide_file(folder, "demo_001")) as slide:
        width, height = slide.dimensions
    _, _, score, percentile = _tiles_csv(heat_dir / "tiles.csv")
    for feature, (x, y), s, p in zip(collection["features"], coords, score, percentile):
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert (ring[0] == (x, y)).all() and (ring[2] == (x + size, y + size)).all() and (ring[0] == ring[-1]).all()
        assert ring[:, 0].min() >= 0 and ring[:, 0].max() <= width and ring[:, 1].max() <= height
        m = feature["properties"]["measurements"]
        assert feature["properties"]["objectType"] == "detection"
        assert m["attention"] == pytest.approx(s, abs=1e-4) and m["attention_percentile"] == pytest.approx(p, abs=1e-4)
    # the tissue outline beside it: the run's tissue/<id>.geojson, one annotation with every region and hole
    outline = geojson.loads((heat_dir / "tissue.geojson").read_text())
    assert outline.is_valid and outline == geojson.loads((out / "tissue" / "demo_001.geojson").read_text())
    tissue_meta = json.loads((out / "tissue" / "demo_001.json").read_text())
    (region,) = outline["features"]
    assert len(region["geometry"]["coordinates"]) == tissue_meta["n_regions"]
    vertices = np.array([xy for polygon in region["geometry"]["coordinates"] for ring in polygon for xy in ring])
    assert vertices.min() >= 0 and vertices[:, 0].max() <= width and vertices[:, 1].max() <= height


def test_overlay_has_the_thumbnail_size_and_untouched_background(teacher_run):
    folder, out, _ = teacher_run
    heat_dir = out / "heatmaps" / "teacher" / "demo_003"
    meta = json.loads((heat_dir / "heatmap.json").read_text())
    overlay = np.asarray(Image.open(heat_dir / "overlay.png"))
    with open_slide(_slide_file(folder, "demo_003")) as slide:
        thumbnail = slide.read_downsampled(meta["overview_downsample"])
    assert overlay.shape == thumbnail.shape and max(overlay.shape[:2]) == 1024
    from pipelines.engine.run_dir import RunPaths

    mask = np.asarray(Image.open(RunPaths(out).tissue_mask("demo_003"))).astype(bool)
    tissue = resize_mask(mask, overlay.shape[:2])
    assert (overlay[~tissue] == thumbnail[~tissue]).all()  # background and holes untouched
    assert (overlay[tissue] != thumbnail[tissue]).any(axis=-1).mean() > 0.5  # most tissue coloured
    figure = Image.open(heat_dir / "heatmap.png")
    assert figure.width > overlay.shape[1] and figure.height > overlay.shape[0]  # colour bar and caption


def test_top_tiles_are_the_highest_and_lowest_attention(teacher_run):
    _, out, _ = teacher_run
    heat_dir = out / "heatmaps" / "teacher" / "demo_005"
    meta = json.loads((heat_dir / "heatmap.json").read_text())
    _, _, score, _ = _tiles_csv(heat_dir / "tiles.csv")
    top = [t for t in meta["top_tiles"] if t["kind"] == "top"]
    bottom = [t for t in meta["top_tiles"] if t["kind"] == "bottom"]
    assert len(top) == len(bottom) == 3
    assert top[0]["score"] == pytest.approx(score.max()) and bottom[0]["score"] == pytest.approx(score.min())
    image = np.asarray(Image.open(heat_dir / top[0]["file"]))
    assert image.shape == (256, 256, 3)


def test_heatmaps_command_second_pass_and_resume(teacher_run, tmp_path):
    _, out, _ = teacher_run
    first = _tiles_csv(out / "heatmaps" / "teacher" / "demo_007" / "tiles.csv")
    result = subprocess.run([*CLI, "heatmaps", str(out), "--slide", "demo_007", "--overlap", "0.5", "--width", "512",
                             "--cmap", "coolwarm"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "demo_007: predicted" in result.stdout
    coords, size, score, percentile = _tiles_csv(out / "heatmaps" / "teacher" / "demo_007" / "tiles.csv")
    assert len(coords) > 2 * len(first[0]) and size == first[1]  # tiles every half tile
    assert set(map(tuple, first[0])) <= set(map(tuple, coords))
    assert np.allclose(percentile, percentile_of(score, first[2]))  # on the first pass's scale
    bad = subprocess.run([*CLI, "heatmaps", str(out), "--slide", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nope" in bad.stderr
    again = subprocess.run([*CLI, "run", str(out / "manifest.csv"), "--config", str(out / "run.yaml"), "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "up-to-date" in again.stderr
