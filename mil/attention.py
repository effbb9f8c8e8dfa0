"""Where a trained CLAM looked: per-tile attention of one slide, raw and as percentiles within the slide.

CLAM's heatmaps show percentiles, not raw scores: raw attention logits have no fixed scale across
slides, while "this tile is in the slide's top 5 %" does. A second, overlapping pass is scored
against the first pass's distribution, so both passes share one scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SlideAttention:
    """One slide's CLAM output: tile attention (for one branch) and the slide-level prediction."""

    raw: np.ndarray  # (N,) attention logits of the branch below
    probabilities: np.ndarray  # (C,) slide-level class probabilities
    predicted: int  # argmax of the probabilities
    branch: int  # attention branch used: 0 for CLAM-SB; the class for CLAM-MB


def percentile_of(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Percent (0–100) of ``reference`` below each score, ties counted half (scipy's ``percentileofscore`` 'mean')."""
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    if len(ref) == 0:
        raise ValueError("percentiles need at least one reference score")
    scores = np.asarray(scores, dtype=np.float64)
    below = np.searchsorted(ref, scores, side="left")
    at_or_below = np.searchsorted(ref, scores, side="right")
    return (below + at_or_below) * 50.0 / len(ref)


def slide_attention(model, features: np.ndarray, class_index: int | None = None, batch: int = 200_000) -> SlideAttention:
    """Attention of ``model`` (a :class:`mil.clam.CLAM`) over a bag; CLAM-MB uses ``class_index`` or the prediction.

    Two passes over chunks of ``batch`` tiles (attention, then the softmax-weighted sum), so a
    500k-tile bag costs one chunk's activations, not the bag's.
    """
    import torch

    from features.batch_threads import torch_threads

    if len(features) == 0:
        raise ValueError("the slide has no tiles, so no attention")

    device = next(model.parameters()).device

    def chunks():
        for start in range(0, len(features), batch):
            yield start, torch.from_numpy(np.asarray(features[start:start + batch], dtype=np.float32)).to(device)

    model.eval()
    with torch.inference_mode():
        attention = torch.cat([model.embed(chunk)[1] for _, chunk in chunks()], dim=1)  # (K, N)
        weights = torch.exp(attention - attention.max(dim=1, keepdim=True).values)  # softmax numerators
        pooled = sum(weights[:, start:start + len(chunk)] @ model.embed(chunk)[0] for start, chunk in chunks())
        with torch_threads(1):  # a long sum is split by thread count (a 50,000-tile bag's differed): one thread
            total = weights.sum(dim=1, keepdim=True)
        probs = torch.softmax(model.classify(pooled / total), dim=1)[0].float().cpu().numpy()
        attention = attention.float().cpu()
    predicted = int(probs.argmax())
    n_branches = attention.shape[0]
    if class_index is not None and not 0 <= class_index < len(probs):
        raise ValueError(f"class index {class_index} is out of range for {len(probs)} classes")
    branch = 0 if n_branches == 1 else (predicted if class_index is None else class_index)
    return SlideAttention(attention[branch].numpy().astype(np.float64), probs, predicted, branch)


@dataclass
class EnsembleAttention:
    """Several CLAMs (a bundle's fold ensemble) on one bag: mean probabilities, and each member's attention."""

    members: list[SlideAttention]  # each on the ensemble's branch
    probabilities: np.ndarray  # (C,) mean of the members'
    predicted: int
    branch: int

    def scores(self, raws: list[np.ndarray] | None = None) -> np.ndarray:
        """One score per tile: a lone member's raw attention; several members' mean percentile, each within its
        own attention over the bag (raw logits of different CLAMs share no scale). ``raws``: the members'
        attention over other tiles (an overlapping second pass), scored against the bag's."""
        raws = [m.raw for m in self.members] if raws is None else raws
        if len(self.members) == 1:
            return np.asarray(raws[0], dtype=np.float64)
        return np.mean([percentile_of(r, m.raw) for r, m in zip(raws, self.members)], axis=0)


def ensemble_attention(models: list, features: np.ndarray, class_index: int | None = None) -> EnsembleAttention:
    """CLAM-MB draws the branch of ``class_index``, else of the ensemble's predicted class."""
    members = [slide_attention(model, features) for model in models]
    probabilities = np.mean([m.probabilities for m in members], axis=0)
    predicted = int(probabilities.argmax())
    wanted = predicted if class_index is None else class_index
    if any(m.branch != wanted for m in members) and any(model.multi_branch for model in models):
        members = [slide_attention(model, features, wanted) for model in models]
    branch = members[0].branch
    return EnsembleAttention(members, probabilities, predicted, branch)
