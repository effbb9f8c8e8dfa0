"""Per-slide stages: plain functions from a slide entry and the config to artifacts on disk.

Each writes its data files first and its metadata JSON last, all atomically, and returns that
metadata. A stage knows nothing of state, retries or scheduling; the runner does.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from features.store import store_path
from pipelines import __version__
from pipelines.artifacts import RunPaths, atomic_write, remove, write_image, write_json, write_npy, write_text
from pipelines.config import RunConfig
from pipelines.manifest import SlideEntry
from pipelines.task_context import TASK_FINGERPRINT, TASK_FORCED, progress_callback
from pipelines.tile_inspection import MAX_LISTED, blurred_fraction, drop_folds, inspect_grid, write_fold_shares
from wsi.artefacts import fold_mask
from wsi.errors import SlideError
from wsi.mask_override import find_override, load_override
from wsi.slide import open_slide
from wsi.tiling import ReadPlan, TileGrid, grid_overlay, tile_grid
from wsi.tissue import EXCLUDED_COLOURS, FLAGGED_COLOURS, TissueMask, load_mask_png, mask_from, mask_slide, qc_image, save_mask_png

log = logging.getLogger(__name__)


def tissue_stage(entry: SlideEntry, cfg: RunConfig, paths: RunPaths) -> dict:
    """Mask the tissue; write the QC thumbnail, the mask PNG and the slide's geometry and mpp."""
    with open_slide(entry.slide_path, slide_id=entry.slide_id, backend=cfg.slides.backend, mpp=entry.mpp,
                    default_mpp=cfg.slides.default_mpp) as slide:
        slide.max_unreadable_fraction = cfg.slides.max_unreadable_fraction
        tissue, overview = mask_slide(slide, cfg.tissue)
        override = find_override(cfg.tissue.mask_dir, entry.slide_id)
        if override is not None:  # a person's corrected mask replaces ours, exclusions included
            if override.parent == paths.tissue_meta(entry.slide_id).parent:
                raise SlideError(entry.slide_id, "tissue.mask_dir is this run's own tissue/ folder: copy the masks "
                                                 "you corrected to a folder of their own")
            try:
                corrected = load_override(override, tissue.mask.shape, tissue.downsample)
            except ValueError as exc:
                raise SlideError(entry.slide_id, f"tissue.mask_dir: {exc}") from exc
            tissue = mask_from(corrected, tissue.downsample)
            folds = fold_mask(overview, tissue.mask, slide.mpp * tissue.downsample[0], cfg.tissue.folds)
            if folds.any():  # folds are flagged in the corrected mask too: a person corrects what is tissue
                tissue.flagged["fold"] = folds
        unreadable = slide.unreadable_fraction
        meta = {
            "slide_id": entry.slide_id,
            "slide_path": str(entry.slide_path),
            "backend": slide.backend,
            "dimensions": list(slide.dimensions),
            "level_dimensions": [list(d) for d in slide.level_dimensions],
            "level_downsamples": list(slide.level_downsamples),
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
            "mpp_detail": slide.mpp_detail,
            "objective_power": slide.objective_power,
            "warnings": list(slide.warnings),
            "unreadable_fraction": unreadable,
            "unreadable": slide.unreadable[:MAX_LISTED],
            "n_unreadable_regions": len(slide.unreadable),
        }
        if slide.unreadable:
            first = slide.unreadable[0]
            what = (f"{len(slide.unreadable)} region(s) of level {first['level']} ({unreadable:.1%} of the slide) could "
                    f"not be decoded; first at level-0 ({first['x']}, {first['y']}): {first['error']}")
            if unreadable > cfg.slides.max_unreadable_fraction:
                raise SlideError(entry.slide_id, f"{what} — more than slides.max_unreadable_fraction "
                                                 f"({cfg.slides.max_unreadable_fraction:g})")
            meta["warnings"].append(f"{what}: masked as background")
            log.warning("%s: %s", entry.slide_id, meta["warnings"][-1])
    meta.update({
        "mask_shape": list(tissue.mask.shape),
        "mask_downsample": list(tissue.downsample),
        "tissue_fraction": tissue.tissue_fraction,
        "n_regions": tissue.n_regions,
        "n_holes": tissue.n_holes,
        "excluded": {kind: float(part.mean()) for kind, part in tissue.excluded.items()},  # share of the overview
        "flagged": {kind: float(part.sum() / max(1, tissue.mask.sum())) for kind, part in tissue.flagged.items()},  # of the tissue
        "mask_source": str(override) if override is not None else "computed",
        "params": cfg.tissue.model_dump(mode="json"),
        "version": __version__,
    })
    if tissue.n_regions == 0:
        message = "no tissue found: every tile stage downstream gets zero tiles"
        meta["warnings"].append(message)
        log.warning("%s: %s", entry.slide_id, message)
    write_image(paths.tissue_qc(entry.slide_id), qc_image(overview, tissue, cfg.tissue.qc_max_size))
    # every kind: a rerun that no longer finds (or looks for) one leaves no old file
    marked = [(paths.tissue_excluded(entry.slide_id, kind), tissue.excluded.get(kind)) for kind in EXCLUDED_COLOURS]
    marked += [(paths.tissue_flagged(entry.slide_id, kind), tissue.flagged.get(kind)) for kind in FLAGGED_COLOURS]
    for target, part in marked:
        if part is not None and part.any():
            atomic_write(target, lambda f, part=part: save_mask_png(part, f))
        else:
            remove(target)
    atomic_write(paths.tissue_mask(entry.slide_id), lambda f: save_mask_png(tissue.mask, f))
    write_text(paths.tissue_outline(entry.slide_id), tissue_outline_json(tissue))
    write_json(paths.tissue_meta(entry.slide_id), meta)
    return meta


def tissue_outline_json(tissue: TissueMask) -> str:
    """The mask's regions and holes as one QuPath annotation (GeoJSON, level-0 pixels), and each excluded kind
    (ink, bubble) or flagged kind (fold) as another, classified by its name capitalised (QuPath class ``Ink``,
    ``Bubble``, ``Fold``)."""
    from wsi.annotations import tissue_geojson

    collection = tissue_geojson(tissue.mask, tissue.downsample)
    for kind, part in (tissue.excluded | tissue.flagged).items():
        if part.any():
            collection["features"] += tissue_geojson(part, tissue.downsample, name=kind.capitalize())["features"]
    return json.dumps(collection, separators=(",", ":"))


def load_tissue(paths: RunPaths, slide_id: str) -> tuple[TissueMask, dict]:
    """The tissue stage's mask and metadata for ``slide_id``."""
    meta = json.loads(paths.tissue_meta(slide_id).read_text())
    mask = load_mask_png(paths.tissue_mask(slide_id))
    excluded = {kind: load_mask_png(paths.tissue_excluded(slide_id, kind)) for kind in meta.get("excluded", {})
                if paths.tissue_excluded(slide_id, kind).exists()}
    flagged = {kind: load_mask_png(paths.tissue_flagged(slide_id, kind)) for kind in meta.get("flagged", {})
               if paths.tissue_flagged(slide_id, kind).exists()}
    return TissueMask(mask, tuple(meta["mask_downsample"]), meta["n_regions"], meta["n_holes"], excluded, flagged), meta


def tiles_stage(entry: SlideEntry, cfg: RunConfig, paths: RunPaths) -> dict:
    """Tile grid at the target resolution from the tissue mask; with ``slides.verify_tiles`` every tile is then read
    once (undecodable ones leave the grid, focus is scored: :mod:`pipelines.tile_inspection`)."""
    tissue, slide_meta = load_tissue(paths, entry.slide_id)
    grid = tile_grid(tuple(slide_meta["dimensions"]), slide_meta["mpp"], tuple(slide_meta["level_downsamples"]),
                     tissue, cfg.tiling)
    meta = {"slide_id": entry.slide_id, **grid.metadata(), "slide_mpp": slide_meta["mpp"],
            "dimensions": slide_meta["dimensions"], "params": cfg.tiling.model_dump(mode="json"),
            "version": __version__, "warnings": []}
    grid, meta = drop_folds(cfg, tissue, grid, meta)
    if cfg.slides.verify_tiles:
        scores = np.zeros(0, np.float32)
        if len(grid.coords):
            grid, meta, scores = inspect_grid(entry, cfg, slide_meta, grid, meta)
        write_npy(paths.tile_sharpness(entry.slide_id), scores)
    else:
        remove(paths.tile_sharpness(entry.slide_id))
    if len(grid.coords) == 0:
        message = ("no tiles: every tile was left out (unreadable, below tiling.min_sharpness or above "
                   "tiling.max_fold_fraction)"
                   if meta.get("n_unreadable_tiles") or meta.get("n_blurry_dropped") or meta.get("n_fold_dropped") else
                   "no tiles: no part of the tissue mask reaches min_tissue_fraction" if tissue.n_regions else
                   "no tiles: no tissue")
        meta["warnings"].append(message)
        log.warning("%s: %s", entry.slide_id, message)
    write_fold_shares(paths.tile_folds(entry.slide_id), tissue, grid)
    qc = np.asarray(Image.open(paths.tissue_qc(entry.slide_id)).convert("RGB"))
    write_image(paths.tile_overlay(entry.slide_id), grid_overlay(qc, grid, tuple(slide_meta["dimensions"])))
    write_npy(paths.tile_coords(entry.slide_id), grid.coords)
    write_json(paths.tile_meta(entry.slide_id), meta)
    return meta


def load_tiles(paths: RunPaths, slide_id: str) -> TileGrid:
    """The tiles stage's grid for ``slide_id`` (coords N×2 level-0 x, y and the read plan)."""
    meta = json.loads(paths.tile_meta(slide_id).read_text())
    coords = np.load(paths.tile_coords(slide_id), allow_pickle=False)
    plan = ReadPlan(**{k: meta[k] for k in ReadPlan.__dataclass_fields__})
    return TileGrid(coords, np.full(len(coords), np.nan, np.float32), plan)


@lru_cache(maxsize=2)
def cached_encoder(spec_json: str):
    """One encoder per worker process and spec: built once, reused for every slide."""
    from features.encoders import EncoderConfig, create_encoder

    return create_encoder(EncoderConfig.model_validate_json(spec_json), field="features.teacher")


def extract_features(entry: SlideEntry, cfg: RunConfig, paths: RunPaths, encoder, label: str, extra_attrs: dict) -> dict:
    """Every tile of one slide through ``encoder`` into ``features/<label>/<slide_id>.zarr``."""
    from features.extract import TileDataset, encoder_attrs, extract_slide
    from features.zoo import mpp_mismatch

    grid = load_tiles(paths, entry.slide_id)
    slide_meta = json.loads(paths.tissue_meta(entry.slide_id).read_text())
    dataset = TileDataset.for_encoder(encoder, entry.slide_path, grid.coords, grid.plan, backend=cfg.slides.backend,
                                      mpp=slide_meta["mpp"], slide_id=entry.slide_id)
    attrs = {**encoder_attrs(encoder, grid.plan, TASK_FINGERPRINT.get()), **extra_attrs, "encoder_label": label}
    stats = extract_slide(dataset, encoder, store_path(paths.root, label, entry.slide_id), cfg.features, attrs)
    warnings = [w for w in [mpp_mismatch(encoder.zoo, grid.plan.target_mpp)] if w]
    for message in warnings:
        log.warning("%s: %s", entry.slide_id, message)
    return {**stats, "encoder": label, "dim": encoder.dim, "warnings": warnings}


def features_stage(entry: SlideEntry, cfg: RunConfig, paths: RunPaths) -> dict:
    """Teacher features for every tile into ``features/<teacher>/<slide_id>.zarr``; for a features-only slide,
    a check of its imported store."""
    if not entry.has_pixels:
        return imported_features_check(entry, cfg, paths)
    encoder = cached_encoder(cfg.features.teacher.model_dump_json())
    return extract_features(entry, cfg, paths, encoder, cfg.features.teacher.label, {})


def imported_features_check(entry: SlideEntry, cfg: RunConfig, paths: RunPaths) -> dict:
    """A features-only slide's teacher store: there, complete, with tiles (``wsi-pipeline import-features``)."""
    from features.store import open_store

    label = cfg.features.teacher.label
    try:
        store = open_store(paths.root, label, entry.slide_id)
    except FileNotFoundError:
        raise ValueError(f"{entry.slide_id}: no slide_path in slides.csv (line {entry.line}) and no imported features at "
                         f"{store_path(paths.root, label, entry.slide_id)}: run `wsi-pipeline import-features H5_DIR "
                         f"--out {paths.root} --encoder {label}` (the encoder name must be features.teacher's label)") from None
    if len(store) == 0:
        raise ValueError(f"{entry.slide_id}: its imported features have no tiles")
    return {"n_tiles": len(store), "dim": store.attrs["dim"], "imported_from": store.attrs.get("imported_from", ""),
            "encoder": label, "warnings": []}


def student_label(cfg: RunConfig) -> str:
    """Feature folder of the distilled student's (teacher-space) features."""
    return f"student_{cfg.distill.student.label}"


@lru_cache(maxsize=2)
def cached_student(model_dir: str, version: tuple, precision: str):
    """The distilled student, loaded once per worker process and model file version (size, mtime)."""
    from distill.model import load_student

    return load_student(Path(model_dir), precision=precision)


def student_features_stage(entry: SlideEntry, cfg: RunConfig, paths: RunPaths) -> dict:
    """The distilled student's teacher-space features into ``features/student_<name>/<slide_id>.zarr``."""
    weights = paths.student_dir / "student.safetensors"
    st = weights.stat()
    encoder, card = cached_student(str(paths.student_dir), (st.st_size, st.st_mtime_ns), cfg.distill.student.precision)
    extra = {"distilled_from": card["teacher"].get("label", ""), "student_card": str(paths.student_dir / "student.json")}
    return extract_features(entry, cfg, paths, encoder, student_label(cfg), extra)


def distill_stage(entries: list[SlideEntry], cfg: RunConfig, paths: RunPaths) -> dict:
    """EFCM stage 1: distil the student from the teacher's stored features (labels unused)."""
    from distill.trainer import SlideTiles, train
    from features.store import open_store
    from features.zoo import provenance

    dcfg = cfg.distill
    use = [e for e in entries if not (dcfg.exclude_test and e.split == "test")]
    if not use:
        raise ValueError("no slides to distil on (all are in the test split)")
    teacher = cfg.features.teacher.label
    rng = np.random.default_rng(dcfg.seed)
    per_slide = -(-(dcfg.max_train_tiles + dcfg.max_val_tiles) // len(use))  # bounded memory: sample before loading
    slides, dim, digests, precisions = [], None, {}, {}
    for entry in use:
        store = open_store(paths.root, teacher, entry.slide_id)
        digests.setdefault(store.attrs.get("weights_sha256"), entry.slide_id)
        precisions[entry.slide_id] = store.attrs.get("precision")
        if len(store) == 0:
            continue
        rows = np.sort(rng.choice(len(store), min(per_slide, len(store)), replace=False))
        meta = json.loads(paths.tissue_meta(entry.slide_id).read_text())
        slides.append(SlideTiles(entry.slide_id, entry.slide_path, meta["mpp"], load_tiles(paths, entry.slide_id).plan,
                                 store.coords[rows], np.asarray(store.features.oindex[rows, :], dtype=np.float16),
                                 cfg.slides.backend))
        dim = store.attrs["dim"]
    if not slides:
        raise ValueError("no teacher features to distil from (every slide has zero tiles)")
    if len(digests) > 1:  # targets from several models would mix feature spaces
        raise ValueError(f"the teacher stores come from {len(digests)} different models (e.g. slides "
                         f"{', '.join(digests.values())}): rerun the features stage (--force features)")
    if TASK_FORCED.get():  # --force distill: start over, never resume from the last run's checkpoint
        import shutil

        shutil.rmtree(paths.student_dir / "checkpoint", ignore_errors=True)
    report = progress_callback()
    on_epoch = None if report is None else (lambda record: report(done=record["epoch"], total=dcfg.epochs, unit="epoch",
                                                                  val_cosine=record.get("cosine"),
                                                                  worst_cluster_r2=record.get("worst_cluster_r2")))
    card = train(slides, dim, dcfg, paths.student_dir, fingerprint=TASK_FINGERPRINT.get() or "", on_epoch=on_epoch,
                 teacher={"label": teacher, "dim": dim, "spec": cfg.features.teacher.model_dump(mode="json"),
                          "weights": cfg.features.teacher.weights_source(),
                          "weights_sha256": next(iter(digests)), "provenance": provenance(cfg.features.teacher.model),
                          "random_weights": cfg.features.teacher.random_weights})
    best, verdict = card["metrics"]["best"], card["fidelity"]["verdict"]
    return {"n_slides": len(slides), "val_cosine": best.get("cosine"), "val_r2": best.get("r2"),
            "worst_cluster_r2": best.get("worst_cluster_r2"), "balanced_r2": best.get("balanced_r2"),
            "faithful": verdict["faithful"], "epochs_run": card["metrics"]["epochs_run"],
            "initial_cosine": card["metrics"]["initial"].get("cosine"), "precision": card["precision"],
            "loader": card["loader"],
            "warnings": [*([f"student: {verdict['message']}"] if verdict["faithful"] is False else []),
                         *filter(None, [precision_mix(precisions, "the teacher features distilled from")])]}


def precision_mix(precisions: dict[str, str | None], what: str) -> str | None:
    """A warning when a cohort's feature stores were computed at more than one precision (slide id → the precision
    its store records; ``auto`` resolves per worker: bf16 on one machine, fp32 on another), else None. One model's
    features differ slightly between precisions, so a CLAM or a student trained across them learns a shift."""
    groups: dict[str, list[str]] = {}
    for slide_id, precision in precisions.items():
        groups.setdefault(precision or "unrecorded", []).append(slide_id)
    if len(groups) < 2:
        return None
    parts = ", ".join(f"{p} ({len(ids)} slides, e.g. {ids[0]})" for p, ids in sorted(groups.items(), key=lambda g: -len(g[1])))
    return (f"{what} were computed at {len(groups)} precisions: {parts}; set the encoder's precision explicitly "
            "(not auto) and rerun the features (--force features) to make them one")


def qc_stage(entries: list[SlideEntry], cfg: RunConfig, paths: RunPaths) -> dict:
    """Cohort QC table ``qc/slides.csv``: per slide its reader, mpp and where it came from, tissue, tiles, unreadable
    parts and read plan; then a row per slide of the manifest that failed tissue or tiles, with the reason."""
    import csv
    import io

    from pipelines.manifest import read_manifest
    from pipelines.state import read_state

    columns = ["slide_id", "status", "label", "case_id", "backend", "width", "height", "mpp", "mpp_source", "mpp_detail",
               "tissue_fraction", "ink_fraction", "bubble_fraction", "fold_fraction", "n_regions", "n_holes", "n_tiles",
               "n_unreadable_tiles", "unreadable_fraction", "blurred_fraction", "n_blurry_dropped", "n_fold_tiles",
               "n_fold_dropped",
               "read_level", "read_size", "level0_size", "delivered_mpp", "warnings"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for entry in entries:
        tissue = json.loads(paths.tissue_meta(entry.slide_id).read_text())
        tiles = json.loads(paths.tile_meta(entry.slide_id).read_text())
        sharpness = paths.tile_sharpness(entry.slide_id)
        blurred = blurred_fraction(np.load(sharpness), cfg.tiling.blur_ratio) if sharpness.exists() else None
        warnings = tissue["warnings"] + tiles["warnings"]
        if blurred is not None and blurred > 0.1:  # a tenth of the tissue out of focus: worth a look
            warnings.append(f"{blurred:.1%} of the tiles are blurred (below {cfg.tiling.blur_ratio:g} × the slide's "
                            f"median sharpness)")
        writer.writerow({
            "slide_id": entry.slide_id, "status": "ok", "label": entry.label or "", "case_id": entry.case_id or "",
            "backend": tissue["backend"], "width": tissue["dimensions"][0], "height": tissue["dimensions"][1],
            "mpp": tissue["mpp"], "mpp_source": tissue["mpp_source"], "mpp_detail": tissue.get("mpp_detail", ""),
            "tissue_fraction": round(tissue["tissue_fraction"], 4), "n_regions": tissue["n_regions"],
            "ink_fraction": round(tissue.get("excluded", {}).get("ink", 0.0), 4),
            "bubble_fraction": round(tissue.get("excluded", {}).get("bubble", 0.0), 4),
            "fold_fraction": round(tissue.get("flagged", {}).get("fold", 0.0), 4),
            "n_fold_tiles": tiles.get("n_fold_tiles", 0), "n_fold_dropped": tiles.get("n_fold_dropped", 0),
            "n_holes": tissue["n_holes"], "n_tiles": tiles["n_tiles"], "n_unreadable_tiles": tiles.get("n_unreadable_tiles", 0),
            "unreadable_fraction": round(tissue.get("unreadable_fraction", 0.0), 4),
            "blurred_fraction": "" if blurred is None else round(blurred, 4),
            "n_blurry_dropped": tiles.get("n_blurry_dropped", 0),
            "read_level": tiles["read_level"], "read_size": tiles["read_size"], "level0_size": tiles["level0_size"],
            "delivered_mpp": round(tiles["delivered_mpp"], 4), "warnings": "; ".join(warnings),
        })
    included = {e.slide_id for e in entries}
    others = read_manifest(paths.manifest) if paths.manifest.exists() else []
    for entry in others:
        if entry.slide_id in included or not entry.has_pixels:
            continue
        for stage in ("tissue", "tiles"):
            state = read_state(paths, stage, entry.slide_id) or {}
            if state.get("status") == "failed":
                writer.writerow({"slide_id": entry.slide_id, "status": f"failed {stage}", "label": entry.label or "",
                                 "case_id": entry.case_id or "", "warnings": state.get("error", "")})
                break
    write_text(paths.qc_table, buffer.getvalue())
    return {"n_slides": len(entries), "slides": [e.slide_id for e in entries]}
