"""Per-slide feature stores: a Zarr v3 group ``features/<encoder>/<slide_id>.zarr``.

Layout: ``features`` (N×D, float16 by default, chunked along N), ``coords`` (N×2 int64, level-0
x, y) and attributes (encoder spec, dim, dtype, patch size, target mpp, read level, fingerprint,
``complete: true``). A store is written under a temporary name and renamed into place when
complete, so a store at its final path is always whole.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi.files import check_fence, fsync_dir, fsync_tree, write_bytes


def store_path(root: Path, encoder: str, slide_id: str) -> Path:
    return Path(root) / "features" / encoder / f"{slide_id}.zarr"


class StoreWriter:
    """Appends feature rows in chunk-sized blocks; memory holds at most one chunk. Rows can be left out as they
    come (``keep``: a tile that did not decode), and per-row arrays of the kept rows added (``arrays``)."""

    def __init__(self, group, dim: int, dtype: str, chunk_rows: int):
        self.group = group
        self.chunk_rows = chunk_rows
        self.features = group.create_array("features", shape=(0, dim), chunks=(chunk_rows, dim), dtype=dtype)
        self.dtype = np.dtype(dtype)
        self._pending: list[np.ndarray] = []
        self._n_pending = 0
        self.n_written = 0
        self._kept: list[np.ndarray] = []  # per appended row, whether it was written
        self.n_seen = 0  # rows appended, written or not
        self.arrays: dict[str, np.ndarray] = {}  # more per-row arrays (of the kept rows), written at the end
        self.attrs: dict = {}  # more attributes, known once every row came (added to the store's own)

    def append(self, rows: np.ndarray, keep: np.ndarray | None = None) -> None:
        rows = np.asarray(rows, dtype=self.dtype)
        keep = np.ones(len(rows), bool) if keep is None else np.asarray(keep, bool)
        self._kept.append(keep)
        self.n_seen += len(keep)
        self._pending.append(rows[keep])
        self._n_pending += int(keep.sum())
        if self._n_pending >= self.chunk_rows:
            self.flush()

    @property
    def kept(self) -> np.ndarray:
        """Whether each row appended so far was written."""
        return np.concatenate(self._kept) if self._kept else np.zeros(0, bool)

    def flush(self) -> None:
        if self._n_pending:
            block = np.concatenate(self._pending, axis=0)
            self.features.append(block, axis=0)
            self.n_written += len(block)
            self._pending, self._n_pending = [], 0


@contextmanager
def write_store(path: Path, *, dim: int, coords: np.ndarray, attrs: dict, dtype: str = "float16",
                chunk_rows: int = 1024) -> Iterator[StoreWriter]:
    """Create a store at a temporary path; on success it is completed and renamed to ``path``.

    On any error the temporary store is removed and ``path`` is untouched.
    """
    import zarr

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        group = zarr.open_group(str(tmp), mode="w")
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        writer = StoreWriter(group, dim, dtype, chunk_rows)
        yield writer
        writer.flush()
        kept = writer.kept
        if len(kept) != len(coords):
            raise RuntimeError(f"{path}: {len(kept)} feature rows came for {len(coords)} coordinates")
        coords = coords[kept]  # the rows left out (undecodable tiles) leave the coordinates too
        for name, values in {"coords": coords, **writer.arrays}.items():
            values = np.asarray(values)
            if len(values) != len(coords):
                raise RuntimeError(f"{path}: {name} has {len(values)} rows for {len(coords)} kept tiles")
            group.create_array(name, shape=values.shape, chunks=(max(1, min(len(values), 65536)), *values.shape[1:]),
                               dtype=values.dtype)
            if len(values):
                group[name][:] = values
        group.attrs.update({**attrs, **writer.attrs, "dim": dim, "dtype": dtype, "n_tiles": int(len(coords)),
                            "complete": True})
        fsync_tree(tmp)  # chunks on disk before the name says the store is whole
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Write tensors (e.g. a state dict) as safetensors under a temporary name, then rename into place."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    write_bytes(path, data)


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` is moved aside first and removed after."""
    check_fence(dst)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class FeatureStore:
    """A finished store opened for reading."""

    path: Path
    group: object

    @classmethod
    def open(cls, path: Path) -> FeatureStore:
        import zarr

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no feature store")
        group = zarr.open_group(str(path), mode="r")
        if not group.attrs.get("complete"):
            raise ValueError(f"{path}: feature store is incomplete")
        return cls(path, group)

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def features(self):
        """The Zarr array (N×D); index it to read rows."""
        return self.group["features"]

    @property
    def coords(self) -> np.ndarray:
        return np.asarray(self.group["coords"][:])

    @property
    def sharpness(self) -> np.ndarray | None:
        """Each tile's focus score (:func:`wsi.tiling.sharpness`) where the store's own read checked its tiles."""
        return np.asarray(self.group["sharpness"][:]) if "sharpness" in self.group else None

    def __len__(self) -> int:
        return int(self.group["features"].shape[0])

    def load(self, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """All features (as ``dtype``) and coords."""
        return np.asarray(self.features[:], dtype=dtype), self.coords

    def iter_chunks(self, rows: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(features, coords) blocks of ``rows`` (default: the store's chunk), never the whole slide."""
        rows = rows or self.features.chunks[0]
        coords = self.group["coords"]
        for start in range(0, len(self), rows):
            yield np.asarray(self.features[start:start + rows], dtype=np.float32), np.asarray(coords[start:start + rows])


def open_store(root: Path, encoder: str, slide_id: str) -> FeatureStore:
    """The finished feature store of ``slide_id`` for ``encoder`` in run directory ``root``."""
    return FeatureStore.open(store_path(root, encoder, slide_id))
