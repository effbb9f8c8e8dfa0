"""Patch feature extraction (encoders, tile datasets, Zarr stores). Depends only on ``wsi``."""

from features.batch_threads import thread_invariant_blas

thread_invariant_blas()  # before any model runs: MKL reads it at its first call
