"""Plots of downstream runs and studies (matplotlib, Agg backend): ROC curves, confusion matrix, learning curves,
and the study's metric-versus-freeze chart. Each function writes one PNG atomically and returns its path."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dompre._io import save_figure


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    return save_figure(fig, path, dpi=100, bbox_inches="tight")


def plot_roc(scores: np.ndarray, labels: np.ndarray, names: Sequence[str], path: Path, max_curves: int = 20) -> Path:
    """One-vs-rest ROC curve per label/class with its AUC (NaN labels skipped; at most ``max_curves``)."""
    from sklearn.metrics import roc_auc_score, roc_curve
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    drawn = 0
    for j, name in enumerate(names):
        known = ~np.isnan(labels[:, j])
        y = labels[known, j] == 1
        if drawn >= max_curves or not y.any() or y.all():
            continue
        fpr, tpr, _ = roc_curve(y, scores[known, j])
        ax.plot(fpr, tpr, lw=1, label=f"{name} ({roc_auc_score(y, scores[known, j]):.3f})")
        drawn += 1
    ax.plot([0, 1], [0, 1], "k--", lw=0.5)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test)")
    if drawn:
        ax.legend(fontsize=6, loc="lower right")
    return _save(fig, path)


def plot_confusion(cm: np.ndarray, names: Sequence[str], path: Path) -> Path:
    """Confusion matrix (rows true, columns predicted) with counts."""
    from sklearn.metrics import ConfusionMatrixDisplay
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(names), 1 + 0.5 * len(names)))
    ConfusionMatrixDisplay(np.asarray(cm), display_labels=list(names)).plot(ax=ax, colorbar=False,
                                                                           xticks_rotation="vertical")
    return _save(fig, path)


def plot_learning_curves(histories: Sequence[Sequence[dict]], path: Path) -> Path:
    """Train and val loss per epoch, one pair of lines per ensemble member."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k, hist in enumerate(histories):
        ep = [h["epoch"] for h in hist]
        ax.plot(ep, [h["train_loss"] for h in hist], "-o", ms=3, label=f"train {k}")
        ax.plot(ep, [h["val_loss"] for h in hist], "--o", ms=3, label=f"val {k}")
    ax.set(xlabel="epoch", ylabel="loss", title="learning curves")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_study(summary, metric: str, path: Path) -> Path:
    """Mean ± std of ``metric`` against freeze %, one line per init (and strategy)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, rows in summary.groupby(["init", "strategy"]):
        rows = rows.sort_values("freeze")
        ax.errorbar(rows["freeze"], rows["mean"], yerr=rows["std"].fillna(0), capsize=3, marker="o",
                    label=" / ".join(map(str, key)))
    ax.set(xlabel="frozen layers (%)", ylabel=metric, title=f"{metric}: mean ± std over seeds")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_tsne(panels: list[tuple[str, Path]], path: Path, seed: int = 0) -> Path:
    """One t-SNE panel (``sklearn.manifold.TSNE``) per ``(title, features.npz)``, points coloured by class
    (multi-label: the first positive label; none = grey)."""
    from sklearn.manifold import TSNE
    plt = _plt()
    n = len(panels)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, npz) in zip(axes.ravel(), panels):
        with np.load(npz) as f:
            x, y = f["features"].astype(np.float64), np.nan_to_num(f["labels"], nan=0.0)
        colour = np.where(y.max(1) > 0, y.argmax(1), -1)
        if len(x) >= 3:
            emb = TSNE(2, perplexity=float(min(30, max(1, (len(x) - 1) / 3))), init="pca",
                       random_state=seed).fit_transform(x)
            ax.scatter(emb[:, 0], emb[:, 1], c=colour, cmap="tab20", s=8, vmin=-1, vmax=19)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, Path(path))
