"""Evaluation metrics: the LesaNet multi-label protocol and single-label classification reports.

Every underlying number comes from :mod:`sklearn.metrics`; this module only applies the protocol around it.

LesaNet protocol (Yan et al., CVPR 2019; ``../shared/formats.md``):

1. per label, choose the threshold in {0.3, 0.4, ..., 0.9} with the best F1 on the validation set
   (1.0 if none gives F1 > 0), and reuse it on every test set;
2. threshold the scores, then expand predicted labels to their ontology parents;
3. per label, leave out uncertain elements (NaN in the label matrix); a label with no positive or no
   negative left is NaN and left out of the means;
4. report the mean over labels of AUC, F1, precision and recall.

As in LesaNet's ``evaluate.py``, a label with positives but no positive prediction has precision 1 and F1 0.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn import metrics as skm

THRESHOLD_GRID: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _check_multilabel(scores: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Return float arrays (n, L) after checking that scores and labels agree in shape."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"{what}: scores {scores.shape} and labels {labels.shape} must both be (n_samples, "
                         f"n_labels); pass one row per sample and one column per label")
    bad = ~np.isnan(labels) & (labels != 0) & (labels != 1)
    if bad.any():
        raise ValueError(f"{what}: labels must be 0, 1 or NaN (uncertain); found {np.unique(labels[bad])[:5]}")
    return scores, labels


def _evaluable(labels: np.ndarray) -> np.ndarray:
    """(L,) bool: labels with at least one certain positive and one certain negative."""
    return ((labels == 1).any(axis=0)) & ((labels == 0).any(axis=0))


def _per_label_auc(y: np.ndarray, certain: np.ndarray, scores: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """ROC AUC of each column in ``cols`` over its certain rows (NaN elsewhere)."""
    auc = np.full(y.shape[1], np.nan)
    full = np.array([c for c in cols if certain[:, c].all()], dtype=np.int64)
    if len(full) > 1:  # one sklearn call for every label without uncertain elements
        auc[full] = skm.roc_auc_score(y[:, full], scores[:, full], average=None)
    else:
        full = np.empty(0, np.int64)
    for c in np.setdiff1d(cols, full):
        m = certain[:, c]
        auc[c] = skm.roc_auc_score(y[m, c], scores[m, c])
    return auc


def choose_thresholds(val_scores: np.ndarray, val_labels: np.ndarray,
                      grid: Sequence[float] = THRESHOLD_GRID) -> np.ndarray:
    """Per-label decision thresholds with the best validation F1, as LesaNet chooses them.

    Args:
        val_scores: (n, L) probabilities on the validation set.
        val_labels: (n, L) targets 1 / 0, NaN for uncertain (skipped).
        grid: thresholds to try, in increasing order; ties keep the lowest.

    Returns:
        float64 (L,) thresholds; 1.0 for a label where no threshold gives F1 > 0 (or that has no positive or
        no negative on the validation set).
    """
    scores, labels = _check_multilabel(val_scores, val_labels, "choose_thresholds")
    y, certain = labels == 1, ~np.isnan(labels)
    ok = _evaluable(labels)
    out, best = np.ones(scores.shape[1]), np.zeros(scores.shape[1])
    for th in (grid if ok.any() else ()):
        # an uncertain element counts as (target 0, prediction 0): a true negative, which F1 ignores
        f1 = skm.f1_score(y, (scores >= th) & certain, average=None, zero_division=0.0)
        better = ok & (f1 > best)
        best[better], out[better] = f1[better], float(th)
    return out


def expand_to_parents(pred: np.ndarray, parent_indices: Sequence[Sequence[int]]) -> np.ndarray:
    """Turn on the parents of every predicted label.

    Args:
        pred: (n, L) bool predictions.
        parent_indices: per label, the indices of its ancestors (``Ontology.parent_indices``; pass all
            ancestors, not only direct parents, since the expansion is one pass).

    Returns:
        A new bool array (n, L).
    """
    pred = np.asarray(pred, dtype=bool)
    if len(parent_indices) != pred.shape[1]:
        raise ValueError(f"expand_to_parents: {len(parent_indices)} parent lists for {pred.shape[1]} labels; "
                         "pass one list per label column")
    out = pred.copy()
    for j, parents in enumerate(parent_indices):
        if len(parents):
            out[:, list(parents)] |= pred[:, [j]]
    return out


def lesanet_eval(scores: np.ndarray, labels: np.ndarray, thresholds: np.ndarray | float,
                 parents: Sequence[Sequence[int]] | None = None,
                 label_names: Sequence[str] | None = None) -> dict:
    """Evaluate multi-label scores with the LesaNet protocol.

    Args:
        scores: (n, L) probabilities.
        labels: (n, L) targets 1 / 0, NaN for uncertain elements (left out per element).
        thresholds: (L,) per-label thresholds from :func:`choose_thresholds` on the validation set, or one float.
        parents: per label, its ancestor indices; predictions are expanded to them before scoring.
        label_names: names for the rows of the per-label table (default: ``0..L-1``).

    Returns:
        dict with ``per_label`` (DataFrame: n_pos, n_neg (certain elements), threshold, auc, f1, precision,
        recall; NaN metrics for labels with no positive or no negative), the means over evaluated labels ``auc``, ``f1``,
        ``precision``, ``recall``, ``n_labels`` (labels evaluated) and ``pred`` (bool (n, L) predictions
        after parent expansion).
    """
    scores, labels = _check_multilabel(scores, labels, "lesanet_eval")
    n_labels = scores.shape[1]
    ths = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (n_labels,))
    pred = scores >= ths
    if parents is not None:
        pred = expand_to_parents(pred, parents)
    names = list(label_names) if label_names is not None else list(range(n_labels))
    if len(names) != n_labels:
        raise ValueError(f"lesanet_eval: {len(names)} label names for {n_labels} label columns")
    y, certain = labels == 1, ~np.isnan(labels)
    ok = _evaluable(labels)
    p = pred & certain  # uncertain elements become true negatives, which precision/recall/F1 ignore
    cols = {k: np.full(n_labels, np.nan) for k in ("auc", "f1", "precision", "recall")}
    if ok.any():
        cols["auc"] = _per_label_auc(y, certain, scores, np.flatnonzero(ok))
        for k, fn, zero in (("f1", skm.f1_score, 0.0), ("precision", skm.precision_score, 1.0),
                            ("recall", skm.recall_score, 0.0)):
            cols[k] = np.where(ok, fn(y, p, average=None, zero_division=zero), np.nan)
    table = pd.DataFrame({"n_pos": (y & certain).sum(0), "n_neg": (~y & certain).sum(0), "threshold": ths,
                          **cols}, index=pd.Index(names, name="label"))
    mean = (lambda c: float(table.loc[ok, c].mean()) if ok.any() else float("nan"))
    return {"per_label": table, "auc": mean("auc"), "f1": mean("f1"), "precision": mean("precision"),
            "recall": mean("recall"), "n_labels": int(ok.sum()), "pred": pred}


def classification_report(y_true: Sequence, y_pred: Sequence, y_score: np.ndarray | None = None,
                          labels: Sequence | None = None) -> dict:
    """Single-label (multi-class or binary) metrics, as the Medico / Kvasir task reports them.

    Args:
        y_true: (n,) true classes.
        y_pred: (n,) predicted classes.
        y_score: optional (n, K) class scores, column k belonging to ``labels[k]``; enables per-class
            one-vs-rest AUC.
        labels: the K classes in order. Default: ``0..K-1`` when ``y_score`` is given, else the sorted
            classes seen in ``y_true`` and ``y_pred``.

    Returns:
        dict with ``accuracy``, ``mcc``, macro ``f1`` / ``precision`` / ``recall`` / ``specificity``,
        ``auc`` (mean of the per-class AUCs that are defined; NaN without scores), ``per_class`` (DataFrame:
        support, precision, recall, f1, specificity, auc), ``confusion_matrix`` (K, K) with rows = true and
        columns = predicted class, and ``labels``.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"classification_report: y_true {y_true.shape} and y_pred {y_pred.shape} must be equal "
                         "1-D arrays of class labels")
    if labels is None:
        labels = list(range(y_score.shape[1])) if y_score is not None else sorted(set(y_true) | set(y_pred))
    labels = list(labels)
    if y_score is not None:
        y_score = np.asarray(y_score, dtype=np.float64)
        if y_score.shape != (len(y_true), len(labels)):
            raise ValueError(f"classification_report: y_score has shape {y_score.shape}, expected "
                             f"({len(y_true)}, {len(labels)}) = (samples, classes in `labels` order)")
    prec, rec, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                                 zero_division=0.0)
    mcm = skm.multilabel_confusion_matrix(y_true, y_pred, labels=labels)  # per class [[tn, fp], [fn, tp]]
    tn, fp = mcm[:, 0, 0], mcm[:, 0, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        spec = np.where(tn + fp > 0, tn / np.maximum(tn + fp, 1), np.nan)
    auc = np.full(len(labels), np.nan)
    if y_score is not None:
        for k, c in enumerate(labels):
            y = y_true == c
            if y.any() and not y.all():
                auc[k] = skm.roc_auc_score(y, y_score[:, k])
    per_class = pd.DataFrame({"support": support, "precision": prec, "recall": rec, "f1": f1,
                              "specificity": spec, "auc": auc}, index=pd.Index(labels, name="class"))
    return {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "mcc": float(skm.matthews_corrcoef(y_true, y_pred)),
        "f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0.0)),
        "precision": float(skm.precision_score(y_true, y_pred, labels=labels, average="macro",
                                               zero_division=0.0)),
        "recall": float(skm.recall_score(y_true, y_pred, labels=labels, average="macro", zero_division=0.0)),
        "specificity": float(np.nanmean(spec)) if np.isfinite(spec).any() else float("nan"),
        "auc": float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan"),
        "per_class": per_class,
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels),
        "labels": labels,
    }


def auc_micro(scores: np.ndarray, labels: np.ndarray) -> float:
    """Micro-averaged ROC AUC: one ROC over every certain (sample, label) element of the (n, L) matrices.

    For a single-label task pass one-hot labels and the class probabilities (Kierzynka 2019's AUC-ROC
    micro-average). NaN labels are left out; NaN when no positive or no negative element remains.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, np.float64)
    if scores.shape != labels.shape:
        raise ValueError(f"auc_micro: scores {scores.shape} and labels {labels.shape} must have the same shape")
    certain = ~np.isnan(labels)
    y, s = labels[certain], scores[certain]
    if not (y == 1).any() or not (y == 0).any():
        return float("nan")
    return float(skm.roc_auc_score(y, s))
