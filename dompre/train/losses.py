"""The multi-label losses of pretraining and fine-tuning: LesaNet's label weights, one weighted (focal) loss,
LesaNet's relational hard example mining and its label-set triplet loss.

Labels are a float matrix with 1 (relevant), 0 (irrelevant), soft values in between (pseudo-labels) and NaN
(uncertain / unknown). :func:`label_weights` gives each label a positive and a negative weight from its frequency;
:class:`WeightedFocalLoss` is the one weighted loss (``gamma=0``: weighted binary cross-entropy; ``hard_fraction``:
top-k hard example mining). Every caller (the Noisy Student stages, pseudo-label pretraining, fine-tuning)
uses these, so the weights and the loss mean the same thing everywhere. :class:`RelationalHardExampleMining`
is LesaNet's RHEM term (fine-tuning's ``train.rhem``): hard pairs sampled among the reliable ones, which the label
ontology's exclusive relations define (:func:`reliable_pairs`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from monai.losses import FocalLoss
from torch import nn

from dompre.errors import UserError

MAX_LABEL_WEIGHT = 20.0
"""The cap of :func:`label_weights` (the pretraining recipe's ``loss.max_label_weight`` default)."""


def label_weights(labels: np.ndarray | torch.Tensor,
                  max_weight: float = MAX_LABEL_WEIGHT) -> tuple[np.ndarray, np.ndarray]:
    """Per-label positive and negative weights from label frequency (LesaNet, Yan et al. 2019).

    For a label with ``P`` positives and ``N`` negatives among its known entries, ``pos = (P + N) / (2 P)`` and
    ``neg = (P + N) / (2 N)``: both halves of the label then carry the same total weight. NaN entries are not
    counted; a soft value ``y`` counts as ``y`` of a positive and ``1 - y`` of a negative.

    The rule, decided once for every caller:

    - **Cap** ``max_weight`` (default 20) on both weights. LesaNet's code (rsummers11/CADLab,
      ``LesaNet/dataset_DeepLesion.py`` ``gen_class_weights`` with ``config.yml`` ``CE_POS_WT_CLAMP: 300``) clamps
      only the positive weight, at 300, and applies the weights to DeepLesion's own training labels only. Here
      the weights of the labeled rows also weight the pseudo-labels, where a rare label's positives are the teacher's
      least reliable guesses; 20 (reached by labels positive in under 2.5% of the known rows) is what the
      pretraining recipes were tuned with (``recipes/demo.yaml``). The negative weight is capped too so the rule is
      symmetric; it exceeds 20 only for labels positive in over 97.5% of the rows.
    - **No positive or no negative** (and so a label whose entries are all NaN): weight 1 for both. The frequency
      ratio is undefined there (LesaNet's code divides by zero: an infinite positive weight clamped to 300); with
      nothing to balance, the label's loss stays plain cross-entropy, and a pseudo-positive of a label the labeled
      rows never show is not up-weighted on no evidence.

    Args:
        labels: (N, L) with 1 / 0 / soft / NaN, numpy or torch (CPU).
        max_weight: cap on any weight (rare labels otherwise dominate).

    Returns:
        ``(pos_weight, neg_weight)``, float32 arrays of shape (L,).
    """
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
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
    """Sigmoid focal loss per label with per-label weights; NaN targets are left out.

    Args:
        pos_weight: (L,) weight of positive targets (None: 1), e.g. from :func:`label_weights`.
        neg_weight: (L,) weight of negative targets (None: 1).
        gamma: focal exponent; 0 gives weighted binary cross-entropy.
        hard_fraction: 0 (off) or a share in (0, 1]: top-k hard example mining over every known lesion-label
            pair of the batch: only the ``ceil(hard_fraction × known pairs)`` pairs with the largest weighted loss
            are averaged, so the easy pairs (most negatives) stop drowning the hard ones. 1 equals no mining. This
            is the pretraining recipes' ``loss.hard_fraction``; it is not LesaNet's relational mining (that one
            needs the ontology and samples among reliable pairs only: :class:`RelationalHardExampleMining`).

    Soft targets in [0, 1] are allowed; their weight interpolates between ``neg_weight`` and ``pos_weight``.
    Without mining the result is the weighted sum divided by the number of known entries.
    """

    def __init__(self, pos_weight: np.ndarray | torch.Tensor | None = None,
                 neg_weight: np.ndarray | torch.Tensor | None = None, gamma: float = 2.0,
                 hard_fraction: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= hard_fraction <= 1.0:
            raise UserError(f"hard_fraction={hard_fraction}: 0 (off) or a share in (0, 1]")
        if (pos_weight is None) != (neg_weight is None):
            raise ValueError("give both pos_weight and neg_weight, or neither")
        for name, w in (("pos_weight", pos_weight), ("neg_weight", neg_weight)):
            self.register_buffer(name, None if w is None else torch.as_tensor(np.asarray(w), dtype=torch.float32))
        self.gamma, self.hard_fraction = float(gamma), float(hard_fraction)
        self.focal = FocalLoss(gamma=gamma, reduction="none", use_softmax=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` and ``target`` (B, L); returns a scalar."""
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(target.shape)} differ in shape; "
                             "the model's num_classes must equal the number of labels")
        known = ~torch.isnan(target)
        t = torch.where(known, target, torch.zeros_like(target)).float()
        elem = self.focal(logits.float(), t)
        if self.pos_weight is None:
            w = known.float()
        else:
            pw, nw = self.pos_weight.to(elem.device), self.neg_weight.to(elem.device)
            w = (t * pw + (1 - t) * nw) * known
        if self.hard_fraction:
            picked = (elem * w)[known]
            if not len(picked):
                return picked.sum()
            k = max(1, math.ceil(self.hard_fraction * len(picked)))
            return picked.topk(k).values.mean()
        return (elem * w).sum() / known.sum().clamp(min=1)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, hard_fraction={self.hard_fraction}, weighted={self.pos_weight is not None}"


def reliable_pairs(target: torch.Tensor, exclusive: torch.Tensor | None) -> torch.Tensor:
    """The lesion-label pairs whose target LesaNet trusts: (B, L) bool.

    Text-mined labels miss findings the report does not mention, so a plain 0 is an unreliable negative. Reliable
    are the positives (target > 0.5) and, from the ontology, every label exclusive with one of the lesion's
    positives that is not itself positive (a liver lesion is not in the lung): LesaNet's ``ex_target`` in
    ``dataset_DeepLesion.py`` and ``rhem_wt`` in ``my_process.py`` (rsummers11/CADLab). Uncertain (NaN) pairs are
    never reliable, unless an exclusive relation makes them negatives, which
    :func:`dompre.data.deeplesion.apply_label_relations` has already written as 0 into the targets.

    Args:
        target: (B, L) targets, 1 / 0 / NaN.
        exclusive: (L, L) bool exclusivity matrix (symmetric), or None (then only the positives are reliable).
    """
    pos = torch.nan_to_num(target.float(), nan=0.0) > 0.5
    if exclusive is None:
        return pos
    ex = (pos.float() @ exclusive.to(device=target.device, dtype=torch.float32)) > 0
    return pos | (ex & ~pos & ~torch.isnan(target))


class RelationalHardExampleMining(nn.Module):
    """LesaNet's relational hard example mining (RHEM, Yan et al. 2019), an extra loss term.

    As the official code (rsummers11/CADLab ``LesaNet/my_loss.py`` ``CeLossRhem``, ``config.yml`` ``RHEM_POWER: 2``,
    ``RHEM_BATCH_SIZE: 10000``, ``RHEM_LOSS_WT: 1``): among the batch's reliable lesion-label pairs
    (:func:`reliable_pairs`), ``samples`` pairs are drawn with replacement with probability proportional to
    ``|p - y| ** power`` (``p`` the sigmoid of the logit: a confident mistake is drawn most often, a pair already
    right almost never), and the loss is their mean unweighted binary cross-entropy. The caller adds it to the
    task loss with ``train.rhem_weight``. A batch without a reliable pair, or with every reliable pair already
    exact, gives 0 (with a gradient of 0).

    Args:
        exclusive: (L, L) bool exclusivity matrix of the labels (from the ontology), or None.
        samples: pairs drawn per batch (LesaNet: 10,000 from its 128 × 171 pairs).
        power: exponent of ``|p - y|`` (LesaNet: 2; 0 draws the reliable pairs uniformly).
    """

    def __init__(self, exclusive: np.ndarray | torch.Tensor | None, samples: int = 10000, power: float = 2.0) -> None:
        super().__init__()
        if samples < 1 or power < 0:
            raise ValueError(f"RHEM samples={samples} (>= 1) and power={power} (>= 0)")
        ex = None if exclusive is None else torch.as_tensor(np.asarray(exclusive, dtype=bool))
        self.register_buffer("exclusive", ex)
        self.samples, self.power = int(samples), float(power)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` and ``target`` (B, L) -> scalar loss."""
        logits = logits.float()
        reliable = reliable_pairs(target, self.exclusive)
        y = torch.nan_to_num(target.float(), nan=0.0).flatten()
        with torch.no_grad():
            gap = (torch.sigmoid(logits).flatten() - y).abs()
            w = torch.where(reliable.flatten(), gap.pow(self.power), 0.0)  # 0 ** 0 = 1: power 0 is uniform
        if not bool((w > 0).any()):
            return logits.sum() * 0.0
        idx = torch.multinomial(w, self.samples, replacement=True)
        return nn.functional.binary_cross_entropy_with_logits(logits.flatten()[idx], y[idx])

    def extra_repr(self) -> str:
        return f"samples={self.samples}, power={self.power}, relational={self.exclusive is not None}"


def label_triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """Triplet loss on L2-normalised lesion embeddings with label-set similarity (LesaNet).

    Similarity of two lesions is the Jaccard index of their positive labels (uncertain = not positive). Every
    triplet (a, p, n) of distinct batch members with ``sim(a, p) > sim(a, n)`` counts: the loss is the mean of
    ``max(0, d(a, p) - d(a, n) + margin)`` with Euclidean ``d``; 0 when the batch holds no such triplet.
    """
    e = nn.functional.normalize(emb, dim=1)
    y = (torch.nan_to_num(labels, nan=0.0) > 0.5).float()
    inter = y @ y.T
    union = y.sum(1, keepdim=True) + y.sum(1) - inter
    sim = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
    d = torch.cdist(e, e)
    n = len(e)
    eye = torch.eye(n, dtype=torch.bool, device=e.device)
    valid = (sim[:, :, None] > sim[:, None, :]) & ~eye[:, :, None] & ~eye[:, None, :]
    valid &= ~eye[None].expand(n, n, n)  # p != n
    if not valid.any():
        return e.sum() * 0.0
    hinge = (d[:, :, None] - d[:, None, :] + margin).clamp(min=0)
    return hinge[valid].mean()
