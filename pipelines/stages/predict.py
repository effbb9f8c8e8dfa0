"""``wsi-pipeline predict``: a model bundle on new slides, as a restartable run of its own.

A prediction run is a run directory whose config names a bundle (``predict.bundle``). Its stages:
tissue → tiles (the bundle's settings) → ``embed`` (the bundle's encoder, into
``features/<encoder>/``) → ``predict`` (the bundle's CLAMs: ``predictions/<slide>.json``) →
``predictions`` (``predictions.csv``, ``cases.csv`` when slides share a case_id, ``metrics.md``
when every slide has a label) and ``predict_heatmaps`` (``heatmaps/<slide>/``). The runner, state,
lock, ``status`` and ``--scheduler`` are the training run's.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

from pipelines.config import ConfigError, RunConfig
from pipelines.deploy.bundle import Bundle, BundleError, load_bundle
from pipelines.engine.run_dir import RunPaths, write_json, write_text
from pipelines.manifest import SlideEntry
from pipelines.stages.results import csv_text

# what a predict run takes from the user's --config; tissue, tiling and the models come from the bundle
USER_SECTIONS = ("slides", "runner", "features", "heatmaps", "predict")


def predicting(cfg: RunConfig) -> bool:
    """A prediction run (its config names a bundle), not a training run."""
    return cfg.predict.bundle is not None


@lru_cache(maxsize=4)
def _read_bundle(path: str, mtime_ns: int, verify: bool) -> Bundle:
    return load_bundle(Path(path), verify=verify)


def run_bundle(cfg: RunConfig, verify: bool = False) -> Bundle:
    """The bundle a prediction run uses, read once per process and version of bundle.json; ``verify``: its files
    checked against their sha256 (before a model is built from them)."""
    path = Path(cfg.predict.bundle)
    try:
        return _read_bundle(str(path), (path / "bundle.json").stat().st_mtime_ns, verify)
    except FileNotFoundError:
        raise BundleError(f"predict.bundle {path}: not a model bundle (no bundle.json)") from None


def bundle_inputs(cfg: RunConfig, part: str) -> list:
    """What enters a prediction stage's fingerprint from the bundle: the digest of its encoder or of its CLAMs."""
    return [run_bundle(cfg).digest(part)] if predicting(cfg) else []


@lru_cache(maxsize=2)
def _encoder(bundle: Bundle, device: str, precision: str):
    return bundle.encoder(device, precision)


@lru_cache(maxsize=2)
def _clams(bundle: Bundle, device: str):
    return bundle.clams(device)


def bundle_encoder(cfg: RunConfig):
    """The bundle's encoder, built once per worker process."""
    return _encoder(run_bundle(cfg, verify=True), cfg.predict.device, cfg.predict.precision)


def bundle_clams(cfg: RunConfig) -> list:
    return _clams(run_bundle(cfg, verify=True), cfg.predict.device)


def prediction_file(paths: RunPaths, slide_id: str) -> Path:
    return paths.root / "predictions" / f"{slide_id}.json"


def heatmap_folder(paths: RunPaths, slide_id: str) -> Path:
    return paths.root / "heatmaps" / slide_id


def embed_stage(entry: SlideEntry, cfg: RunConfig, paths: RunPaths) -> dict:
    """Every tile of the slide through the bundle's encoder, into ``features/<encoder>/<slide_id>.zarr``."""
    from pipelines.stages.features import extract_features
    from pipelines.stages.tiles import load_tiles

    bundle = run_bundle(cfg)
    extra = {"bundle": str(bundle.path), "bundle_encoder_digest": bundle.digest("encoder")}
    # a prediction run's tiles stage has checked the tiles (RunConfig.tile_check): its grid is final
    return extract_features(entry, cfg, paths, bundle_encoder(cfg), bundle.encoder_label, extra,
                            load_tiles(paths, entry.slide_id))


NO_TILES = "no tiles (no tissue reaches tiling.min_tissue_fraction; see qc/slides.csv): nothing to predict from"


def _bag(cfg: RunConfig, paths: RunPaths, slide_id: str):
    from features.store import open_store

    store = open_store(paths.root, run_bundle(cfg).encoder_label, slide_id)
    features, coords = store.load(np.float32)
    return store, features, coords


def predict_stage(entry: SlideEntry, cfg: RunConfig, paths: RunPaths) -> dict:
    """The bundle's CLAMs on the slide's features: class probabilities (mean over the CLAMs) and the predicted class.
    A slide without tiles is done, with no prediction and a warning, as in training."""
    from mil.attention import ensemble_attention

    bundle = run_bundle(cfg)
    _, features, _ = _bag(cfg, paths, entry.slide_id)
    if len(features) == 0:
        write_json(prediction_file(paths, entry.slide_id), {"slide_id": entry.slide_id, "n_tiles": 0, "prediction": None,
                                                            "probabilities": None, "warning": NO_TILES})
        return {"n_tiles": 0, "prediction": None, "warnings": [NO_TILES]}
    attention = ensemble_attention(bundle_clams(cfg), features)
    classes = bundle.classes
    record = {"slide_id": entry.slide_id, "n_tiles": len(features), "prediction": classes[attention.predicted],
              "probabilities": {c: round(float(p), 6) for c, p in zip(classes, attention.probabilities)},
              "members": [{"fold": fold, "probabilities": {c: round(float(p), 6) for c, p in zip(classes, m.probabilities)}}
                          for fold, m in zip(bundle.meta["clam"]["folds"], attention.members)],
              "bundle": str(bundle.path), "strategy": bundle.meta["strategy"]}
    write_json(prediction_file(paths, entry.slide_id), record)
    return {"n_tiles": len(features), "prediction": record["prediction"], "warnings": []}


def predictions_stage(entries: list[SlideEntry], cfg: RunConfig, paths: RunPaths) -> dict:
    """``predictions.csv`` (a row per slide), ``cases.csv`` (mean probabilities per case) and, when every slide
    has a label, ``metrics.csv`` / ``metrics.md`` (ACC, balanced ACC, AUC per slide and per case)."""
    bundle = run_bundle(cfg)
    classes = bundle.classes
    records = []
    for e in entries:  # labels and cases from slides.csv as it is now: adding labels reruns this stage only
        record = json.loads(prediction_file(paths, e.slide_id).read_text())
        records.append({**record, "label": e.label, "case_id": e.case_id or e.slide_id})
    labelled = all(r["label"] for r in records)
    rows = [{"slide_id": r["slide_id"], "case_id": r["case_id"], **({"label": r["label"]} if labelled else {}),
             "prediction": r["prediction"] or "", **{f"p_{c}": r["probabilities"][c] if r["probabilities"] else ""
                                                    for c in classes}, "n_tiles": r["n_tiles"]}
            for r in records]
    write_text(paths.root / "predictions.csv", csv_text(rows))
    cases: dict[str, list[dict]] = {}
    for r in records:
        if r["probabilities"]:  # a slide without tiles says nothing about its case
            cases.setdefault(r["case_id"], []).append(r)
    case_rows = []
    for case_id, members in cases.items():
        probs = np.mean([[m["probabilities"][c] for c in classes] for m in members], axis=0)
        labels = {m["label"] for m in members}
        case_rows.append({"case_id": case_id, "n_slides": len(members),
                          **({"label": labels.pop() if len(labels) == 1 else "mixed"} if labelled else {}),
                          "prediction": classes[int(probs.argmax())], **{f"p_{c}": round(float(p), 6) for c, p in zip(classes, probs)}})
    grouped = len(case_rows) < sum(1 for r in records if r["probabilities"])
    for name in ("cases.csv", "metrics.csv", "metrics.md"):  # tables that no longer apply (labels or cases removed)
        (paths.root / name).unlink(missing_ok=True)
    if grouped:
        write_text(paths.root / "cases.csv", csv_text(case_rows))
    empty = [r["slide_id"] for r in records if not r["probabilities"]]
    meta = {"n_slides": len(rows), "n_cases": len(case_rows),
            "warnings": [f"{len(empty)} slide(s) without tiles have no prediction: {', '.join(empty[:10])}"] if empty else []}
    if labelled:
        table = prediction_metrics([r for r in rows if r["prediction"]], case_rows if grouped else [], classes)
        write_text(paths.root / "metrics.csv", csv_text(table))
        write_text(paths.root / "metrics.md", metrics_markdown(table, bundle))
        meta["metrics"] = table
    return meta


def prediction_metrics(rows: list[dict], case_rows: list[dict], classes: list[str]) -> list[dict]:
    """ACC, balanced ACC and AUC of the predictions against the labels: per slide, and per case (when given)."""
    from mil.train import metrics

    table = []
    for level, items in (("slide", rows), ("case", case_rows)):
        items = [i for i in items if i.get("label") in classes]
        if not items:
            continue
        y = np.array([classes.index(i["label"]) for i in items])
        probs = np.array([[float(i[f"p_{c}"]) for c in classes] for i in items])
        table.append({"level": level, **metrics(y, probs, len(classes))})
    return table


def metrics_markdown(table: list[dict], bundle: Bundle) -> str:
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
    cv = bundle.meta["card"]["cv"]
    lines = [f"Bundle `{bundle.path}`: strategy {bundle.meta['strategy']}, classes {', '.join(bundle.classes)}; "
             f"its cross-validation AUC was {fmt(cv['auc_mean'])} ± {fmt(cv['auc_std'])}.", "",
             "| level | n | ACC | balanced ACC | AUC |", "|---|---|---|---|---|"]
    lines += [f"| {r['level']} | {r['n']} | {fmt(r['acc'])} | {fmt(r['bacc'])} | {fmt(r['auc'])} |" for r in table]
    return "\n".join(lines) + "\n"


def predict_heatmaps_stage(entry: SlideEntry, cfg: RunConfig, paths: RunPaths) -> dict:
    """The slide's attention heatmaps from the bundle's CLAMs into ``heatmaps/<slide_id>/`` (with its tissue outline)."""
    from features.extract import check_same_encoder
    from mil.attention import ensemble_attention, slide_attention
    from mil.heatmaps import score_tiles
    from pipelines.stages.heatmaps import embed, overlap_grid, write_slide_heatmap
    from pipelines.stages.tiles import load_tiles
    from pipelines.stages.tissue import load_tissue, tissue_outline_json

    bundle = run_bundle(cfg)
    classes, models = bundle.classes, bundle_clams(cfg)
    class_name = cfg.heatmaps.class_name
    if class_name is not None and class_name not in classes:
        raise ValueError(f"heatmaps.class_name {class_name!r} is not one of the bundle's classes {classes}")
    store, features, coords = _bag(cfg, paths, entry.slide_id)
    grid = load_tiles(paths, entry.slide_id)
    tissue, meta = load_tissue(paths, entry.slide_id)
    out_dir = heatmap_folder(paths, entry.slide_id)
    if len(features) == 0:  # nothing to draw: the outline, and a heatmap.json that says why
        write_text(out_dir / "tissue.geojson", tissue_outline_json(tissue))
        write_json(out_dir / "heatmap.json", {"slide_id": entry.slide_id, "n_tiles": 0, "note": NO_TILES})
        return {"n_tiles": 0, "warnings": [NO_TILES]}
    attention = ensemble_attention(models, features, None if class_name is None else classes.index(class_name))
    first = attention.scores()
    scores = score_tiles(coords, grid.plan.level0_size, first)
    if cfg.heatmaps.overlap > 0:  # CLAM's second pass, embedded now by the bundle's encoder, scored against the first
        encoder = bundle_encoder(cfg)
        check_same_encoder(encoder, store.attrs, f"features/{bundle.encoder_label}/{entry.slide_id}.zarr")
        second = overlap_grid(cfg, tissue, meta)
        more = embed(entry, cfg, meta, encoder, second.coords, second.plan)
        raws = [slide_attention(model, more, attention.branch).raw for model in models]
        scores = score_tiles(second.coords, second.plan.level0_size, attention.scores(raws), reference=first)
    predicted = classes[attention.predicted]
    # no label in the picture: adding labels later reruns the predictions table, not the heatmaps
    caption = (f"{entry.slide_id}: predicted {predicted} (p = {attention.probabilities[attention.predicted]:.3f}); "
               f"{bundle.meta['strategy']} bundle, {len(models)} CLAM{'s' if len(models) > 1 else ''}")
    extra = {"strategy": bundle.meta["strategy"], "bundle": str(bundle.path), "folds": bundle.meta["clam"]["folds"],
             "predicted": predicted,
             "probabilities": {c: round(float(p), 6) for c, p in zip(classes, attention.probabilities)},
             "attention_class": classes[attention.branch] if models[0].multi_branch else None,
             "score": "attention" if len(models) == 1 else f"mean within-slide attention percentile of {len(models)} CLAMs",
             "overlap": cfg.heatmaps.overlap, "params": cfg.heatmaps.model_dump(mode="json")}
    written = write_slide_heatmap(out_dir, entry, cfg, meta, tissue, scores, grid.plan, caption, extra)
    return {"n_tiles": written["n_tiles"], "warnings": []}


def predict_config(bundle: Bundle, user_config: Path | None = None) -> RunConfig:
    """The prediction run's config: the bundle's slide, tissue, tiling and feature settings; from ``user_config``
    only runner, slides, features (not the teacher), heatmaps and predict. Heatmaps: every slide, and with a
    student's bundle CLAM's overlapping second pass (overlap 0.5), cheap with a distilled encoder."""
    user: dict = {}
    if user_config is not None:
        try:
            user = yaml.safe_load(Path(user_config).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{user_config}: cannot read the config: {exc}") from None
        if not isinstance(user, dict):
            raise ConfigError(f"{user_config}: the top level must be a mapping of sections")
        other = sorted(set(user) - set(USER_SECTIONS))
        if other or "teacher" in (user.get("features") or {}):
            named = ", ".join(other) or "features.teacher"
            raise ConfigError(f"{user_config}: {named}: a predict run takes its models, tissue and tiling settings "
                              f"from the bundle; its config may set only {', '.join(USER_SECTIONS)}")
    settings = bundle.meta["settings"]
    base = {"slides": settings["slides"], "tissue": settings["tissue"], "tiling": settings["tiling"],
            "features": settings["features"],
            "heatmaps": {"slides": "all", "overlap": 0.5 if bundle.cheap_encoder else 0.0},
            "mil": {"strategies": ["teacher"]}, "predict": {"bundle": str(bundle.path)}}
    merged = {k: ({**base.get(k, {}), **(user.get(k) or {})}) for k in {*base, *user}}
    merged["predict"]["bundle"] = str(bundle.path)
    from pydantic import ValidationError

    try:
        return RunConfig.model_validate(merged)
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{user_config or bundle.path / 'bundle.json'}: invalid predict config: {fields}") from None


def check_predict_slides(bundle: Bundle, entries: list[SlideEntry]) -> None:
    """Before any task runs: every slide has a file, and every label is one of the bundle's classes."""
    without = [e.slide_id for e in entries if not e.has_pixels]
    if without:
        raise ValueError(f"predict needs slide files: {len(without)} row(s) of slides.csv have no slide_path "
                         f"({', '.join(without[:5])})")
    unknown = [f"{e.slide_id} (line {e.line}): {e.label!r}" for e in entries if e.label and e.label not in bundle.classes]
    if unknown:
        raise ValueError(f"labels not among the bundle's classes {bundle.classes}: {'; '.join(unknown[:5])}")
    labelled = sum(1 for e in entries if e.label)
    if 0 < labelled < len(entries):
        raise ValueError(f"{labelled} of {len(entries)} slides have a label: give every slide one (metrics) or none")
