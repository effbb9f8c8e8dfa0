"""CLAM-SB and CLAM-MB (Lu et al., Nature BME 2021), faithful to the reference implementation.

fc 512 + ReLU + dropout → gated attention (tanh × sigmoid, D = 256 "small" / 384 "big") → softmax
over patches → attention pooling. SB: one attention branch and one bag classifier; MB: one attention
branch and one bag classifier per class. Instance classifiers (one per class, 2-way) are trained on
the ``k_sample`` most and least attended patches: for the true class, top patches are positives and
bottom patches negatives; when subtyping, the top patches of every other class are negatives.
The instance loss is the smooth top-1 SVM (alpha 1, tau 1) or cross-entropy. Bags with fewer than
``k_sample`` patches use all their patches (the reference crashes there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SIZES = {"small": (512, 256), "big": (512, 384)}


class SmoothTop1SVM(nn.Module):
    """Smooth top-1 multiclass SVM (Berrada et al. 2018): τ·log Σ_j exp((α·[j≠y] + s_j − s_y)/τ), averaged."""

    def __init__(self, alpha: float = 1.0, tau: float = 1.0):
        super().__init__()
        self.alpha, self.tau = alpha, tau

    def forward(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        margin = self.alpha * (1 - F.one_hot(target, scores.shape[1]).to(scores.dtype))
        true = scores.gather(1, target[:, None])
        return (self.tau * torch.logsumexp((scores + margin - true) / self.tau, dim=1)).mean()


class GatedAttention(nn.Module):
    """A = W_c (tanh(V h) ⊙ sigmoid(U h)): ``n_branches`` attention scores per patch."""

    def __init__(self, dim: int, hidden: int, n_branches: int, dropout: float):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.b = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.c = nn.Linear(hidden, n_branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(h) * self.b(h))  # (N, K)


class CLAM(nn.Module):
    """CLAM for one bag at a time: ``forward(features (N, D), label=None)``.

    ``multi_branch=False`` is CLAM-SB, ``True`` CLAM-MB. Returns logits (1, C), raw attention
    (K, N) before softmax, and when ``label`` is given the instance loss.
    """

    def __init__(self, in_dim: int, n_classes: int = 2, *, size: str = "small", dropout: float = 0.25,
                 k_sample: int = 8, multi_branch: bool = False, subtyping: bool = False,
                 instance_loss: str = "svm"):
        super().__init__()
        width, hidden = SIZES[size]
        self.n_classes, self.k_sample = n_classes, k_sample
        self.multi_branch, self.subtyping = multi_branch, subtyping
        self.fc = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(width, hidden, n_classes if multi_branch else 1, dropout)
        if multi_branch:
            self.classifiers = nn.ModuleList(nn.Linear(width, 1) for _ in range(n_classes))
        else:
            self.classifiers = nn.Linear(width, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(width, 2) for _ in range(n_classes))
        self.instance_loss_fn = SmoothTop1SVM() if instance_loss == "svm" else nn.CrossEntropyLoss()
        # optional per-dimension standardisation of the input features (identity unless set from training data)
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))

    def embed(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h (N, 512), raw attention (K, N))."""
        h = self.fc((features - self.feature_mean) / self.feature_std)
        return h, self.attention(h).transpose(0, 1)

    def _instance_eval(self, a: torch.Tensor, h: torch.Tensor, classifier: nn.Module, in_class: bool) -> torch.Tensor:
        k = min(self.k_sample, h.shape[0])
        top = torch.topk(a, k).indices
        if in_class:
            bottom = torch.topk(-a, k).indices
            instances = torch.cat([h[top], h[bottom]])
            targets = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)]).to(h.device)
        else:
            instances, targets = h[top], torch.zeros(k, dtype=torch.long, device=h.device)
        return self.instance_loss_fn(classifier(instances), targets)

    def instance_loss(self, attention: torch.Tensor, h: torch.Tensor, label: int) -> torch.Tensor:
        """CLAM's clustering constraint on the attention's extremes (averaged over classes when subtyping)."""
        total = h.new_zeros(())
        weights = F.softmax(attention, dim=1)
        for c in range(self.n_classes):
            a = weights[c] if self.multi_branch else weights[0]
            if c == label:
                total = total + self._instance_eval(a, h, self.instance_classifiers[c], True)
            elif self.subtyping:
                total = total + self._instance_eval(a, h, self.instance_classifiers[c], False)
        return total / self.n_classes if self.subtyping else total

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Slide logits (1, C) from the attention-pooled embedding (K, 512)."""
        if self.multi_branch:
            return torch.cat([clf(pooled[c]) for c, clf in enumerate(self.classifiers)]).unsqueeze(0)
        return self.classifiers(pooled)

    def forward(self, features: torch.Tensor, label: int | None = None) -> dict:
        h, attention = self.embed(features)
        weights = F.softmax(attention, dim=1)  # over patches
        out = {"logits": self.classify(weights @ h), "attention": attention}
        if label is not None:
            out["instance_loss"] = self.instance_loss(attention, h, int(label))
        return out
