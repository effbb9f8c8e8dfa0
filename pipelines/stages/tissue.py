"""The tissue stage: the slide's tissue mask (artefacts excluded or flagged), its QC image and outline."""

from __future__ import annotations

import json
import logging

import numpy as np

from pipelines import __version__
from pipelines.config import RunConfig
from pipelines.engine.run_dir import RunPaths, atomic_write, remove, write_image, write_json, write_text
from pipelines.manifest import SlideEntry
from pipelines.stages.tile_inspection import MAX_LISTED
from wsi.artefacts import fold_mask
from wsi.errors import SlideError
from wsi.mask_override import find_override, load_override
from wsi.mask_png import load_mask_png, save_mask_png
from wsi.slide import open_slide
from wsi.tissue import TissueMask, mask_from, mask_slide
from wsi.tissue_qc import EXCLUDED_COLOURS, FLAGGED_COLOURS, qc_image

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
        "excluded": {kind: np.count_nonzero(part) / part.size for kind, part in tissue.excluded.items()},  # of the overview
        "flagged": {kind: np.count_nonzero(part) / max(1, np.count_nonzero(tissue.mask))
                    for kind, part in tissue.flagged.items()},  # share of the tissue
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
    from wsi.annotations import geojson_bytes, tissue_geojson

    collection = tissue_geojson(tissue.mask, tissue.downsample, arrays=True)
    for kind, part in (tissue.excluded | tissue.flagged).items():
        if part.any():
            collection["features"] += tissue_geojson(part, tissue.downsample, name=kind.capitalize(), arrays=True)["features"]
    return geojson_bytes(collection).decode()


def load_tissue(paths: RunPaths, slide_id: str, with_excluded: bool = True) -> tuple[TissueMask, dict]:
    """The tissue stage's mask and metadata for ``slide_id``; without the excluded parts' masks (ink, bubbles)
    unless ``with_excluded`` (the tile grid needs only the mask and the flagged folds)."""
    meta = json.loads(paths.tissue_meta(slide_id).read_text())
    mask = load_mask_png(paths.tissue_mask(slide_id))
    excluded = {kind: load_mask_png(paths.tissue_excluded(slide_id, kind)) for kind in meta.get("excluded", {})
                if with_excluded and paths.tissue_excluded(slide_id, kind).exists()}
    flagged = {kind: load_mask_png(paths.tissue_flagged(slide_id, kind)) for kind in meta.get("flagged", {})
               if paths.tissue_flagged(slide_id, kind).exists()}
    return TissueMask(mask, tuple(meta["mask_downsample"]), meta["n_regions"], meta["n_holes"], excluded, flagged), meta


