"""The perturbation study of the seed paper: change part of a slice and watch the top-5 label confidences.

Three perturbations of a uint8 ``(C, H, W)`` image, each changing only the pixels of a boolean ``(H, W)`` mask:
(a) :func:`inpaint` replaces a region with its neighbouring pixels, (b) :func:`fill` with ``value=0`` puts a
black patch on a region of interest, (c) :func:`fill` on :func:`top_pixel_mask` deletes the pixels that
integrated gradients rank highest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from dompre.errors import UserError

Box = tuple[float, float, float, float]


def box_mask(shape: tuple[int, int], box: Box) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the pixels a box ``(x1, y1, x2, y2)`` touches (x2, y2 exclusive edges)."""
    h, w = shape
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        raise UserError(f"box {box} is empty; give (x1, y1, x2, y2) with x2 > x1 and y2 > y1")
    c0, r0 = max(0, math.floor(x1)), max(0, math.floor(y1))
    c1, r1 = min(w, math.ceil(x2)), min(h, math.ceil(y2))
    if c1 <= c0 or r1 <= r0:
        raise UserError(f"box {box} lies outside the {h}x{w} image")
    mask = np.zeros((h, w), dtype=bool)
    mask[r0:r1, c0:c1] = True
    return mask


def _check(image: np.ndarray, mask: np.ndarray) -> None:
    """Shapes and dtypes shared by every perturbation."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"image must be uint8 (C, H, W), got {image.dtype} {image.shape}")
    if mask.shape != image.shape[1:] or mask.dtype != bool:
        raise ValueError(f"mask must be bool {image.shape[1:]}, got {mask.dtype} {mask.shape}")


def fill(image: np.ndarray, mask: np.ndarray, value: int = 0) -> np.ndarray:
    """A copy of ``image`` with the masked pixels of every channel set to ``value`` (0 = black)."""
    _check(image, mask)
    out = image.copy()
    out[:, mask] = value
    return out


def inpaint(image: np.ndarray, mask: np.ndarray, iterations: int | None = None) -> np.ndarray:
    """Replace the masked pixels with their neighbourhood: nearest-border fill, then harmonic (diffusion) smoothing.

    Each masked pixel starts at the value of the nearest unmasked pixel and is then repeatedly set to the mean of
    its 4 neighbours (Jacobi iterations of Laplace's equation with the unmasked pixels fixed), which blends the
    border into a smooth patch. Unmasked pixels are never changed.

    Args:
        image: uint8 ``(C, H, W)``.
        mask: bool ``(H, W)``; True = replace. At least one pixel must stay unmasked.
        iterations: smoothing sweeps (default: twice the larger side of the mask's bounding box, at most 400).
    """
    _check(image, mask)
    if mask.all():
        raise UserError("inpaint mask covers the whole image; nothing is left to fill from")
    if not mask.any():
        return image.copy()
    rows, cols = np.nonzero(mask)
    r0, r1 = max(0, rows.min() - 1), min(mask.shape[0], rows.max() + 2)
    c0, c1 = max(0, cols.min() - 1), min(mask.shape[1], cols.max() + 2)
    sub_mask = mask[r0:r1, c0:c1]
    # nearest unmasked pixel over the whole image (the crop may be all mask at an image edge)
    _, (ir, ic) = ndimage.distance_transform_edt(mask, return_indices=True)
    work = image.astype(np.float32)[:, r0:r1, c0:c1]
    work[:, sub_mask] = image[:, ir[r0:r1, c0:c1][sub_mask], ic[r0:r1, c0:c1][sub_mask]]
    n = iterations if iterations is not None else min(400, 2 * max(r1 - r0, c1 - c0))
    for _ in range(n):
        padded = np.pad(work, ((0, 0), (1, 1), (1, 1)), mode="edge")
        mean4 = (padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]) / 4
        work[:, sub_mask] = mean4[:, sub_mask]
    out = image.copy()
    out[:, r0:r1, c0:c1][:, sub_mask] = np.clip(np.rint(work[:, sub_mask]), 0, 255).astype(np.uint8)
    return out


def top_pixel_mask(attr_map: np.ndarray, fraction: float) -> np.ndarray:
    """Mask of exactly ``round(fraction * H * W)`` pixels with the highest attribution (at least one)."""
    if not 0 < fraction < 1:
        raise UserError(f"fraction {fraction} must be in (0, 1), e.g. 0.05 for the top 5% of pixels")
    flat = np.asarray(attr_map, dtype=np.float64).ravel()
    k = max(1, int(round(fraction * flat.size)))
    idx = np.argpartition(-flat, k - 1)[:k]
    mask = np.zeros(flat.size, dtype=bool)
    mask[idx] = True
    return mask.reshape(np.shape(attr_map))


def peak_box(attr_map: np.ndarray, side: int) -> Box:
    """A ``side``-pixel square centred where the positive attribution, averaged over the square, is highest."""
    h, w = attr_map.shape
    side = max(1, min(side, h, w))
    density = ndimage.uniform_filter(np.clip(attr_map, 0, None).astype(np.float64), size=side, mode="constant")
    r, c = np.unravel_index(int(np.argmax(density)), density.shape)
    r0 = int(np.clip(r - side // 2, 0, h - side))
    c0 = int(np.clip(c - side // 2, 0, w - side))
    return (c0, r0, c0 + side, r0 + side)


@dataclass
class Variant:
    """One perturbed input: its name, image, the changed-pixel mask and the label confidences."""

    name: str
    image: np.ndarray
    mask: np.ndarray
    probs: np.ndarray | None = None


def make_variants(image: np.ndarray, attr_map: np.ndarray, box: Box,
                  fractions: Sequence[float] = (0.01, 0.05, 0.10)) -> list[Variant]:
    """The original plus the study's perturbations: inpaint and black patch on ``box``, deletion of top-IG pixels."""
    roi = box_mask(image.shape[1:], box)
    variants = [Variant("original", image, np.zeros_like(roi)),
                Variant("inpaint ROI", inpaint(image, roi), roi),
                Variant("black ROI", fill(image, roi, 0), roi)]
    for f in fractions:
        m = top_pixel_mask(attr_map, f)
        variants.append(Variant(f"delete top {100 * f:g}% IG", fill(image, m, 0), m))
    return variants


def confidence_table(variants: Sequence[Variant], label_names: Sequence[str], k: int = 5) -> pd.DataFrame:
    """Confidences of the original's top-``k`` labels under every variant (rows: labels, columns: variants).

    The last row, ``"new top-1"``, names the variant's own most confident label and its confidence.
    """
    base = variants[0].probs
    if base is None:
        raise ValueError("variants have no confidences yet; run the model on them first")
    top = np.argsort(-base)[:k]
    table = pd.DataFrame({v.name: v.probs[top] for v in variants}, index=[label_names[i] for i in top])
    table.index.name = "label"
    top1 = {v.name: f"{label_names[int(np.argmax(v.probs))]} ({float(np.max(v.probs)):.3f})" for v in variants}
    return pd.concat([table.map(lambda p: f"{p:.3f}"), pd.DataFrame(top1, index=["new top-1"])])
