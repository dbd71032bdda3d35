"""Attribution maps: integrated gradients and occlusion (captum), Grad-CAM (MONAI).

Every method works on a :class:`PixelModel`, which takes images scaled to [0, 1] (``uint8 / 255``) and applies
the model's own mean/std inside. Attributions are therefore in pixel space: the "black" baseline is all zeros
and a perturbation of the image is a perturbation of the attribution input.
"""
from __future__ import annotations

import copy
from typing import Literal, Sequence

import numpy as np
import torch
from captum.attr import IntegratedGradients, Occlusion
from monai.visualize import GradCAM
from timm.data import resolve_model_data_config
from torch import nn

from dompre.errors import UnknownName, UserError
from dompre.data.prep import InputPrep

Activation = Literal["sigmoid", "softmax"]


class PixelModel(nn.Module):
    """A classifier that takes ``(B, C, H, W)`` images in [0, 1] and applies ``(x - mean) / std`` itself (the
    one input preparation, :class:`~dompre.train.engine.InputPrep`, on [0, 1] pixels).

    Args:
        net: the classifier; it returns logits ``(B, L)``.
        mean: per-channel mean of the model's input normalisation (in [0, 1] units).
        std: per-channel standard deviation of the model's input normalisation.
        activation: ``"sigmoid"`` for multi-label models, ``"softmax"`` for single-label ones.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float],
                 activation: Activation = "sigmoid") -> None:
        super().__init__()
        if activation not in ("sigmoid", "softmax"):
            raise UserError(f"activation {activation!r} is not supported; use 'sigmoid' or 'softmax'")
        self.net = net
        self.activation = activation
        self.prep = InputPrep(None, mean, std, scale=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.prep(x))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Label confidences from logits: sigmoid (multi-label) or softmax (single-label)."""
        return torch.sigmoid(logits) if self.activation == "sigmoid" else torch.softmax(logits, dim=1)


def wrap_model(model: nn.Module, activation: Activation = "sigmoid",
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> PixelModel:
    """Wrap ``model`` as a :class:`PixelModel` in eval mode; mean/std default to the model's timm data config."""
    if mean is None or std is None:
        cfg = resolve_model_data_config(model)
        mean = cfg["mean"] if mean is None else mean
        std = cfg["std"] if std is None else std
    return PixelModel(model, mean, std, activation).eval()


def to_pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(C, H, W)`` or ``(B, C, H, W)`` images -> float32 batch in [0, 1]."""
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (got {x.dtype}); pass the stored 0..255 pixels")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"images must have shape (C, H, W) or (B, C, H, W), got {tuple(x.shape)}")
    return x.float() / 255.0


@torch.no_grad()
def predict(pm: PixelModel, x: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    """Label confidences ``(B, L)`` for a [0, 1] image batch."""
    out = [pm.probabilities(pm(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def _targets(target: int | Sequence[int], n: int) -> list[int]:
    """One target label index per sample."""
    t = [int(target)] * n if isinstance(target, (int, np.integer)) else [int(v) for v in target]
    if len(t) != n:
        raise ValueError(f"got {len(t)} targets for {n} images; give one label index per image")
    return t


def integrated_gradients(pm: PixelModel, x: torch.Tensor, target: int | Sequence[int], *,
                         baseline: torch.Tensor | float = 0.0, n_steps: int = 50,
                         internal_batch_size: int | None = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrated gradients of the target label's logit (captum).

    Args:
        pm: the wrapped model.
        x: image batch in [0, 1], ``(B, C, H, W)``.
        target: label index explained, one for all or one per image.
        baseline: reference image (default 0.0: black).
        n_steps: integration steps.
        internal_batch_size: images per forward/backward pass inside captum.

    Returns:
        ``(attributions (B, C, H, W), convergence delta (B,))``; by completeness the attributions of an image sum
        to ``logit(x) - logit(baseline)`` up to the delta.
    """
    ig = IntegratedGradients(pm)
    attr, delta = ig.attribute(x, baselines=baseline, target=_targets(target, len(x)), n_steps=n_steps,
                               internal_batch_size=internal_batch_size, return_convergence_delta=True)
    return attr.detach(), delta.detach()


def occlusion(pm: PixelModel, x: torch.Tensor, target: int | Sequence[int], *, window: int | None = None,
              stride: int | None = None, batch: int = 16) -> torch.Tensor:
    """Occlusion attributions (captum): drop in the target logit when a black square covers each pixel.

    Args:
        pm: the wrapped model.
        x: image batch in [0, 1], ``(B, C, H, W)``.
        target: label index explained.
        window: side of the occluding square in pixels (default: 1/8 of the shorter side, at least 2).
        stride: step between squares (default: half the window).
        batch: occluded copies evaluated per forward pass.

    Returns:
        attributions ``(B, C, H, W)``; positive where covering the pixels lowers the target's logit.
    """
    c, h, w = x.shape[1:]
    window = window or max(2, min(h, w) // 8)
    stride = stride or max(1, window // 2)
    if window > min(h, w):
        raise UserError(f"occlusion window {window} is larger than the image ({h}x{w}); pass a smaller window")
    with torch.no_grad():
        attr = Occlusion(pm).attribute(x, sliding_window_shapes=(c, window, window), strides=(c, stride, stride),
                                       baselines=0.0, target=_targets(target, len(x)),
                                       perturbations_per_eval=batch)
    return attr.detach()


def default_cam_layer(model: nn.Module) -> str:
    """A sensible Grad-CAM layer of ``model``: timm's last ``feature_info`` module, else the last Conv2d."""
    names = {n for n, _ in model.named_modules()}
    info = getattr(model, "feature_info", None)
    if info:
        last = info[-1] if isinstance(info, (list, tuple)) else None
        module = last.get("module") if isinstance(last, dict) else None
        if module and module in names:
            return module
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserError(f"{type(model).__name__} has no Conv2d layer for Grad-CAM; name one with layer=")
    return convs[-1]


def _unit_max(x: torch.Tensor) -> torch.Tensor:
    """Scale each map of a ``(B, 1, H, W)`` batch to max 1 (maps that are all zero stay zero)."""
    peak = x.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (x / peak).clamp(0.0, 1.0)


def grad_cam(pm: PixelModel, x: torch.Tensor, target: int, layer: str | None = None) -> torch.Tensor:
    """Grad-CAM (``monai.visualize.GradCAM``) of label ``target`` on ``layer`` of the wrapped network.

    Args:
        pm: the wrapped model.
        x: image batch in [0, 1], ``(B, C, H, W)``.
        target: label index explained (one for the batch).
        layer: module name inside the network (as in ``net.named_modules()``); default
            :func:`default_cam_layer`.

    Returns:
        maps ``(B, H, W)`` in [0, 1] (1 = the most important location of each image).
    """
    layer = layer or default_cam_layer(pm.net)
    names = [n for n, _ in pm.net.named_modules() if n]
    if layer not in names:
        raise UnknownName(f"layer {layer!r} is not in {type(pm.net).__name__}; choose one of: {', '.join(names[-12:])}"
                       f" (last 12 of {len(names)} shown)")
    # MONAI installs hooks it never removes and turns off in-place ops: work on a private copy.
    work = copy.deepcopy(pm).eval()
    for m in work.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    cam = GradCAM(nn_module=work, target_layers=f"net.{layer}", postprocessing=_unit_max)
    out = cam(x.clone().requires_grad_(True), class_idx=int(target))
    return out.detach()[:, 0]


def attribution_map(attr: torch.Tensor) -> np.ndarray:
    """Channel-summed signed attribution, ``(B, C, H, W)`` -> ``(B, H, W)`` float32."""
    return attr.sum(1).float().numpy()
