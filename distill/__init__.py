"""EFCM stage 1: Feature Projection Distillation with a TransScan projector. Depends on ``features`` and ``wsi``."""
