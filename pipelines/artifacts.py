"""Run-directory paths and atomic writes: a crash never leaves a file that looks finished."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts are shared like any written file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (survives a power cut, not just a crash)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def sweep_temporaries(root: Path) -> list[Path]:
    """Remove what interrupted writers left: ``.<name>.*.tmp`` files and dirs, ``.<name>.old-*`` dirs.

    Only call this while holding the run's lock: then no writer can be using them.
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


def write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text(path: Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_npy(path: Path, array: np.ndarray) -> Path:
    return atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def write_png(path: Path, image: np.ndarray) -> Path:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return write_bytes(path, buffer.getvalue())


@dataclass(frozen=True)
class RunPaths:
    """Where each artifact of a run lives (see DESIGN.md)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "run.yaml"

    def state(self, stage: str, slide_id: str) -> Path:
        return self.root / "state" / stage / f"{slide_id}.json"

    def tissue_qc(self, slide_id: str) -> Path:
        return self.root / "tissue" / f"{slide_id}.png"

    def tissue_mask(self, slide_id: str) -> Path:
        return self.root / "tissue" / "masks" / f"{slide_id}.png"  # own folder: no id can collide with a QC name

    def tissue_meta(self, slide_id: str) -> Path:
        return self.root / "tissue" / f"{slide_id}.json"

    def tile_coords(self, slide_id: str) -> Path:
        return self.root / "tiles" / f"{slide_id}.coords.npy"

    def tile_meta(self, slide_id: str) -> Path:
        return self.root / "tiles" / f"{slide_id}.json"

    def tile_overlay(self, slide_id: str) -> Path:
        return self.root / "tiles" / f"{slide_id}.png"

    @property
    def student_dir(self) -> Path:
        """The distilled student: student.safetensors, student.json (card), checkpoint/."""
        return self.root / "models" / "student"

    @property
    def qc_table(self) -> Path:
        return self.root / "qc" / "slides.csv"

    @property
    def manifest(self) -> Path:
        """The run's copy of slides.csv as resolved (absolute paths, sanitised ids); never the user's file."""
        return self.root / "manifest.csv"

    @property
    def hash_cache(self) -> Path:
        return self.root / "state" / "_hashes.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"
