"""Feature extraction for ``train.strategy=features`` (Dang et al. 2019): a chosen layer, pooling, several input
scales, and PCA or VLAD encoding, before the scikit-learn linear classifier.

- ``train.feature_layer``: empty = the model's pooled pre-logits features; else a ``model.named_modules()`` name, or
  an integer ``k`` = the module of ``model.feature_info[k]`` (timm's feature stages). The layer's output map is
  taken with a forward hook.
- ``train.feature_pool``: ``avg`` or ``max`` global pooling of that map.
- ``train.feature_scales``: input sides, e.g. ``[224, 544]``: the batch is resized to each side and run fully
  convolutionally; the pooled features of the scales are concatenated (``len(scales) × C`` values).
- ``train.feature_encoding``: ``none``; ``pca`` (``sklearn.decomposition.PCA`` to ``train.pca_dim``, fitted on
  train); ``vlad``: the local descriptors (every position of the map, at every scale) are assigned to
  ``train.vlad_k`` k-means centres (``sklearn.cluster.KMeans`` fitted on train descriptors); the VLAD vector is the
  concatenation over centres of the summed residuals ``Σ (x - c_k)`` of the descriptors assigned to each, L2
  normalised (``k × C`` values).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from dompre.errors import UnknownName, UserError
from dompre.data.prep import InputPrep


def resolve_layer(model: nn.Module, layer: str) -> nn.Module | None:
    """The module named by ``layer`` (a module name or a feature_info index); None for the pre-logits features."""
    if layer == "":
        return None
    modules = dict(model.named_modules())
    if layer.lstrip("-").isdigit():
        info = getattr(model, "feature_info", None)
        if not info:
            raise UnknownName(f"train.feature_layer={layer}: the model has no feature_info; give a module name")
        entries = list(info)
        k = int(layer)
        if not -len(entries) <= k < len(entries):
            raise UnknownName(f"train.feature_layer={layer}: the model has {len(entries)} feature stages "
                           f"(0..{len(entries) - 1}): {[e['module'] for e in entries]}")
        layer = entries[k]["module"]
        layer = layer if layer in modules else layer.replace("_", ".")
    if layer not in modules:
        tops = [n for n in modules if n and n.count(".") <= 1]
        raise UnknownName(f"train.feature_layer={layer!r} is not a module of the model; e.g. {', '.join(tops[:40])}")
    return modules[layer]


class LayerTap:
    """Forward hook keeping the output map of one module (NCHW)."""

    def __init__(self, module: nn.Module) -> None:
        self.out = None
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.out = output[0] if isinstance(output, (tuple, list)) else output

    def close(self) -> None:
        self.handle.remove()


def pool_map(fmap: torch.Tensor, how: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, C) by global ``avg`` or ``max`` pooling."""
    if how == "max":
        return fmap.amax(dim=(2, 3))
    if how == "avg":
        return fmap.mean(dim=(2, 3))
    raise UserError(f"train.feature_pool={how!r}: use avg or max")


@torch.no_grad()
def extract(model: nn.Module, loader, prep: InputPrep, *, layer: str = "",
            pool: str = "avg", scales: tuple[int, ...] = (), local: bool = False, keep: int = 0,
            encode=None, seed: int = 0) -> tuple[list | np.ndarray, np.ndarray, float]:
    """Features of every sample of ``loader`` (prepared by ``prep``) and their labels (N, L) and forward seconds.

    The pooled pre-logits features of a model that takes lesion boxes (LesaNet) are its ``forward_features(x,
    boxes)``.

    Features: (N, D) pooled features; with ``local`` the local descriptors of each image, either encoded batch by
    batch with ``encode`` (list of (n_i, C) -> (B, D); the descriptors of a dataset never sit in memory at once),
    or a list of (n_i, C) arrays, at most ``keep`` random descriptors an image when ``keep`` > 0.
    """
    rng = np.random.default_rng(seed)
    model.eval()
    device = next(model.parameters()).device
    module = resolve_layer(model, layer)
    tap = LayerTap(module) if module is not None else None
    feats, labels, seconds = [], [], 0.0
    try:
        for batch in loader:
            t0 = time.perf_counter()
            x = prep(batch["image"].to(device))
            per_scale = []
            for side in (scales or (None,)):
                xs = x if side is None or side == x.shape[-1] else F.interpolate(
                    x, size=(side, side), mode="bilinear", align_corners=False)
                if tap is None and not local:
                    pooled = (model.forward_features(xs, batch["box"].to(device)) if "box" in batch else
                              model.forward_head(model.forward_features(xs), pre_logits=True))
                    per_scale.append(pooled.flatten(1))
                    continue
                out = model.forward_features(xs)
                fmap = tap.out if tap is not None else out
                if fmap.ndim != 4:
                    raise UserError(f"train.feature_layer={layer!r} gives a {fmap.ndim}-D output; pick a "
                                     f"convolutional layer (N, C, H, W)")
                per_scale.append(fmap.flatten(2).transpose(1, 2) if local else pool_map(fmap, pool))
            if local:  # (B, positions over all scales, C)
                desc = list(torch.cat(per_scale, 1).float().cpu().numpy())
                if encode is not None:
                    feats.append(np.asarray(encode(desc)))
                else:
                    feats.extend(d[rng.choice(len(d), keep, replace=False)] if 0 < keep < len(d) else d
                                 for d in desc)
            else:
                feats.append(torch.cat(per_scale, 1).float().cpu().numpy())
            seconds += time.perf_counter() - t0
            labels.append(batch["target"].numpy())
    finally:
        if tap is not None:
            tap.close()
    as_list = local and encode is None
    return (feats if as_list else np.concatenate(feats)), np.concatenate(labels), seconds


def vlad(descriptors: list[np.ndarray], centres: np.ndarray) -> np.ndarray:
    """VLAD vectors (N, K·C): per image, for each centre the sum of residuals of its assigned descriptors
    (nearest centre), concatenated and L2 normalised (a zero vector stays zero)."""
    k, c = centres.shape
    out = np.zeros((len(descriptors), k * c), np.float64)
    for i, d in enumerate(descriptors):
        d = np.asarray(d, np.float64)
        nearest = ((d[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        v = np.zeros((k, c))
        np.add.at(v, nearest, d - centres[nearest])
        v = v.ravel()
        norm = np.linalg.norm(v)
        out[i] = v / norm if norm > 0 else v
    return out


def fit_encoding(train_feats, how: str, *, pca_dim: int = 0, vlad_k: int = 0, seed: int = 0):
    """A fitted encoder ``feats -> (N, D)``: identity, PCA or VLAD (k-means fitted on the train descriptors)."""
    if how == "none":
        return lambda f: np.asarray(f)
    if how == "pca":
        x = np.asarray(train_feats)
        if not 0 < pca_dim <= min(x.shape):
            raise UserError(f"train.pca_dim={pca_dim}: use 1..{min(x.shape)} (train samples and feature size)")
        pca = PCA(n_components=pca_dim, random_state=seed).fit(x)
        return pca.transform
    if how == "vlad":
        allx = np.concatenate([np.asarray(d) for d in train_feats])
        if not 0 < vlad_k <= len(allx):
            raise UserError(f"train.vlad_k={vlad_k}: use 1..{len(allx)} (train descriptors)")
        rng = np.random.default_rng(seed)
        sample = allx[rng.choice(len(allx), min(len(allx), 100_000), replace=False)]
        km = KMeans(n_clusters=vlad_k, n_init=3, random_state=seed).fit(sample)
        return lambda f: vlad(f, km.cluster_centers_)
    raise UserError(f"train.feature_encoding={how!r}: use none, pca or vlad")


def fit_linear(kind: str, x: np.ndarray, y: np.ndarray, balanced: bool, seed: int):
    """Standardised features into logistic regression or a linear SVM (scikit-learn)."""
    cw = "balanced" if balanced else None
    clf = (LogisticRegression(max_iter=2000, class_weight=cw, random_state=seed) if kind == "logreg"
           else LinearSVC(class_weight=cw, random_state=seed))
    return make_pipeline(StandardScaler(), clf).fit(x, y)


def linear_scores(clf, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Class probabilities (logreg) or softmax of decision values (SVM) in columns 0..K-1."""
    classes = clf.classes_
    if hasattr(clf, "predict_proba") and hasattr(clf[-1], "predict_proba"):
        s = clf.predict_proba(x)
    else:
        d = clf.decision_function(x)
        d = np.stack([-d, d], 1) if d.ndim == 1 else d
        s = np.exp(d - d.max(1, keepdims=True))
        s /= s.sum(1, keepdims=True)
    out = np.zeros((len(x), n_classes))
    out[:, classes] = s
    return out
