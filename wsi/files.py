"""Atomic file writes for every layer: a crash never leaves a file that looks finished."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
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


def write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text(path: Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_npy(path: Path, array: np.ndarray) -> Path:
    return atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


PNG_LEVEL = 1  # zlib level of QC and heatmap PNGs: 2.7x faster to write than PIL's default 6, ~20 % larger


def write_png(path: Path, image: np.ndarray) -> Path:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_LEVEL)
    return write_bytes(path, buffer.getvalue())


def write_image(path: Path, image: np.ndarray, quality: int = 90) -> Path:
    """PNG or JPEG by the file's suffix (``.jpg``/``.jpeg``: JPEG at ``quality``)."""
    from PIL import Image

    buffer = io.BytesIO()
    jpeg = Path(path).suffix.lower() in (".jpg", ".jpeg")
    Image.fromarray(image).save(buffer, format="JPEG" if jpeg else "PNG",
                                **({"quality": quality} if jpeg else {"compress_level": PNG_LEVEL}))
    return write_bytes(path, buffer.getvalue())
