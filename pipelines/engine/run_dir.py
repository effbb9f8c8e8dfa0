"""Run-directory paths and atomic writes: a crash never leaves a file that looks finished."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from wsi.files import (
    atomic_write,
    fsync_dir,
    remove,
    write_bytes,
    write_image,
    write_json,
    write_npy,
    write_png,
    write_text,
)

__all__ = ["RunPaths", "atomic_write", "fsync_dir", "remove", "sweep_temporaries", "write_bytes", "write_image", "write_json",
           "write_npy", "write_png", "write_text"]


def sweep_temporaries(root: Path) -> list[Path]:
    """Remove what interrupted writers left: ``.<name>.*.tmp`` files and dirs, ``.<name>.old-*`` dirs.

    Only call this while holding the run's lock: then no writer of this run can be using them, and a task of
    an earlier, killed run that still writes is fenced (``pipelines.runner.run_task``): its rename will fail or
    be refused, never land.
    """
    import shutil

    removed = []
    for path in sorted(Path(root).rglob(".*")):
        if not (path.name.endswith(".tmp") or ".old-" in path.name) or not path.exists():
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@dataclass(frozen=True)
class RunPaths:
    """Where each artifact of a run lives (see DESIGN.md)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "run.yaml"

    def state(self, stage: str, slide_id: str) -> Path:
        return self.root.joinpath("state", stage, f"{slide_id}.json")

    def state_file(self, stage: str, slide_id: str) -> str:
        """:meth:`state` as a string: a no-op rerun of 10,000 slides reads 20,000 of them, and building a
        ``Path`` costs more than reading the small file."""
        return f"{self._root}{os.sep}state{os.sep}{stage}{os.sep}{slide_id}.json"

    @cached_property
    def _root(self) -> str:
        return os.fspath(self.root)

    def tissue_qc(self, slide_id: str) -> Path:
        return self.root.joinpath("tissue", f"{slide_id}.jpg")  # for eyes only: JPEG is 10x faster to write than PNG

    def tissue_mask(self, slide_id: str) -> Path:
        return self.root.joinpath("tissue", "masks", f"{slide_id}.png")  # own folder: no id can collide with a QC name

    def tissue_outline(self, slide_id: str) -> Path:
        return self.root.joinpath("tissue", f"{slide_id}.geojson")  # the mask's outline as a QuPath annotation

    def tissue_excluded(self, slide_id: str, kind: str) -> Path:
        """An excluded region's mask (``ink``), in a folder per kind; written only when the slide has one."""
        return self.root.joinpath("tissue", "excluded", kind, f"{slide_id}.png")

    def tissue_flagged(self, slide_id: str, kind: str) -> Path:
        """A flagged region's mask (``fold``: tissue kept but marked), in a folder per kind; only when there is one."""
        return self.root.joinpath("tissue", "flagged", kind, f"{slide_id}.png")

    def tissue_meta(self, slide_id: str) -> Path:
        return self.root.joinpath("tissue", f"{slide_id}.json")

    def tile_coords(self, slide_id: str) -> Path:
        return self.root.joinpath("tiles", f"{slide_id}.coords.npy")

    def tile_meta(self, slide_id: str) -> Path:
        return self.root.joinpath("tiles", f"{slide_id}.json")

    def tile_folds(self, slide_id: str) -> Path:
        """Each tile's share of folded tissue (float32, aligned with the coords; ``tissue.folds``)."""
        return self.root.joinpath("tiles", f"{slide_id}.fold.npy")

    def tile_sharpness(self, slide_id: str) -> Path:
        """Each kept tile's focus score (float32, aligned with the coords), when the tiles stage read them."""
        return self.root.joinpath("tiles", f"{slide_id}.sharpness.npy")

    def tile_overlay(self, slide_id: str) -> Path:
        return self.root.joinpath("tiles", f"{slide_id}.jpg")

    @property
    def student_dir(self) -> Path:
        """The distilled student: student.safetensors, student.json (card), checkpoint/."""
        return self.root.joinpath("models", "student")

    @property
    def qc_table(self) -> Path:
        return self.root.joinpath("qc", "slides.csv")

    @property
    def manifest(self) -> Path:
        """The run's copy of slides.csv as resolved (absolute paths, sanitised ids); never the user's file."""
        return self.root / "manifest.csv"

    @property
    def status_cache(self) -> Path:
        """``status``'s report, kept while what it was derived from stands (``pipelines.status``)."""
        return self.root.joinpath("state", "_status.json")

    @property
    def hash_cache(self) -> Path:
        return self.root.joinpath("state", "_hashes.json")

    @property
    def lock(self) -> Path:
        return self.root / ".lock"
