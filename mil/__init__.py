"""EFCM stage 2: CLAM attention-MIL, the Reuse / Retrain / End2end strategies, heatmaps. Depends on lower layers only."""
