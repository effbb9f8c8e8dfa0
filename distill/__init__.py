"""EFCM stage 1: Feature Projection Distillation with a TransScan projector. Depends on ``features`` and ``wsi``."""

from features.batch_threads import thread_invariant_blas

thread_invariant_blas()  # before any model runs: MKL reads it at its first call
