"""Patch feature extraction (encoders, tile datasets, Zarr stores). Depends only on ``wsi``."""
