"""Patient-level bootstrap of multi-label metrics: mean AUC and F1 with 95% intervals.

Inputs of one patient are correlated (neighbouring slices), so intervals resample *patients*, not inputs: a
replicate draws patients with replacement and gives each input the multiplicity of its patient as a weight.
Weighted AUC and F1 are computed for all replicates at once (one sort per label, matrix products over
replicates), so 1,000 replicates over 1,000 inputs and 40 labels take about a second. With all weights 1 the
figures equal ``sklearn.metrics.roc_auc_score`` / ``f1_score`` (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def patient_weights(groups: np.ndarray, replicates: int, seed: int = 0) -> np.ndarray:
    """(replicates, N) float32 weights: each replicate draws the distinct ``groups`` with replacement."""
    groups = np.asarray(groups)
    uniq, inv = np.unique(groups, return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(uniq), size=(replicates, len(uniq)))
    counts = np.zeros((replicates, len(uniq)), np.float32)
    np.add.at(counts, (np.repeat(np.arange(replicates), len(uniq)), draws.ravel()), 1.0)
    return counts[:, inv]


def weighted_auc(scores: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC of one label under each row of weights ``w`` (B, N); ties count one half. NaN where a
    replicate has no positive or no negative weight."""
    uniq, inv = np.unique(np.asarray(scores, np.float64), return_inverse=True)
    onehot = np.zeros((len(scores), len(uniq)), np.float32)
    onehot[np.arange(len(scores)), inv] = 1.0
    pos = (w * (y == 1)) @ onehot      # (B, U) positive weight at each distinct score
    neg = (w * (y == 0)) @ onehot
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(1)
    den = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def weighted_f1(pred: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """F1 of one label's boolean predictions under each row of weights (B, N); NaN without positives."""
    tp = w @ (pred & (y == 1)).astype(np.float32)
    fp = w @ (pred & (y == 0)).astype(np.float32)
    fn = w @ (~pred & (y == 1)).astype(np.float32)
    npos = tp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(npos > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1e-12), np.nan)


@dataclass
class Scored:
    """Mean-over-labels metrics: point estimates, bootstrap replicates (B,) and 95% intervals."""
    auc: float
    f1: float
    auc_reps: np.ndarray
    f1_reps: np.ndarray
    n_labels: int
    n_inputs: int
    n_patients: int

    def interval(self, name: str) -> tuple[float, float]:
        """2.5 and 97.5 percentiles of the replicates of ``auc`` or ``f1``."""
        return percentile_interval(getattr(self, f"{name}_reps"))

    def as_dict(self) -> dict:
        return {"auc": self.auc, "auc_ci": list(self.interval("auc")), "f1": self.f1,
                "f1_ci": list(self.interval("f1")), "n_labels": self.n_labels, "n_inputs": self.n_inputs,
                "n_patients": self.n_patients}


def score_labels(scores: np.ndarray, y: np.ndarray, thresholds: np.ndarray, weights: np.ndarray,
                 columns: np.ndarray | None = None) -> Scored:
    """Mean AUC and F1 over the label ``columns`` that have a positive and a negative, with replicates.

    Args:
        scores: (N, L) probabilities. y: (N, L) truth 1 / 0. thresholds: (L,) decisions (chosen on val).
        weights: (B, N) bootstrap weights (:func:`patient_weights`); row 0 need not be all ones, the point
            estimate is computed unweighted.
        columns: labels to average over (default: all evaluable).
    """
    y = np.asarray(y)
    cols = np.arange(y.shape[1]) if columns is None else np.asarray(columns, dtype=np.int64)
    cols = [c for c in cols if (y[:, c] == 1).any() and (y[:, c] == 0).any()]
    ones = np.ones((1, len(y)), np.float32)
    w = np.concatenate([ones, np.asarray(weights, np.float32)])
    aucs = np.stack([weighted_auc(scores[:, c], y[:, c], w) for c in cols]) if cols else np.full((1, len(w)), np.nan)
    f1s = np.stack([weighted_f1(scores[:, c] >= thresholds[c], y[:, c], w) for c in cols]) if cols \
        else np.full((1, len(w)), np.nan)
    auc_m, f1_m = np.nanmean(aucs, 0), np.nanmean(f1s, 0)
    return Scored(float(auc_m[0]), float(f1_m[0]), auc_m[1:], f1_m[1:], len(cols), len(y), 0)


def percentile_interval(replicates: np.ndarray) -> tuple[float, float]:
    """95% percentile interval (2.5th and 97.5th, NaN replicates left out) of bootstrap replicates; of a paired
    difference when given ``a_reps - b_reps`` over the same patient draws."""
    return tuple(float(v) for v in np.nanpercentile(replicates, [2.5, 97.5]))
