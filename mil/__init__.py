"""EFCM stage 2: CLAM attention-MIL, the Reuse / Retrain / End2end strategies, heatmaps. Depends on lower layers only."""

from features.batch_threads import thread_invariant_blas

thread_invariant_blas()  # before any model runs: MKL reads it at its first call
