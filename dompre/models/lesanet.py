"""LesaNet: multi-scale RoI head for lesion annotation (Yan et al., CVPR 2019, https://arxiv.org/abs/1904.04661).

A timm backbone (``vgg16_bn`` in the paper) with ``features_only=True`` gives the five conv stages. The lesion
box is RoI-pooled (5×5, ``torchvision.ops.roi_align``) on the first ``box_stages`` stages (conv1-conv3) and
the whole patch on the others (conv4-conv5); each pooled map goes through a 256-unit FC + ReLU, the five are
concatenated, a linear classifier gives one logit per label, and the score propagation layer (a label×label
linear layer initialised to identity) refines the logits.

Any timm architecture with at least five feature stages works as backbone (tests use a tiny one); a dompre
export folder is passed as ``backbone="local-dir:PATH"`` with ``pretrained=True``.
"""
from __future__ import annotations

import math

import timm
import torch
import torch.nn as nn
from torchvision.ops import roi_align, roi_pool

from dompre.models.heads import ScorePropagation


class LesaNet(nn.Module):
    """LesaNet multi-label lesion classifier.

    Args:
        num_classes: number of labels L.
        backbone: timm model name (or ``local-dir:PATH``) for the feature extractor.
        pretrained: load the backbone's weights (needed for ``local-dir:`` and ``pretrained_cfg_overlay``).
        in_chans: input channels.
        roi_size: side of the pooled RoI grid (5 in the paper).
        fc_dim: units of the per-stage FC layer (256 in the paper).
        box_stages: stages (0-based) pooled on the lesion box; the others pool the whole patch.
        pool: ``"align"`` (roi_align) or ``"max"`` (roi_pool, as the original Caffe/PyTorch code).
        drop_rate: dropout before the classifier.
        **backbone_kwargs: passed to ``timm.create_model`` (e.g. ``pretrained_cfg_overlay``).
    """

    def __init__(self, num_classes: int, backbone: str = "vgg16_bn", *, pretrained: bool = False, in_chans: int = 3,
                 roi_size: int = 5, fc_dim: int = 256, box_stages: tuple[int, ...] = (0, 1, 2), pool: str = "align",
                 drop_rate: float = 0.0, **backbone_kwargs) -> None:
        super().__init__()
        self.backbone = timm.create_model(backbone, pretrained=pretrained, features_only=True, in_chans=in_chans,
                                          **backbone_kwargs)
        info = self.backbone.feature_info
        chans, reductions = info.channels(), info.reduction()
        if len(chans) < 5:
            raise ValueError(f"LesaNet backbone {backbone!r} has {len(chans)} feature stages; it needs 5")
        take = list(range(5))  # timm's VGG taps the final max-pool as a sixth stage: keep the five conv stages
        self.stages, self.box_stages = take, tuple(box_stages)
        self.scales = [1.0 / reductions[i] for i in take]
        self.roi_size, self.pool = roi_size, pool
        self.fcs = nn.ModuleList(nn.Sequential(nn.Flatten(), nn.Linear(chans[i] * roi_size ** 2, fc_dim),
                                               nn.ReLU(inplace=True)) for i in take)
        self.num_features = fc_dim * len(take)
        self.drop = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(self.num_features, num_classes)
        self.spl = ScorePropagation(num_classes)
        self.num_classes = num_classes
        self.pretrained_cfg = getattr(self.backbone, "pretrained_cfg", {})

    def get_classifier(self) -> nn.Module:
        """The classifier (the score propagation layer follows it)."""
        return self.classifier

    def forward_features(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Concatenated per-stage RoI features (B, 5 × fc_dim) for boxes (B, 4) x1, y1, x2, y2 in input pixels."""
        feats = self.backbone(x)
        b, _, h, w = x.shape
        batch = torch.arange(b, device=x.device, dtype=boxes.dtype)[:, None]
        whole = torch.tensor([0.0, 0.0, w, h], device=x.device, dtype=boxes.dtype).expand(b, 4)
        box_rois = torch.cat([batch, boxes.to(x.device)], 1)
        whole_rois = torch.cat([batch, whole], 1)
        out = []
        for k, (stage, scale, fc) in enumerate(zip(self.stages, self.scales, self.fcs)):
            rois = box_rois if k in self.box_stages else whole_rois
            f = feats[stage]
            if self.pool == "max":
                pooled = roi_pool(f, rois.to(f.dtype), self.roi_size, spatial_scale=scale)
            else:
                pooled = roi_align(f, rois.to(f.dtype), self.roi_size, spatial_scale=scale, sampling_ratio=2,
                                   aligned=True)
            out.append(fc(pooled))
        return torch.cat(out, 1)

    def forward(self, x: torch.Tensor, boxes: torch.Tensor, return_embedding: bool = False):
        """Logits (B, L) after score propagation (and, with ``return_embedding``, the lesion embeddings
        (B, 5 × fc_dim) that the triplet loss uses)."""
        emb = self.forward_features(x, boxes)
        logits = self.spl(self.classifier(self.drop(emb)))
        return (logits, emb) if return_embedding else logits


def label_weights(labels: torch.Tensor, max_weight: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LesaNet's per-label weights from training labels (N, L) with NaN unknown.

    β_pos = (P + N) / (2 P) and β_neg = (P + N) / (2 N) for P positives and N negatives of a label (uncertain
    labels not counted), so both classes carry equal total weight; capped at ``max_weight``.
    """
    known = ~torch.isnan(labels)
    pos = ((labels == 1) & known).sum(0).float()
    neg = ((labels == 0) & known).sum(0).float()
    total = pos + neg
    w_pos = (total / (2 * pos.clamp(min=1))).clamp(max=max_weight)
    w_neg = (total / (2 * neg.clamp(min=1))).clamp(max=max_weight)
    return w_pos, w_neg


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, w_pos: torch.Tensor | None = None,
                 w_neg: torch.Tensor | None = None, hard_fraction: float = 0.0) -> torch.Tensor:
    """Weighted binary cross entropy averaged over known entries; NaN (uncertain) labels get zero weight.

    ``hard_fraction`` in (0, 1]: relational hard example mining (RHEM, LesaNet): every lesion-label pair of the
    batch is an example; only the ``ceil(hard_fraction × known pairs)`` pairs with the largest weighted loss are
    averaged, so the easy pairs (most negatives) stop drowning the hard ones.
    """
    known = ~torch.isnan(labels)
    y = torch.nan_to_num(labels, nan=0.0)
    w_pos = torch.ones_like(logits[0]) if w_pos is None else w_pos.to(logits)
    w_neg = torch.ones_like(logits[0]) if w_neg is None else w_neg.to(logits)
    weight = torch.where(y > 0.5, w_pos, w_neg) * known
    loss = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    if hard_fraction:
        elem = (loss * weight)[known]
        if not len(elem):
            return elem.sum()
        k = max(1, math.ceil(hard_fraction * len(elem)))
        return elem.topk(k).values.mean()
    return (loss * weight).sum() / known.sum().clamp(min=1)


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
