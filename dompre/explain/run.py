"""Explain a batch of inputs: attributions, perturbation tables, per-input figures and a montage."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from dompre._io import write_atomic
from dompre.errors import UnknownName, UserError
from dompre.explain import attribution as A
from dompre.explain import figures as F
from dompre.explain import perturb as P
from dompre.explain.inputs import InputItem

log = logging.getLogger(__name__)
Method = Literal["ig", "gradcam", "occlusion", "perturb"]
METHODS = ("ig", "gradcam", "occlusion", "perturb")


@dataclass
class Explained:
    """What explaining one input produced."""

    name: str
    target: str  # label explained
    confidence: float  # its confidence
    png: Path  # the input's figure
    ig_delta: float | None = None  # IG completeness error |sum(attr) - (f(x) - f(0))| / |f(x) - f(0)|
    table: pd.DataFrame | None = None  # perturbation study: top-5 confidences per variant
    table_csv: Path | None = None
    perturb_png: Path | None = None


def target_index(label: str | None, label_names: Sequence[str], probs: np.ndarray) -> int:
    """Index of the label to explain: ``label`` by name, else the most confident one."""
    if label is None:
        return int(np.argmax(probs))
    if label not in label_names:
        shown = ", ".join(label_names[:20]) + (" ..." if len(label_names) > 20 else "")
        raise UnknownName(f"label {label!r} is not one of the model's {len(label_names)} labels: {shown}")
    return list(label_names).index(label)


def _file_stem(name: str) -> str:
    """A file-name-safe version of an input name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "input"


def _write_csv(table: pd.DataFrame, path: Path) -> Path:
    """Write a table atomically."""
    return write_atomic(path, table.to_csv())


def _attribute(pm: A.PixelModel, x: torch.Tensor, t: int, method: str, layer: str | None,
               n_steps: int) -> tuple[np.ndarray, float | None]:
    """Raw ``(H, W)`` attribution map of one image for ``method`` (perturb uses IG), and the IG delta."""
    if method == "gradcam":
        return A.grad_cam(pm, x, t, layer)[0].numpy(), None
    if method == "occlusion":
        return A.attribution_map(A.occlusion(pm, x, t))[0], None
    attr, delta = A.integrated_gradients(pm, x, t, n_steps=n_steps)
    gap = float(attr.sum() - delta.sum())  # captum's delta = sum(attr) - (f(x) - f(baseline))
    return A.attribution_map(attr)[0], float(delta.abs().sum()) / max(abs(gap), 1e-12)


def explain_one(pm: A.PixelModel, item: InputItem, label_names: Sequence[str], method: Method, out_dir: Path, *,
                label: str | None = None, layer: str | None = None, n_steps: int = 50,
                fractions: Sequence[float] = (0.01, 0.05, 0.10), view: F.View = "gray"
                ) -> tuple[Explained, F.Panel]:
    """Explain one input and write its figure (and, for ``perturb``, its table and study figure)."""
    x = A.to_pixels(item.image)
    probs = A.predict(pm, x)[0]
    t = target_index(label, label_names, probs)
    raw, delta = _attribute(pm, x, t, method, layer, n_steps)
    draw = "ig" if method == "perturb" else method
    ranked, missed = F.rank_labels(probs, label_names, item.truth)
    panel = F.Panel(item.name, item.image, F.display_map(raw, draw), label_names[t], ranked, missed)
    stem = _file_stem(item.name)
    png = F.save_explanation_png(out_dir / f"{stem}_{draw}.png", panel, draw, view)
    result = Explained(item.name, label_names[t], float(probs[t]), png, delta)
    if method == "perturb":
        h, w = item.image.shape[1:]
        box = item.box or P.peak_box(raw, max(4, min(h, w) // 4))
        variants = P.make_variants(item.image, raw, box, fractions)
        all_probs = A.predict(pm, A.to_pixels(np.stack([v.image for v in variants])))
        for v, p in zip(variants, all_probs):
            v.probs = p
        result.table = P.confidence_table(variants, label_names)
        result.table_csv = _write_csv(result.table, out_dir / f"{stem}_perturb.csv")
        result.perturb_png = F.save_perturbation_png(out_dir / f"{stem}_perturb.png", item.name, variants,
                                                     label_names, view)
    return result, panel


def explain_items(pm: A.PixelModel, items: Sequence[InputItem], label_names: Sequence[str], method: Method,
                  out_dir: str | Path, *, label: str | None = None, layer: str | None = None, n_steps: int = 50,
                  view: F.View = "gray") -> tuple[list[Explained], Path | None, list[tuple[str, str]]]:
    """Explain every input; one that fails is skipped and reported, the rest go on.

    Returns:
        ``(results, montage path or None when fewer than 2 inputs were explained, skipped (name, reason))``.

    Raises:
        ValueError: unknown method. KeyError: ``label`` or ``layer`` not in the model (configuration errors).
    """
    if method not in METHODS:
        raise UserError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if layer is not None and method != "gradcam":
        raise UserError(f"--layer applies to gradcam only, not to method {method!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, panels, skipped = [], [], []
    for item in items:
        try:
            res, panel = explain_one(pm, item, label_names, method, out_dir, label=label, layer=layer,
                                     n_steps=n_steps, view=view)
        except UnknownName:  # an unknown label or layer is configuration: it stops the run
            raise
        except ValueError as e:  # this input cannot be explained: skipped and reported, the others go on
            log.warning("skipping %s: %s", item.name, e)
            skipped.append((item.name, str(e)))
            continue
        results.append(res)
        panels.append(panel)
    draw = "ig" if method == "perturb" else method
    montage = F.save_montage(out_dir / f"montage_{draw}.png", panels, draw, view) if len(panels) > 1 else None
    return results, montage, skipped


def explain_montage(model: nn.Module, images: np.ndarray | Sequence[np.ndarray], label_names: Sequence[str],
                    out_png: str | Path, method: Method = "ig", *, activation: A.Activation = "sigmoid",
                    n_steps: int = 50) -> Path:
    """A montage of explanations for a model card: each image's overlay captioned with its top-3 labels.

    Args:
        model: a classifier returning logits (mean/std come from its timm data config).
        images: uint8 ``(N, 3, H, W)`` (or a list of ``(3, H, W)``) as stored in a SliceStore.
        label_names: one name per model output.
        out_png: where the PNG goes (written atomically).
        method: ``ig``, ``gradcam`` or ``occlusion`` (``perturb`` draws IG).
        activation: ``sigmoid`` (multi-label) or ``softmax`` (single-label) confidences.
        n_steps: integrated-gradient steps.

    Returns:
        the PNG's path.
    """
    was_training = model.training
    pm = A.wrap_model(model, activation)
    draw = "ig" if method == "perturb" else method
    panels = []
    try:
        for i, image in enumerate(images):
            image = np.asarray(image, dtype=np.uint8)
            x = A.to_pixels(image)
            probs = A.predict(pm, x)[0]
            t = int(np.argmax(probs))
            raw, _ = _attribute(pm, x, t, draw, None, n_steps)
            ranked, _ = F.rank_labels(probs, label_names)
            panels.append(F.Panel(f"input {i}", image, F.display_map(raw, draw), label_names[t], ranked))
    finally:
        model.train(was_training)
    return F.save_montage(Path(out_png), panels, draw)
