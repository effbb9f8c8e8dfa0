"""Attention heatmaps of a run's slides: the ``heatmaps`` stage of ``run`` and the ``heatmaps`` command.

Each slide is drawn by the CLAM of the fold that held it out (its test fold), so the map shows what
a model that never saw the slide attends to; slides no fold tested (e.g. training slides of a
fixed split) use fold 0 and say so in their caption and ``heatmap.json``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipelines.config import RunConfig
from pipelines.engine.run_dir import RunPaths, write_text
from pipelines.manifest import SlideEntry

CLAM_OF = {"teacher": "teacher", "reuse": "teacher", "retrain": "retrain"}  # strategy → the CLAM it applies


def drawable(cfg: RunConfig) -> list[str]:
    """Results rows whose attention can be drawn: teacher, reuse, retrain and End2end rows except FPT's."""
    from mil.strategies import strategy_rows

    return [row for row in strategy_rows(cfg.mil) if row in CLAM_OF or (row.startswith("end2end") and row != "end2end:fpt")]


def resolve_strategy(cfg: RunConfig, strategy: str | None = None) -> str:
    """The results row whose attention is drawn: the one asked for, or the first drawable row of the run."""
    rows = drawable(cfg)
    wanted = strategy or cfg.heatmaps.strategy
    if wanted is not None:
        if wanted not in rows:
            raise ValueError(f"heatmaps: strategy {wanted!r} is not a drawable row of this run; rows: {rows} "
                             "(FPT's End2end row is not drawn yet)")
        return wanted
    if not rows:
        raise ValueError(f"heatmaps: no drawable row among mil.strategies {cfg.mil.strategies}")
    return rows[0]


def wants_heatmap(cfg: RunConfig, entry: SlideEntry) -> bool:
    """Whether the ``heatmaps`` stage draws this slide (``heatmaps.slides``)."""
    choice = cfg.heatmaps.slides
    if choice == "test":
        return entry.split is None or entry.split == "test"
    if choice == "positive":
        return bool(entry.label) and entry.label not in cfg.heatmaps.negative_labels
    return choice == "all"


def heatmap_dir(paths: RunPaths, strategy: str, slide_id: str) -> Path:
    return paths.root / "heatmaps" / strategy.replace(":", "_") / slide_id


def _model_files(paths: RunPaths, strategy: str, fold: int) -> tuple[Path, Path | None]:
    """(CLAM weights, fine-tuned student weights or LoRA adapter — None unless End2end) of one fold."""
    models = paths.root / "models" / "mil"
    if strategy in CLAM_OF:
        return models / CLAM_OF[strategy] / f"fold_{fold}.safetensors", None
    stem = models / strategy.replace(":", "_") / f"fold_{fold}"
    suffix = "_student.adapter.safetensors" if strategy == "end2end:lora" else "_student.safetensors"
    student = stem.with_name(stem.name + suffix)
    return stem.with_name(stem.name + "_clam.safetensors"), student


def _encoder(cfg: RunConfig, paths: RunPaths, strategy: str, student_weights: Path | None, adapter: Path | None):
    """The encoder whose features the strategy's CLAM reads: teacher, distilled student, or End2end's fine-tuned student."""
    from pipelines.stages.features import cached_encoder, cached_student

    if strategy == "teacher":
        return cached_encoder(cfg.features.teacher.model_dump_json())
    if student_weights is None:
        st = (paths.student_dir / "student.safetensors").stat()
        return cached_student(str(paths.student_dir), (st.st_size, st.st_mtime_ns), cfg.distill.student.precision)[0]
    from safetensors.torch import load_file

    from distill.model import load_student

    encoder, _ = load_student(paths.student_dir, precision=cfg.distill.student.precision)  # a fresh copy to modify
    if strategy == "end2end:lora":
        from mil.finetune.lora import load_adapter

        load_adapter(encoder.model, adapter or student_weights)
    else:
        if not student_weights.exists():
            raise FileNotFoundError(f"{student_weights} is missing: the mil stage did not finish this fold")
        encoder.model.load_state_dict(load_file(str(student_weights)))
    encoder.model.eval()
    return encoder


def _fold_and_classes(paths: RunPaths, strategy: str, slide_id: str) -> tuple[int, bool, list[str]]:
    """(fold whose CLAM draws the slide, whether that fold held it out, class order) from the run's predictions."""
    predictions = paths.root / "results" / "predictions.csv"
    if not predictions.exists():
        raise FileNotFoundError(f"{predictions} is missing: run the mil stage before drawing heatmaps")
    with predictions.open(newline="") as f:
        reader = csv.DictReader(f)
        classes = [c[2:] for c in reader.fieldnames or [] if c.startswith("p_")]
        rows = [r for r in reader if r["strategy"] == strategy]
    tested = [int(r["fold"]) for r in rows if r["slide_id"] == slide_id]
    return (tested[0], True, classes) if tested else (0, False, classes)


def overlap_grid(cfg: RunConfig, tissue, meta: dict):
    """The tile grid of CLAM's second pass: the run's tiling with tiles overlapping by ``heatmaps.overlap``."""
    from wsi.tiling import tile_grid

    overlap = round(cfg.tiling.patch_size * cfg.heatmaps.overlap)
    tiling = cfg.tiling.model_copy(update={"overlap": min(overlap, cfg.tiling.patch_size - 1)})
    return tile_grid(tuple(meta["dimensions"]), meta["mpp"], tuple(meta["level_downsamples"]), tissue, tiling)


def embed(entry: SlideEntry, cfg: RunConfig, meta: dict, encoder, coords: np.ndarray, plan) -> np.ndarray:
    """Features of tiles embedded now (not stored): End2end's tuned students, overlapping second passes."""
    from features.extract import TileDataset, embed_tiles

    dataset = TileDataset.for_encoder(encoder, entry.slide_path, coords, plan, backend=cfg.slides.backend, mpp=meta["mpp"],
                                      slide_id=entry.slide_id)
    return embed_tiles(dataset, encoder, cfg.features)


def _overlap_pass(entry: SlideEntry, cfg: RunConfig, tissue, meta: dict, encoder, model, branch: int, first_raw):
    """CLAM's second pass: tiles overlapping by ``heatmaps.overlap``, embedded now (not stored), scored vs the first."""
    from mil.attention import slide_attention
    from mil.heatmaps import score_tiles

    grid = overlap_grid(cfg, tissue, meta)
    raw = slide_attention(model, embed(entry, cfg, meta, encoder, grid.coords, grid.plan), branch).raw
    return score_tiles(grid.coords, grid.plan.level0_size, raw, reference=first_raw)


def draw_slide(entry: SlideEntry, cfg: RunConfig, paths: RunPaths, *, strategy: str | None = None,
               class_name: str | None = None, adapter: Path | None = None) -> dict:
    """All heatmap files of one slide into ``OUT/heatmaps/<strategy>/<slide_id>/``; returns its metadata."""
    from features.store import open_store
    from mil.attention import slide_attention
    from mil.heatmaps import score_tiles
    from pipelines.stages.features import slide_grid, student_label
    from pipelines.stages.tissue import load_tissue

    strategy = resolve_strategy(cfg, strategy)
    fold, held_out, classes = _fold_and_classes(paths, strategy, entry.slide_id)
    class_name = class_name or cfg.heatmaps.class_name
    if class_name is not None and class_name not in classes:
        raise ValueError(f"heatmaps: class {class_name!r} is not one of the run's classes {classes}")
    if adapter is not None and strategy != "end2end:lora":
        raise ValueError(f"heatmaps: --adapter is for the end2end:lora row, not {strategy!r}")
    clam_weights, student_weights = _model_files(paths, strategy, fold)
    from mil.strategies import load_clam

    model = load_clam(cfg.mil, clam_weights, len(classes))
    grid = slide_grid(paths, cfg, entry.slide_id)  # the tiles the stored features cover
    tissue, meta = load_tissue(paths, entry.slide_id)
    encoder = None
    if student_weights is None:  # stored features
        label = cfg.features.teacher.label if strategy == "teacher" else student_label(cfg)
        store = open_store(paths.root, label, entry.slide_id)
        features, coords = store.load(np.float32)
    else:  # End2end: the fold's fine-tuned student re-embeds every tile
        encoder = _encoder(cfg, paths, strategy, student_weights, adapter)
        coords = grid.coords
        features = embed(entry, cfg, meta, encoder, coords, grid.plan)
    if len(features) == 0:
        raise ValueError(f"{entry.slide_id}: no tiles, so no attention to draw")
    attention = slide_attention(model, features, None if class_name is None else classes.index(class_name))
    scores = score_tiles(coords, grid.plan.level0_size, attention.raw)
    if cfg.heatmaps.overlap > 0:
        if encoder is None:  # re-embeds tiles the stored features did not cover: it must be the model that made them
            from features.extract import check_same_encoder

            encoder = _encoder(cfg, paths, strategy, None, None)
            check_same_encoder(encoder, store.attrs, f"features/{label}/{entry.slide_id}.zarr")
        scores = _overlap_pass(entry, cfg, tissue, meta, encoder, model, attention.branch, attention.raw)
    predicted = classes[attention.predicted]
    caption = (f"{entry.slide_id}: predicted {predicted} (p = {attention.probabilities[attention.predicted]:.3f})"
               f"{f', label {entry.label}' if entry.label else ''}; {strategy} CLAM, fold {fold}"
               f"{'' if held_out else ' (slide seen in training)'}{f'; adapter {adapter.name}' if adapter else ''}")
    extra = {"strategy": strategy, "fold": fold, "held_out": held_out, "label": entry.label, "predicted": predicted,
             "probabilities": {c: round(float(p), 6) for c, p in zip(classes, attention.probabilities)},
             "attention_class": classes[attention.branch] if model.multi_branch else None,
             "overlap": cfg.heatmaps.overlap, "adapter": str(adapter) if adapter else None,
             "params": cfg.heatmaps.model_dump(mode="json")}
    return write_slide_heatmap(heatmap_dir(paths, strategy, entry.slide_id), entry, cfg, meta, tissue, scores, grid.plan,
                               caption, extra)


def write_slide_heatmap(out_dir: Path, entry: SlideEntry, cfg: RunConfig, meta: dict, tissue, scores, plan, caption: str,
                        extra: dict) -> dict:
    """Every heatmap file of one slide into ``out_dir``, with the tissue outline beside tiles.geojson (import both
    in QuPath); returns heatmap.json's content. Used by ``run``'s and ``predict``'s heatmaps alike."""
    from mil.heatmaps import write_heatmap
    from pipelines.stages.tissue import tissue_outline_json
    from wsi.slide import open_slide

    with open_slide(entry.slide_path, slide_id=entry.slide_id, backend=cfg.slides.backend, mpp=meta["mpp"]) as slide:
        written = write_heatmap(out_dir, slide, entry.slide_id, scores, tissue.mask, cfg.heatmaps, caption=caption,
                                plan=plan, extra=extra)
    write_text(out_dir / "tissue.geojson", tissue_outline_json(tissue))
    return written


def heatmaps_stage(entry: SlideEntry, cfg: RunConfig, paths: RunPaths) -> dict:
    """The ``heatmaps`` stage: one slide's heatmaps from the run's configured strategy."""
    meta = draw_slide(entry, cfg, paths)
    return {"strategy": meta["strategy"], "fold": meta["fold"], "n_tiles": meta["n_tiles"], "warnings": []}


def read_run(out: Path) -> tuple[RunConfig, list[SlideEntry], RunPaths]:
    """A finished run's own config and manifest copies."""
    from pipelines.config import load_config
    from pipelines.manifest import read_manifest

    paths = RunPaths(Path(out))
    if not paths.config.exists():
        raise FileNotFoundError(f"{paths.config} is missing: {out} is not a run directory")
    return load_config(paths.config), read_manifest(paths.manifest), paths

