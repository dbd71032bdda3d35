"""LesaNet: multi-scale RoI head for lesion annotation (Yan et al., CVPR 2019, https://arxiv.org/abs/1904.04661).

A timm backbone (``vgg16_bn`` in the paper) with ``features_only=True`` gives the five conv stages. The lesion
box is RoI-pooled (5×5, ``torchvision.ops.roi_align``) on the first ``box_stages`` stages (conv1-conv3) and
the whole patch on the others (conv4-conv5); each pooled map goes through a 256-unit FC + ReLU, the five are
concatenated, a linear classifier gives one logit per label, and the score propagation layer (a label×label
linear layer initialised to identity) refines the logits.

Any timm architecture with at least five feature stages works as backbone (tests use a tiny one); a dompre
export folder is passed as ``backbone="local-dir:PATH"`` with ``pretrained=True``. LesaNet's losses (label
weights, weighted cross-entropy, relational hard example mining, triplet loss) are in :mod:`dompre.train.losses`.
"""
from __future__ import annotations

import timm
import torch
import torch.nn as nn
from torchvision.ops import roi_align, roi_pool

from dompre.errors import UserError
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
            raise UserError(f"LesaNet backbone {backbone!r} has {len(chans)} feature stages; it needs 5")
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

    def forward(self, x: torch.Tensor, boxes: torch.Tensor, return_embedding: bool = False, parts: bool = False):
        """Logits (B, L) after score propagation (and, with ``return_embedding``, the lesion embeddings
        (B, 5 × fc_dim) that :func:`dompre.train.losses.label_triplet_loss` uses). ``parts``: a dict with
        ``logits``, ``class_logits`` (the classifier's, before score propagation: LesaNet's ``class_score1``, where
        its RHEM term applies) and ``embedding``."""
        emb = self.forward_features(x, boxes)
        class_logits = self.classifier(self.drop(emb))
        logits = self.spl(class_logits)
        if parts:
            return {"logits": logits, "class_logits": class_logits, "embedding": emb}
        return (logits, emb) if return_embedding else logits

