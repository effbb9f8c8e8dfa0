"""The run config `wsi-pipeline demo` writes beside its demo cohort (and the tests use)."""

DEMO_CONFIG = """\
# Run config for the demo cohort: its slides are biopsy-sized (a few mm²), so CLAM's biopsy
# preset with physical area thresholds (the same on its 40× and 20× slides).
tissue:
  preset: bwh_biopsy
  area_reference_mpp: 0.25
tiling:
  target_mpp: 0.5
  patch_size: 256
  min_tissue_fraction: 0.25
# A ViT-S/16 teacher with RANDOM weights (seed 0) keeps the demo offline and fast: its features mean
# nothing clinically, they only exercise the machinery. For real work give weights, e.g. `model: uni`
# with `pretrained: true` (hub access) or `weights: /path/to/uni.safetensors`, and drop `seed`.
# Mean-pooled patch tokens: an untrained CLS token says little about the tile, the tokens do.
features:
  teacher:
    model: vit_small
    pretrained: false
    seed: 0
    pool: mean
# EFCM stage 1: a ViT-Ti/16 student on 112-px inputs (7×7 token grid) with a TransScan projector,
# 20 epochs × 384 tiles in steps of 16 (about 4 min on 2 cores at fp32): enough to learn a tumour that is
# a few per cent of the tiles, which the card's verdict checks (5 epochs learn the average, not the tumour).
distill:
  student:
    model: vit_tiny
    input_size: 112
    model_kwargs: {img_size: 112}
  epochs: 20
  tiles_per_epoch: 384
  batch_size: 16
  lr: 0.001
  augment: false  # the random ViT teacher's features change under flips and rotations
  max_val_tiles: 128
# EFCM stage 2 on the 24 demo slides: 4 stratified folds by case (6 test, 3 validation, 15 training
# slides each), CLAM's own training schedule. With fewer slides, early stopping on one or two
# validation slides keeps near-initial weights and the results swing from run to run.
mil:
  folds: 4
  val_fraction: 0.17
"""
