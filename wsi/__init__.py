"""Slides: reader protocol and backends, tissue masks, tile grids, demo slides. No torch here."""

from wsi.errors import SlideError
from wsi.slide import Slide, open_slide

__all__ = ["Slide", "SlideError", "open_slide"]
