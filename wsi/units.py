"""Unit-safe names for the quantities that get mixed up: microns, microns per pixel, pixels at a level."""

from __future__ import annotations

from typing import NewType

Microns = NewType("Microns", float)
MicronsPerPixel = NewType("MicronsPerPixel", float)
# µm/px at or outside these bounds is a typo or a unit mix-up (nm, mm, pixels per cm), never a scan a model can use:
# 0.05 µm/px is beyond any optical objective, 20 µm/px a 0.5× overview (a macro photo, not a slide scan)
PLAUSIBLE_MPP = (0.05, 20.0)


def plausible_mpp(mpp: float) -> bool:
    """True for a scan resolution strictly inside :data:`PLAUSIBLE_MPP`."""
    return PLAUSIBLE_MPP[0] < mpp < PLAUSIBLE_MPP[1]

Level0Pixels = NewType("Level0Pixels", int)  # a length in pixels of pyramid level 0
TargetPixels = NewType("TargetPixels", int)  # a length in pixels at the tiling's target resolution


def magnification_to_mpp(magnification: float) -> MicronsPerPixel:
    """Scanner convention: 40× ≈ 0.25 µm/px, 20× ≈ 0.5 µm/px (10 / magnification)."""
    if magnification <= 0:
        raise ValueError(f"magnification must be positive, got {magnification}")
    return MicronsPerPixel(10.0 / magnification)


def mpp_to_magnification(mpp: MicronsPerPixel) -> float:
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    return 10.0 / mpp
