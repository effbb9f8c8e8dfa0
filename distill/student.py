"""The distilled student (backbone + projector + per-tile de-whitening) and the FPD loss that trains it.

Feature Distillation whitens each teacher vector by a non-affine LayerNorm: the student learns the
vector's *direction and shape*, free of its own mean and scale. Those two numbers differ from tile to
tile (on the demo teacher the per-tile standard deviation varies by ±13 %), and the teacher's CLAM
sees them. So the student also predicts each tile's mean and log standard deviation (``stats_head``)
and its output is ``whitened × std + mean`` per tile: features in the teacher's own space, which is
what the Reuse strategy needs. Without the head (``distill.dewhiten_head: false``) the training pool's
average mean and std stand in for every tile.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.transscan import StudentBackbone

LAYER_NORM_EPS = 1e-5  # F.layer_norm's default: whitening and de-whitening use the same std


def feature_stats(teacher: torch.Tensor) -> torch.Tensor:
    """(B, 2): each vector's mean and log standard deviation, as the whitening LayerNorm computes them."""
    teacher = teacher.float()
    var = teacher.var(dim=-1, unbiased=False)
    return torch.stack([teacher.mean(dim=-1), 0.5 * torch.log(var + LAYER_NORM_EPS)], dim=-1)


class DistilledStudent(nn.Module):
    """Student backbone + projector (+ per-tile stats head): outputs teacher-space features."""

    def __init__(self, backbone: StudentBackbone, projector: nn.Module, teacher_dim: int, *, stats_head: bool = False,
                 stats_width: int = 64):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.teacher_dim = teacher_dim
        # the training pool's average per-tile mean / std of teacher features (the fallback de-whitening)
        self.register_buffer("target_mean", torch.zeros(1))
        self.register_buffer("target_std", torch.ones(1))
        self.stats_head = None
        if stats_head:
            channels = backbone.channels
            self.stats_head = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, stats_width), nn.GELU(),
                                            nn.Linear(stats_width, 2))
            nn.init.zeros_(self.stats_head[-1].weight)  # starts at the pool's averages
            nn.init.zeros_(self.stats_head[-1].bias)
            # the head predicts (mean, log std) as (stats - center) / scale, see set_target_stats
            self.register_buffer("stats_center", torch.zeros(2))
            self.register_buffer("stats_scale", torch.ones(2))

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whitened prediction (B, D) and, with a stats head, the standardised per-tile stats (B, 2)."""
        grid = self.backbone(x)
        whitened = self.projector(grid)
        stats = None if self.stats_head is None else self.stats_head(grid.mean(dim=(2, 3)))
        return whitened, stats

    def whitened(self, x: torch.Tensor) -> torch.Tensor:
        """The projector's output: a prediction of the LayerNorm-whitened teacher feature."""
        return self.outputs(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher-space features: the whitened prediction re-scaled by the tile's predicted (or the pool's) mean and std."""
        whitened, stats = self.outputs(x)
        if stats is None:
            return whitened * self.target_std + self.target_mean
        stats = stats.float() * self.stats_scale + self.stats_center
        return (whitened.float() * stats[:, 1:].exp() + stats[:, :1]).to(whitened.dtype)

    def set_target_stats(self, teacher: torch.Tensor) -> None:
        """Fix the de-whitening statistics from a sample of training targets (N, D)."""
        stats = feature_stats(teacher)
        self.target_mean.fill_(float(stats[:, 0].mean()))
        self.target_std.fill_(float(stats[:, 1].exp().mean()))
        if self.stats_head is not None:
            # the mean in units of the typical std, the log std as it is: a unit error in either then costs about
            # the same squared teacher-space error per dimension as a unit error of the whitened prediction
            self.stats_center.copy_(stats.mean(dim=0))
            self.stats_scale.copy_(torch.stack([stats[:, 1].mean().exp(), torch.ones((), device=stats.device)]))


class FPDLoss(nn.Module):
    """Feature Projection Distillation loss: Smooth-L1 to the whitened teacher feature (+ optional cosine),
    plus, with a stats head, ``stats_weight`` × MSE of the standardised per-tile mean and log std.

    Whitening is a non-affine LayerNorm over the feature dimension, as in Feature Distillation
    (Wei et al. 2022); ``whiten=False`` regresses the raw teacher feature instead (ablation).
    """

    def __init__(self, *, beta: float = 2.0, cosine_weight: float = 0.0, whiten: bool = True, stats_weight: float = 1.0):
        super().__init__()
        self.beta, self.cosine_weight, self.whiten, self.stats_weight = beta, cosine_weight, whiten, stats_weight

    def target(self, teacher: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(teacher, teacher.shape[-1:], eps=LAYER_NORM_EPS) if self.whiten else teacher

    def per_tile(self, prediction: torch.Tensor, teacher: torch.Tensor, stats: torch.Tensor | None = None,
                 model: DistilledStudent | None = None) -> torch.Tensor:
        """The loss of every tile of the batch, (B,): what hard-example draws weigh tiles by."""
        target = self.target(teacher.float())
        loss = F.smooth_l1_loss(prediction.float(), target, beta=self.beta, reduction="none").mean(dim=-1)
        if self.cosine_weight:
            loss = loss + self.cosine_weight * (1 - F.cosine_similarity(prediction.float(), target, dim=-1))
        if stats is not None and model is not None:
            wanted = (feature_stats(teacher) - model.stats_center) / model.stats_scale
            loss = loss + self.stats_weight * F.mse_loss(stats.float(), wanted, reduction="none").mean(dim=-1)
        return loss

    def forward(self, prediction: torch.Tensor, teacher: torch.Tensor, stats: torch.Tensor | None = None,
                model: DistilledStudent | None = None) -> torch.Tensor:
        return self.per_tile(prediction, teacher, stats, model).mean()
