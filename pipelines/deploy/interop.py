"""Run-level export/import of feature stores (the per-slide work is in ``features.export``)."""

from __future__ import annotations

from pathlib import Path

from features.export import export_h5, import_clam_h5
from features.store import FeatureStore, store_path
from pipelines.engine.run_dir import RunPaths
from pipelines.manifest import read_manifest, sanitize_slide_id


def export_run(out: Path, encoder: str, dest: Path, *, pt: bool = False, slides: list[str] | None = None) -> tuple[int, list[str]]:
    """Export every slide of the run that has a finished store; returns (exported, slides without one)."""
    entries = read_manifest(RunPaths(Path(out)).manifest)
    wanted = [e.slide_id for e in entries if not slides or e.slide_id in slides]
    written, missing = 0, []
    for slide_id in wanted:
        path = store_path(out, encoder, slide_id)
        try:
            store = FeatureStore.open(path)
        except (FileNotFoundError, ValueError):
            missing.append(slide_id)
            continue
        export_h5(store, dest, slide_id, pt=pt)
        written += 1
    return written, missing


def import_dir(h5_dir: Path, out: Path, encoder: str) -> int:
    """Import every ``*.h5`` of ``h5_dir`` (or ``h5_dir/h5_files``) into ``out/features/<encoder>/``."""
    h5_dir = Path(h5_dir)
    folder = h5_dir / "h5_files" if (h5_dir / "h5_files").is_dir() else h5_dir
    files = sorted(folder.glob("*.h5"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .h5 files")
    label = sanitize_slide_id(encoder)
    for file in files:
        import_clam_h5(file, store_path(out, label, sanitize_slide_id(file.stem)), encoder_label=label)
    return len(files)
