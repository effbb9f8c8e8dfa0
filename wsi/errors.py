"""Errors that name the slide they are about, so a failed slide is always reported with its reason."""

from __future__ import annotations

from pathlib import Path


class SlideError(Exception):
    """A slide that cannot be used: ``slide`` is its id or path, ``reason`` what is wrong with it."""

    def __init__(self, slide: str | Path, reason: str):
        self.slide = str(slide)
        self.reason = reason
        super().__init__(f"{self.slide}: {reason}")
