"""What the viewer knows of a finished run: its slides, their predictions and heatmaps, looked up by id.

Everything the viewer serves is found here from the run's own files (manifest, tissue metadata, QC
table, predictions, heatmap folders); no URL ever becomes a path. A training run holds one heatmap folder
per results row (``heatmaps/<row>/<slide>``) and its predictions in ``results/predictions.csv`` (each
slide from the fold that held it out); a ``predict`` run holds ``heatmaps/<slide>`` and
``predictions/<slide>.json``, shown as the row ``predict``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.config import RunConfig
from pipelines.engine.run_dir import RunPaths
from pipelines.manifest import SlideEntry

PREDICT_ROW = "predict"
FORMATS = {".svs": "Aperio SVS", ".ndpi": "Hamamatsu NDPI", ".vms": "Hamamatsu VMS", ".scn": "Leica SCN",
           ".bif": "Ventana BIF", ".mrxs": "3DHISTECH MRXS", ".svslide": "Sakura", ".czi": "Zeiss CZI", ".dcm": "DICOM-WSI",
           ".tif": "TIFF", ".tiff": "TIFF"}
GALLERY_SIZE = 8


@dataclass
class ViewerSlide:
    """One slide as the viewer shows it."""

    entry: SlideEntry
    meta: dict | None  # the tissue stage's metadata (None: the slide failed before it)
    qc: dict
    predictions: dict[str, dict] = field(default_factory=dict)  # results row → prediction record
    heatmaps: dict[str, Path] = field(default_factory=dict)  # results row → heatmap folder

    @property
    def slide_id(self) -> str:
        return self.entry.slide_id

    @property
    def size(self) -> tuple[int, int] | None:
        return None if self.meta is None else tuple(self.meta["dimensions"])


@dataclass
class ViewerRun:
    """A run directory's slides, with the paths of everything the viewer may read."""

    root: Path
    cfg: RunConfig
    paths: RunPaths
    kind: str  # "train" or "predict"
    classes: list[str]
    slides: dict[str, ViewerSlide]
    rows: list[str]  # results rows with heatmaps, in the run's order
    row_order: list[str]  # every results row of the run, in its order

    def slide(self, slide_id: str) -> ViewerSlide:
        """The slide of that id; ``KeyError`` for any other string (so a request never names a file)."""
        return self.slides[slide_id]


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _classes_of(rows: list[dict]) -> list[str]:
    return [name[2:] for name in (rows[0] if rows else {}) if name.startswith("p_")]


def _record(label: str | None, prediction: str | None, probabilities: dict | None, **extra) -> dict:
    correct = None if not label or not prediction else prediction == label
    return {"prediction": prediction, "probabilities": probabilities, "correct": correct, **extra}


def _train_predictions(paths: RunPaths, entries: dict[str, SlideEntry]) -> tuple[dict, list[str]]:
    rows = _read_csv(paths.root / "results" / "predictions.csv")
    classes = _classes_of(rows)
    found: dict[str, dict[str, dict]] = {}
    for r in rows:
        entry = entries.get(r["slide_id"])
        if entry is None:
            continue
        probabilities = {c: float(r[f"p_{c}"]) for c in classes}
        found.setdefault(r["slide_id"], {})[r["strategy"]] = _record(entry.label, r["prediction"], probabilities,
                                                                     fold=int(r["fold"]), held_out=True)
    return found, classes


def _predict_predictions(paths: RunPaths, entries: dict[str, SlideEntry]) -> tuple[dict, list[str]]:
    found, classes = {}, []
    for slide_id, entry in entries.items():
        path = paths.root / "predictions" / f"{slide_id}.json"
        if path.exists():
            record = json.loads(path.read_text())
            classes = classes or list(record.get("probabilities") or {})
            found[slide_id] = {PREDICT_ROW: _record(entry.label, record["prediction"], record["probabilities"])}
    return found, classes


def _heatmap_folders(paths: RunPaths, cfg: RunConfig, kind: str) -> dict[str, Path]:
    """results row → the folder holding its slides' heatmap folders."""
    base = paths.root / "heatmaps"
    if kind == "predict":
        return {PREDICT_ROW: base} if base.is_dir() else {}
    return {row: base / url_key(row) for row in _row_order(cfg) if (base / url_key(row)).is_dir()}


def _row_order(cfg: RunConfig) -> list[str]:
    from mil.strategies import strategy_rows

    return list(strategy_rows(cfg.mil))


def load_run(out: Path) -> ViewerRun:
    """Index a run directory (training or ``predict``) for the viewer."""
    from pipelines.stages.heatmaps import read_run
    from pipelines.stages.predict import predicting

    cfg, entries, paths = read_run(Path(out))
    kind = "predict" if predicting(cfg) else "train"
    by_id = {e.slide_id: e for e in entries}
    predictions, classes = (_predict_predictions if kind == "predict" else _train_predictions)(paths, by_id)
    qc = {r["slide_id"]: r for r in _read_csv(paths.qc_table)}
    folders = _heatmap_folders(paths, cfg, kind)
    slides = {}
    for entry in entries:
        meta_path = paths.tissue_meta(entry.slide_id)
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        slide = ViewerSlide(entry, meta, qc.get(entry.slide_id, {}), predictions.get(entry.slide_id, {}))
        for row, folder in folders.items():
            heatmap = folder / entry.slide_id
            if (heatmap / "tiles.csv").exists() and (heatmap / "heatmap.json").exists() and meta is not None:
                slide.heatmaps[row] = heatmap
                if row not in slide.predictions:  # drawn by a fold that trained on it: shown, and said so
                    drawn = json.loads((heatmap / "heatmap.json").read_text())
                    classes = classes or list(drawn.get("probabilities") or {})
                    slide.predictions[row] = _record(entry.label, drawn.get("predicted"), drawn.get("probabilities"),
                                                     fold=drawn.get("fold"), held_out=drawn.get("held_out", False))
        slides[entry.slide_id] = slide
    rows = [row for row in folders if any(row in s.heatmaps for s in slides.values())]
    return ViewerRun(Path(out), cfg, paths, kind, classes, slides, rows, list(folders) if kind == "predict" else _row_order(cfg))


def tile_scores(folder: Path) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """(coords N×2, tile side, raw scores, percentiles) from a heatmap folder's ``tiles.csv``."""
    rows = _read_csv(folder / "tiles.csv")
    if not rows:
        return np.zeros((0, 2), np.int64), int(json.loads((folder / "heatmap.json").read_text())["tile_size_level0"]), \
            np.zeros(0), np.zeros(0)
    coords = np.array([[int(r["x"]), int(r["y"])] for r in rows], np.int64)
    return (coords, int(rows[0]["size"]), np.array([float(r["score"]) for r in rows]),
            np.array([float(r["percentile"]) for r in rows]))


def attention_tiles(folder: Path, n: int = GALLERY_SIZE) -> dict:
    """The ``n`` highest- and lowest-attention tiles of a heatmap: rank, level-0 x, y, side, score, percentile."""
    coords, size, raw, percentile = tile_scores(folder)
    order = np.argsort(-raw, kind="stable")

    def pick(indices) -> list[dict]:
        return [{"rank": rank + 1, "x": int(coords[i, 0]), "y": int(coords[i, 1]), "size": size,
                 "score": round(float(raw[i]), 6), "percentile": round(float(percentile[i]), 3)} for rank, i in enumerate(indices)]

    return {"tile_size": size, "top": pick(order[:n]), "bottom": pick(order[::-1][:n])}


def url_key(row: str) -> str:
    """A results row as it appears in URLs and file names (``end2end:lora`` → ``end2end_lora``)."""
    return row.replace(":", "_")


def slide_record(run: ViewerRun, slide: ViewerSlide) -> dict:
    """One slide of ``api/slides.json`` (docs/viewer.md), with relative URLs."""
    from wsi.deepzoom import DziGeometry

    sid = slide.slide_id
    meta, qc = slide.meta or {}, slide.qc
    size = slide.size if slide.entry.slide_path is not None else None  # features-only slides have no pixels
    suffix = Path(slide.entry.slide_path).suffix.lower() if slide.entry.slide_path else ""
    geometry = DziGeometry(*size) if size else None
    warnings = list(dict.fromkeys(list(meta.get("warnings", [])) + [w for w in (qc.get("warnings") or "").split("; ") if w]))
    record = {"id": sid, "case": slide.entry.case_id, "label": slide.entry.label or None,
              "width": size[0] if size else None, "height": size[1] if size else None, "mpp": meta.get("mpp"),
              "mpp_source": meta.get("mpp_source"), "backend": meta.get("backend"),
              "format": FORMATS.get(suffix, suffix.lstrip(".")) or None,
              "n_tiles": int(qc["n_tiles"]) if qc.get("n_tiles") else None, "status": qc.get("status") or ("ok" if meta else "failed"),
              "warnings": warnings, "dzi": None if geometry is None else {"url": f"slide/{sid}_files/", **geometry.descriptor("jpeg")},
              "predictions": slide.predictions,
              "heatmaps": {row: {"dzi": {"url": f"heatmap/{url_key(row)}/{sid}_files/", **geometry.descriptor("png")},
                                 "attention": f"api/slides/{sid}/attention/{url_key(row)}.json"}
                           for row in run.rows if row in slide.heatmaps},
              "tissue": f"api/slides/{sid}/tissue.geojson" if run.paths.tissue_outline(sid).exists() else None,
              "tiles": f"api/slides/{sid}/tiles.json" if run.paths.tile_coords(sid).exists() else None}
    return record


def slides_document(run: ViewerRun, version: str = "") -> dict:
    """``api/slides.json``: the run and every slide (docs/viewer.md); ``version`` goes on every image URL."""
    from wsi.heatmap import colour_lut

    lut = colour_lut(run.cfg.heatmaps.cmap)
    stops = ["#" + bytes(int(v) for v in lut[round(i * 255 / 10)]).hex() for i in range(11)]
    default = run.cfg.heatmaps.strategy if run.cfg.heatmaps.strategy in run.rows else (run.rows[0] if run.rows else None)
    predicted = {row for s in run.slides.values() for row in s.predictions}
    order = run.rows + sorted(predicted - set(run.rows), key=lambda r: run.row_order.index(r) if r in run.row_order else 99)
    return {"run": {"name": run.root.name, "kind": run.kind, "classes": run.classes, "strategies": order,
                    "default_strategy": default, "colormap": {"name": run.cfg.heatmaps.cmap, "stops": stops},
                    "heatmap_opacity": run.cfg.heatmaps.alpha, "version": version},
            "slides": [slide_record(run, s) for s in run.slides.values()]}
