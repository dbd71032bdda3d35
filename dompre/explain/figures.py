"""Figures people can look at: the windowed slice, the attribution overlay and the top-5 labels (matplotlib Agg)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from dompre._io import save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from dompre.explain.perturb import Variant

View = Literal["gray", "rgb"]
STATUS_COLOURS = {"TP": "#1a9850", "FP": "#d73027", "uncertain": "#8c8c8c", "": "#4575b4"}
STATUS_TEXT = {"TP": "true positive", "FP": "false positive", "uncertain": "label uncertain/unknown",
               "": "no reference labels"}
METHOD_TEXT = {"ig": "integrated gradients", "gradcam": "Grad-CAM", "occlusion": "occlusion"}


@dataclass
class Ranked:
    """One of the top-k labels: its name, confidence and status against the reference labels."""

    label: str
    confidence: float
    status: str = ""  # "TP", "FP", "uncertain" (reference NaN) or "" (no reference labels)


@dataclass
class Panel:
    """Everything one input's figure shows."""

    name: str
    image: np.ndarray  # uint8 (3, H, W)
    amap: np.ndarray  # (H, W) display map in [0, 1]
    target: str  # explained label
    ranked: list[Ranked]
    missed: list[str] = field(default_factory=list)  # reference positives outside the top-k


def rank_labels(probs: np.ndarray, label_names: Sequence[str], truth: np.ndarray | None = None,
                k: int = 5) -> tuple[list[Ranked], list[str]]:
    """Top-``k`` labels with TP/FP status, and the reference positives the top-``k`` missed."""
    order = np.argsort(-probs)
    ranked = []
    for i in order[:k]:
        status = ""
        if truth is not None:
            t = truth[i]
            status = "uncertain" if np.isnan(t) else ("TP" if t > 0.5 else "FP")
        ranked.append(Ranked(label_names[i], float(probs[i]), status))
    missed = [] if truth is None else [label_names[i] for i in order[k:] if truth[i] > 0.5]
    return ranked, missed


def display_map(amap: np.ndarray, method: str) -> np.ndarray:
    """Map an attribution to [0, 1] for display: Grad-CAM as is; IG/occlusion positive part over its 99th pct."""
    amap = np.asarray(amap, dtype=np.float32)
    if method == "gradcam":
        return np.clip(amap, 0, 1)
    pos = np.clip(amap, 0, None)
    nz = pos[pos > 0]
    scale = float(np.percentile(nz, 99)) if nz.size else 1.0
    return np.clip(pos / max(scale, 1e-12), 0, 1)


def _image(image: np.ndarray, view: View) -> tuple[np.ndarray, str | None]:
    """What imshow gets: the middle slice in gray or the 3 slices as RGB."""
    if view == "rgb" and image.shape[0] == 3:
        return np.transpose(image, (1, 2, 0)), None
    return image[image.shape[0] // 2], "gray"


def _overlay(ax: Axes, image: np.ndarray, amap: np.ndarray, view: View, cmap: str = "jet") -> ScalarMappable:
    """Draw the slice with the map on top (transparent where the map is ~0); returns the colour mappable."""
    img, gray = _image(image, view)
    ax.imshow(img, cmap=gray, vmin=0, vmax=255)
    norm = Normalize(0, 1)
    rgba = matplotlib.colormaps[cmap](norm(amap))
    rgba[..., 3] = np.clip(amap * 1.5, 0, 0.6)
    ax.imshow(rgba)
    ax.set_axis_off()
    return ScalarMappable(norm=norm, cmap=cmap)


def _bars(ax: Axes, ranked: Sequence[Ranked], missed: Sequence[str]) -> None:
    """Horizontal bars of the top-k confidences, coloured by status, with a legend and the missed labels."""
    y = np.arange(len(ranked))[::-1]
    colours = [STATUS_COLOURS[r.status] for r in ranked]
    ax.barh(y, [r.confidence for r in ranked], color=colours, height=0.7)
    for yi, r in zip(y, ranked):
        tag = f"  {r.status}" if r.status in ("TP", "FP") else ""
        ax.text(0.02, yi, f"{r.label}  {r.confidence:.3f}{tag}", va="center", ha="left", fontsize=10,
                color="black", bbox=dict(facecolor="white", alpha=0.75, edgecolor="none", pad=1))
    ax.set_xlim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel("confidence")
    ax.set_title("top-5 labels", fontsize=11)
    statuses = list(dict.fromkeys(r.status for r in ranked))
    ax.legend(handles=[Patch(color=STATUS_COLOURS[s], label=STATUS_TEXT[s]) for s in statuses],
              loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=8, ncol=2, frameon=False)
    if missed:
        shown = ", ".join(missed[:6]) + (f" (+{len(missed) - 6})" if len(missed) > 6 else "")
        ax.text(0.0, -0.42, f"missed: {shown}", transform=ax.transAxes, fontsize=8, color=STATUS_COLOURS["FP"],
                wrap=True)


def _save(fig: Figure, path: Path) -> Path:
    """Write the figure atomically (temp name in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


def _figure(*args, **kwargs) -> Figure:
    """A new figure on the Agg canvas (no display needed, no global backend switch)."""
    return Figure(*args, **kwargs)


def save_explanation_png(path: str | Path, panel: Panel, method: str, view: View = "gray") -> Path:
    """One input's figure: windowed slice | overlay with colourbar | top-5 labels with TP/FP marks."""
    fig = _figure(figsize=(13.5, 4.6))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1.2, 1.05], "wspace": 0.3})
    img, gray = _image(panel.image, view)
    axes[0].imshow(img, cmap=gray, vmin=0, vmax=255)
    axes[0].set_title("input (middle slice)" if view == "gray" else "input (3 slices as RGB)", fontsize=11)
    axes[0].set_axis_off()
    mappable = _overlay(axes[1], panel.image, panel.amap, view)
    axes[1].set_title(f"{METHOD_TEXT.get(method, method)} for '{panel.target}'", fontsize=11)
    cbar = fig.colorbar(mappable, ax=axes[1], fraction=0.046, pad=0.03)
    cbar.set_label("Grad-CAM (1 = max)" if method == "gradcam" else "positive attribution\n(1 = 99th percentile)",
                   fontsize=9)
    _bars(axes[2], panel.ranked, panel.missed)
    fig.suptitle(panel.name, fontsize=12)
    return _save(fig, path)


def save_montage(path: str | Path, panels: Sequence[Panel], method: str, view: View = "gray",
                 ncols: int = 4) -> Path:
    """A grid of overlays, each captioned with its name and top-3 labels (green TP, red FP)."""
    if not panels:
        raise ValueError("montage needs at least one explained input")
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(figsize=(3.3 * ncols, 4.3 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, p in zip(axes, panels):
        _overlay(ax, p.image, p.amap, view)
        ax.set_title(f"{p.name}\n→ {p.target}", fontsize=9)
        for j, r in enumerate(p.ranked[:3]):
            ax.text(0.0, -0.06 - 0.085 * j, f"{r.label} {r.confidence:.2f} {r.status}".rstrip(),
                    transform=ax.transAxes, fontsize=9, color=STATUS_COLOURS[r.status], va="top")
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    fig.suptitle(f"{METHOD_TEXT.get(method, method)}: top-3 labels under each input "
                 f"(green = true positive, red = false positive, blue = no reference)", fontsize=11)
    fig.subplots_adjust(hspace=0.55, wspace=0.08)
    return _save(fig, path)


def save_perturbation_png(path: str | Path, name: str, variants: Sequence[Variant], label_names: Sequence[str],
                          view: View = "gray", k: int = 5) -> Path:
    """The perturbation study of one input: each variant (changed pixels outlined) over its top-``k`` labels."""
    n = len(variants)
    fig = _figure(figsize=(2.9 * n, 3.6))
    axes = fig.subplots(1, n, squeeze=False)[0]
    base_top = set(np.argsort(-variants[0].probs)[:k])
    for ax, v in zip(axes, variants):
        img, gray = _image(v.image, view)
        ax.imshow(img, cmap=gray, vmin=0, vmax=255)
        if v.mask.any():
            ax.contour(v.mask.astype(float), levels=[0.5], colors="#ffd700", linewidths=0.8)
        ax.set_title(v.name, fontsize=10)
        ax.set_axis_off()
        for j, i in enumerate(np.argsort(-v.probs)[:k]):
            colour = "black" if i in base_top else "#d73027"
            ax.text(0.0, -0.04 - 0.075 * j, f"{label_names[i]} {v.probs[i]:.3f}", transform=ax.transAxes,
                    fontsize=8.5, color=colour, va="top")
    fig.suptitle(f"{name}: perturbation study (yellow = changed pixels; red = label new to the top-{k})",
                 fontsize=11)
    return _save(fig, path)
