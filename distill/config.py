"""The distillation's configuration (EFCM stage 1), apart from the trainer so models and configs load without it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from features.encoders import EncoderConfig


class DistillConfig(BaseModel):
    """EFCM stage 1: the student, its projector, the FPD loss and the training schedule."""

    model_config = ConfigDict(extra="forbid")

    student: EncoderConfig = Field(default_factory=lambda: EncoderConfig(model="vit_tiny"),
                                   description="the small encoder to distil (any timm ViT or CNN; its token grid is projected)")
    projector: Literal["transscan", "linear", "mlp"] = Field("transscan", description="projector from the student's token "
                                                                                        "grid to the teacher dimension")
    projector_width: int = Field(192, ge=16, description="TransScan / MLP hidden width")
    whiten: bool = Field(True, description="regress the LayerNorm-whitened teacher feature (FD); false: the raw feature")
    dewhiten_head: bool = Field(True, description="with whiten: the student also predicts each tile's own mean and "
                                                  "log std of the teacher feature, to undo the whitening per tile "
                                                  "(false: the training pool's averages stand in for every tile)")
    stats_weight: float = Field(1.0, ge=0, description="weight of the de-whitening head's loss (MSE of the "
                                                       "standardised per-tile mean and log std)")
    loss_beta: float = Field(2.0, gt=0, description="Smooth-L1 beta (Feature Distillation uses 2.0)")
    cosine_weight: float = Field(0.5, ge=0, description="weight of the added (1 − cosine) term")
    epochs: int = Field(20, ge=1, description="maximum epochs (a ceiling: `patience` stops earlier once the held-out "
                                              "score stops improving)")
    tiles_per_epoch: int = Field(2048, ge=1, description="training tiles sampled per epoch (with replacement across epochs)")
    balance: Literal["clusters", "none"] = Field("clusters", description="how training tiles are drawn each epoch: "
                                                 "clusters: k-means on the whitened teacher features of the pool, each "
                                                 "cluster drawn in proportion to the square root of its size, so rare "
                                                 "tissue (a small tumour focus) is seen often enough; none: uniformly")
    balance_clusters: int = Field(16, ge=2, description="number of k-means clusters of the teacher's features: for "
                                                        "balance: clusters and for the per-cluster fidelity metrics")
    hard_mining: float = Field(2.0, ge=0, description="hard-example draws: each training tile's draw weight is also "
                                                      "multiplied by (its last training loss / the median) to this power "
                                                      "(clipped to 0.25–8), so later epochs go to the tiles the student "
                                                      "still gets wrong; 0: off")
    select: Literal["balanced_r2", "worst_cluster_r2", "cosine"] = Field(
        "balanced_r2", description="what picks the best epoch and drives early stopping, on held-out tiles: "
                                   "balanced_r2: the mean R² over the teacher-feature clusters (every tissue counts "
                                   "the same, rare or not); worst_cluster_r2: the worst cluster's; cosine: the average "
                                   "cosine (before the per-cluster metrics)")
    rare_r2_target: float = Field(0.8, le=1, description="the card's verdict: the student is faithful on rare tissue when "
                                                         "the worst held-out cluster's R² reaches this")
    tile_cache_mb: int = Field(1024, ge=0, description="decoded training tiles kept in memory across epochs (at the "
                                                       "student's input size with read_at_input), so repeated draws cost "
                                                       "model time only, and the held-out tiles likewise (each set up to "
                                                       "this size); 0: read every draw")
    max_train_tiles: int = Field(50_000, ge=1, description="size of the training pool drawn once across slides")
    max_val_tiles: int = Field(512, ge=1, description="held-out tiles used for validation")
    val_fraction: float = Field(0.15, gt=0, lt=1, description="fraction of slides held out for validation (tiles, "
                                                               "when there are fewer than 4 slides)")
    batch_size: int = Field(32, ge=1, description="tiles per step")
    lr: float = Field(5e-4, gt=0, description="AdamW peak learning rate")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay")
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up before the cosine decay")
    grad_clip: float = Field(1.0, gt=0, description="gradient norm clip")
    patience: int = Field(5, ge=1, description="stop after this many epochs without the held-out score (`select`) "
                                               "beating its best by `min_delta`: `epochs` is a ceiling")
    min_delta: float = Field(0.002, ge=0, description="the smallest gain of the held-out score that counts as progress")
    read_at_input: bool = Field(True, description="read the student's tiles from the coarsest pyramid level that holds "
                                                  "its input resolution (a 112-px student on 512-px level-0 tiles "
                                                  "reads the 4× level: 1/16 of the pixels to decode), in distillation "
                                                  "and wherever the student runs after it; false: the tiling's tiles, "
                                                  "resized")
    augment: bool = Field(True, description="flips, 90° rotations and light brightness/contrast jitter on the student's "
                                            "input; the target stays the teacher's feature of the unaugmented tile, so "
                                            "turn it off for a teacher far from invariant to them (a random-weight ViT)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="training autocast precision; auto as for encoders: bf16 on GPUs that support it (else "
                            "fp16 with loss scaling), bf16 on CPUs with native bf16, else fp32")
    num_workers: int | None = Field(None, ge=0, description="loader processes (threads in a daemonic Dask worker) reading tiles (null: 0 on a CPU, "
                                                            "where the student's tiles are cheap to read and a loader "
                                                            "process takes a core from training — half the epoch "
                                                            "time on 2 cores; 2 on a GPU)")
    seed: int = Field(0, description="seed for the split, sampling and initialisation")
    exclude_test: bool = Field(True, description="never train on slides whose slides.csv split is `test`")
