"""The ``wsi-pipeline`` command: config, slides.csv manifest, stages and the runner."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wsi-pipeline")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
