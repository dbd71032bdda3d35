"""Classifier heads shared by dompre models.

``ScorePropagation`` is LesaNet's score propagation layer (SPL): a label×label linear layer applied to the logits,
initialised to identity with zero bias, so that at the start of training it changes nothing and it then learns how
the score of one label should raise or lower the others (Yan et al., "Holistic and Comprehensive Annotation of
Clinically Significant Findings on Diverse CT Images", CVPR 2019, https://arxiv.org/abs/1904.04661).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ScorePropagation"]


class ScorePropagation(nn.Linear):
    """Score propagation layer: ``Linear(L, L)`` on the logits, initialised to identity and zero bias.

    It is an ``nn.Linear`` (state-dict keys ``weight`` and ``bias``), so timm's classifier handling (dropping
    classifier weights when ``num_classes`` changes) treats it like any other classifier layer.

    Args:
        num_classes: number of labels L (> 0).
    """

    def __init__(self, num_classes: int, device=None, dtype=None) -> None:
        if num_classes <= 0:
            raise ValueError(f"ScorePropagation needs num_classes > 0, got {num_classes}; use nn.Identity for none")
        super().__init__(num_classes, num_classes, bias=True, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """Identity weight and zero bias (called by ``nn.Linear.__init__``)."""
        with torch.no_grad():
            nn.init.eye_(self.weight)
            nn.init.zeros_(self.bias)
