"""Binary masks as 1-bit PNG files: the tissue stage's mask and its excluded and flagged parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_mask_png(mask: np.ndarray, path) -> None:
    """Write a binary mask as a 1-bit PNG to a path or binary file (OpenCV's encoder: 3× Pillow's from a bool array)."""
    import cv2

    params = [cv2.IMWRITE_PNG_BILEVEL, 1, cv2.IMWRITE_PNG_COMPRESSION, 1]
    if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV ≥ 4.11: no row filters, as small and a third faster on a mask
        params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(mask, dtype=bool).view(np.uint8) * np.uint8(255), params)
    if not ok:
        raise ValueError(f"could not encode a {mask.shape} mask as PNG")
    if isinstance(path, (str, Path)):
        Path(path).write_bytes(encoded.tobytes())
    else:
        path.write(encoded.tobytes())


def load_mask_png(path: Path) -> np.ndarray:
    """A mask PNG (any bit depth, grey or colour) as bool: its nonzero pixels (of the colour channels, not alpha)."""
    import cv2

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such mask file")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{path}: not a readable PNG")
    return image[..., :3].any(axis=2) if image.ndim == 3 else image > 0
