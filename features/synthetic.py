"""Synthetic feature cohorts in CLAM/TRIDENT's HDF5 layout, with a known slide-level signal.

For tests and benchmarks of the slide-level stages on cohorts far larger than a machine could
extract: a "tumor" slide has a share of its tiles shifted along a fixed direction of feature space,
a "normal" slide has none, so attention MIL can learn the label and its attention can be checked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_feature_cohort(folder: Path, n_slides: int, *, dim: int = 768, tiles: tuple[int, int] = (2000, 10000),
                         positive_share: float = 0.2, shift: float = 1.5, seed: int = 0,
                         dtype: str = "float16") -> Path:
    """Write ``folder/h5_files/<slide>.h5`` (``features`` N×dim, ``coords`` N×2 with CLAM's attributes) for
    ``n_slides`` slides, half tumor, with N uniform in ``tiles``, and ``folder/slides.csv`` (slide_id,
    label, case_id; no slide_path: a features-only cohort). Returns the CSV's path."""
    import h5py

    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(dim).astype(np.float32)
    direction /= np.linalg.norm(direction)
    h5_dir = Path(folder) / "h5_files"
    h5_dir.mkdir(parents=True, exist_ok=True)
    rows = ["slide_id,label,case_id"]
    for i in range(n_slides):
        slide_id, tumor = f"slide_{i:04d}", i % 2 == 1
        n = int(rng.integers(tiles[0], tiles[1] + 1))
        features = rng.standard_normal((n, dim), dtype=np.float32)
        if tumor:
            hit = rng.random(n) < positive_share
            features[hit] += shift * direction
        side = int(np.ceil(np.sqrt(n)))
        coords = np.stack([np.arange(n) % side, np.arange(n) // side], axis=1).astype(np.int64) * 512
        with h5py.File(h5_dir / f"{slide_id}.h5", "w") as f:
            f.create_dataset("features", data=features.astype(dtype))
            dataset = f.create_dataset("coords", data=coords)
            dataset.attrs.update({"patch_size": 512, "patch_level": 0, "target_patch_size": 256})
        rows.append(f"{slide_id},{'tumor' if tumor else 'normal'},case_{i:04d}")
    csv = Path(folder) / "slides.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv
