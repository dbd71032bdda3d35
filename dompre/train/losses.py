"""Weighted multi-label focal loss (MONAI ``FocalLoss``) with per-label weights from label frequency.

Labels are a float matrix with 1 (relevant), 0 (irrelevant) and NaN (uncertain / unknown). As in LesaNet, each
label's positives and negatives are weighted so that both halves count equally (``total / (2 * count)``, capped);
uncertain entries get zero weight and do not count in the mean.
"""
from __future__ import annotations

import numpy as np
import torch
from monai.losses import FocalLoss
from torch import nn


def label_weights(labels: np.ndarray, max_weight: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-label positive and negative weights from label frequency.

    Args:
        labels: (N, L) float with 1 / 0 / NaN (NaN = uncertain, not counted).
        max_weight: cap on any weight (rare labels otherwise dominate).

    Returns:
        ``(pos_weight, neg_weight)``, float32 arrays of shape (L,). A label with no positive or no negative
        gets weight 1 for both (nothing to balance).
    """
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a (N, L) matrix, got shape {labels.shape}")
    known = ~np.isnan(labels)
    pos = np.where(known, labels, 0.0).sum(0)
    neg = np.where(known, 1.0 - labels, 0.0).sum(0)
    total = pos + neg
    ok = (pos > 0) & (neg > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        wp = np.where(ok, total / (2 * pos), 1.0)
        wn = np.where(ok, total / (2 * neg), 1.0)
    return np.minimum(wp, max_weight).astype(np.float32), np.minimum(wn, max_weight).astype(np.float32)


class WeightedFocalLoss(nn.Module):
    """Sigmoid focal loss per label with frequency weights; NaN targets are masked out.

    Args:
        pos_weight: (L,) weight of positive targets.
        neg_weight: (L,) weight of negative targets.
        gamma: focal exponent (0 gives weighted binary cross-entropy).

    Soft targets in [0, 1] are allowed; their weight interpolates between ``neg_weight`` and ``pos_weight``.
    The result is the weighted sum divided by the number of known entries.
    """

    def __init__(self, pos_weight: np.ndarray | torch.Tensor, neg_weight: np.ndarray | torch.Tensor,
                 gamma: float = 2.0) -> None:
        super().__init__()
        self.register_buffer("pos_weight", torch.as_tensor(np.asarray(pos_weight), dtype=torch.float32))
        self.register_buffer("neg_weight", torch.as_tensor(np.asarray(neg_weight), dtype=torch.float32))
        self.focal = FocalLoss(gamma=gamma, reduction="none", use_softmax=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` and ``target`` (B, L); returns a scalar."""
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(target.shape)} differ in shape; "
                             "the model's num_classes must equal the number of labels")
        known = ~torch.isnan(target)
        t = torch.where(known, target, torch.zeros_like(target)).float()
        elem = self.focal(logits.float(), t)
        w = (t * self.pos_weight + (1 - t) * self.neg_weight) * known
        return (elem * w).sum() / known.sum().clamp(min=1)
