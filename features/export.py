"""Interop with other MIL tools: CLAM / TRIDENT-layout HDF5 (and CLAM ``.pt`` bags) out, CLAM HDF5 in.

CLAM's ``h5_files/<slide>.h5`` holds ``features`` (N×D float32) and ``coords`` (N×2, level-0 x, y)
with the patching attributes on ``coords`` (``patch_size``, ``patch_level``, ``downsample``,
``level_dim``); TRIDENT adds ``patch_size_level0``, ``target_magnification``/mpp and ``overlap``.
We write both sets, so either tool's loaders find what they look for. ``pt_files/<slide>.pt`` is
the features tensor alone (loadable with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from features.store import FeatureStore, write_store
from wsi.files import atomic_write


def export_h5(store: FeatureStore, dest_dir: Path, slide_id: str, *, pt: bool = False) -> list[Path]:
    """Write ``dest_dir/h5_files/<slide_id>.h5`` (and ``pt_files/<slide_id>.pt`` when ``pt``)."""
    import h5py

    attrs = store.attrs
    features, coords = store.load(np.float32)
    h5_path = Path(dest_dir) / "h5_files" / f"{slide_id}.h5"

    def write(file) -> None:
        with h5py.File(file, "w") as f:
            f.create_dataset("features", data=features)
            dset = f.create_dataset("coords", data=coords.astype(np.int64))
            read_level = int(attrs.get("read_level", 0))
            dset.attrs.update({
                "patch_size": int(attrs.get("read_size", attrs.get("patch_size", 0))),  # CLAM: size at patch_level
                "patch_level": read_level,
                "downsample": np.array([attrs.get("level0_size", 0) / max(1, attrs.get("read_size", 1))] * 2),
                "patch_size_level0": int(attrs.get("level0_size", 0)),
                "target_patch_size": int(attrs.get("patch_size", 0)),
                "target_mpp": float(attrs.get("target_mpp", 0.0)),
                "target_magnification": round(10.0 / attrs["target_mpp"], 3) if attrs.get("target_mpp") else 0.0,
                "overlap": 0,
                "name": slide_id,
                "encoder": str(attrs.get("encoder_label", "")),
            })
            f.attrs["encoder"] = str(attrs.get("encoder_label", ""))

    atomic_write(h5_path, write)
    written = [h5_path]
    if pt:
        import torch

        pt_path = Path(dest_dir) / "pt_files" / f"{slide_id}.pt"
        atomic_write(pt_path, lambda f: torch.save(torch.from_numpy(features), f))
        written.append(pt_path)
    return written


def import_clam_h5(h5_path: Path, store: Path, *, encoder_label: str, dtype: str = "float16") -> int:
    """Turn a CLAM/TRIDENT ``.h5`` (``features``, ``coords``) into a feature store; returns its row count."""
    import h5py

    with h5py.File(h5_path, "r") as f:
        for name in ("features", "coords"):
            if name not in f:
                raise ValueError(f"{h5_path}: no `{name}` dataset (found {list(f.keys())}); not a CLAM features file")
        features, coords = f["features"], np.asarray(f["coords"][:])
        if features.ndim == 3 and features.shape[0] == 1:  # some tools store (1, N, D)
            features = features[0]
        if len(features) != len(coords):
            raise ValueError(f"{h5_path}: {len(features)} feature rows but {len(coords)} coords")
        meta = {k: (v.item() if hasattr(v, "item") and np.ndim(v) == 0 else np.asarray(v).tolist())
                for k, v in f["coords"].attrs.items()}
        attrs = {"encoder_label": encoder_label, "imported_from": str(h5_path), "source_attrs": meta,
                 "patch_size": meta.get("target_patch_size", meta.get("patch_size")),
                 "read_level": meta.get("patch_level", 0)}
        dim = int(features.shape[1])
        with write_store(store, dim=dim, coords=coords, dtype=dtype, attrs=attrs) as writer:
            for start in range(0, len(coords), 4096):
                writer.append(np.asarray(features[start:start + 4096]))
    return len(coords)
