"""Baseline CNNs of the source papers, registered with timm.

- ``small_cnn``: Kierzynka (2019)'s "Small CNN" baseline: four blocks of a 7×7 convolution, BatchNorm, ReLU and
  2×2 max-pooling (32, 64, 128, 256 channels), global average pooling, dropout and a linear classifier.
- ``vgg19_sepconv``: Dang et al. (2019)'s custom network: VGG19 blocks 1-3 (the same module names as timm's
  ``vgg19``, ``features.0`` .. ``features.18``, so VGG19 weights load into them by name; freeze them with
  ``train.freeze_until=features.18``), then blocks 4-5 of depthwise-separable 3×3 convolutions (512 channels, four
  a block, each a depthwise conv, a pointwise conv, BatchNorm and ReLU, then max-pooling) and the dropout head
  (global average pooling, dropout 0.5, linear).

Both take ``num_classes, in_chans, global_pool, drop_rate``, fill ``feature_info``, split ``forward_features`` /
``forward_head(pre_logits=)`` and have ``get_classifier`` / ``reset_classifier``, so ``features_only=True`` works.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["SmallCNN", "VGG19SepConv"]


class _Net(nn.Module):
    """Shared head and timm API: ``self.features`` (a Sequential) feeds pooling, dropout and ``self.fc``."""

    def _init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
        self.num_classes, self.num_features, self.drop_rate = num_classes, num_features, drop_rate
        self.head_hidden_size = num_features
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(num_features * self.global_pool.feat_mult(), num_classes) if num_classes else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.num_classes = num_classes
        self.fc = (nn.Linear(self.num_features * self.global_pool.feat_mult(), num_classes) if num_classes
                   else nn.Identity())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class SmallCNN(_Net):
    """Kierzynka's Small CNN: 4 × (conv 7×7, BN, ReLU, max-pool 2), global pool, dropout, linear."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, widths: tuple[int, ...] = (32, 64, 128, 256),
                 kernel_size: int = 7, global_pool: str = "avg", drop_rate: float = 0.0, **kwargs: Any) -> None:
        super().__init__()
        layers, c, self.feature_info = [], in_chans, []
        for i, w in enumerate(widths):
            layers.append(nn.Sequential(nn.Conv2d(c, w, kernel_size, padding=kernel_size // 2, bias=False),
                                        nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)))
            self.feature_info.append(dict(num_chs=w, reduction=2 ** (i + 1), module=f"features.{i}"))
            c = w
        self.features = nn.Sequential(*layers)
        self._init_head(c, num_classes, global_pool, drop_rate)


def _sepconv(c_in: int, c_out: int) -> nn.Sequential:
    """Depthwise 3×3, pointwise 1×1, BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),
                         nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class VGG19SepConv(_Net):
    """Dang et al.'s VGG19 blocks 1-3 + depthwise-separable blocks 4-5 + dropout head."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.5,
                 sep_width: int = 512, sep_depth: int = 4, **kwargs: Any) -> None:
        super().__init__()
        layers, c, self.feature_info = [], in_chans, []
        for block, (width, n) in enumerate(((64, 2), (128, 2), (256, 4))):  # timm vgg19 'features' indices 0..18
            for _ in range(n):
                layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(inplace=True)]
                c = width
            self.feature_info.append(dict(num_chs=c, reduction=2 ** block, module=f"features.{len(layers) - 1}"))
            layers.append(nn.MaxPool2d(2, 2))
        for block in (3, 4):
            seq = []
            for _ in range(sep_depth):
                seq.append(_sepconv(c, sep_width))
                c = sep_width
            layers.append(nn.Sequential(*seq))
            self.feature_info.append(dict(num_chs=c, reduction=2 ** block, module=f"features.{len(layers) - 1}"))
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self._init_head(c, num_classes, global_pool, drop_rate)


def _cfg(**kwargs: Any) -> dict:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
            "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "features.0", "classifier": "fc", **kwargs}


default_cfgs = generate_default_cfgs({
    "small_cnn.untrained": _cfg(paper_name="Kierzynka 2019, Small CNN baseline", first_conv="features.0.0"),
    "vgg19_sepconv.untrained": _cfg(paper_name="Dang et al. 2019, VGG19 + depthwise-separable blocks 4-5"),
})


@register_model
def small_cnn(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    """Kierzynka's 4-block 7×7 Small CNN."""
    kwargs.setdefault("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(SmallCNN, "small_cnn", pretrained, feature_cfg=dict(flatten_sequential=True),
                                **kwargs)


@register_model
def vgg19_sepconv(pretrained: bool = False, **kwargs: Any) -> VGG19SepConv:
    """VGG19 blocks 1-3 + depthwise-separable blocks 4-5 + dropout head (Dang et al. 2019)."""
    return build_model_with_cfg(VGG19SepConv, "vgg19_sepconv", pretrained,
                                feature_cfg=dict(flatten_sequential=True), **kwargs)
