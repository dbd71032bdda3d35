"""The built-in benchmark: Noisy Student against the arms that bracket it, scored against the cohort's truth.

The synthetic cohort knows the labels of every slice, so every model of a run is scored on **held-out
patients** (a separate cohort, in neither the labeled nor the unlabeled share), written as DICOM and ingested
exactly like the unlabeled inputs. Its patients are split into a validation part (per-label thresholds, the
choice of the reported student) and a test part (the figures), and intervals come from a bootstrap over
test patients (:mod:`dompre.train.bootstrap`).

Arms, all with the same model, schedule and seed:

- ``teacher``: supervised on the labeled share only (iteration 0 of the run);
- ``student-1`` .. ``student-K``: the Noisy Student iterations;
- ``oracle``: the student recipe with the truth labels of the unlabeled inputs in place of pseudo-labels (the
  ceiling of what the unlabeled inputs can teach);
- ``plain``: the first student without input noise, dropout and drop path (plain self-training, the ablation).

``gap closed`` = (student - teacher) / (oracle - teacher), per seed, for the student chosen on validation.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from dompre._io import save_figure
from dompre.errors import UserError
from dompre.noisy_student import load_stage_model, make_accelerator, pseudo_targets, run, train_arm
from dompre.data.prep import InputPrep
from dompre.train.engine import predict
from dompre.train.bootstrap import patient_weights, percentile_interval, score_labels
from dompre.train.metrics import THRESHOLD_GRID, choose_thresholds

logger = logging.getLogger(__name__)
TAUGHT_MIN = 3  # a label is "taught" by the labeled share when it has at least this many training positives


def store_truth(store, truth_csv: str | Path, label_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Truth (N, L) int8 of every input of ``store`` (labels of its middle slice, nearest z in its series)
    and the patient of each input, from a synthetic cohort's ``truth/slices.csv``."""
    truth = pd.read_csv(truth_csv, dtype={"labels": str, "series_uid": str, "patient_id": str})
    truth["labels"] = truth["labels"].fillna("")
    col = {n: j for j, n in enumerate(label_names)}
    meta = store.columns(["series_uid", "z", "patient"])
    y = np.zeros((len(meta), len(label_names)), np.int8)
    by_series = {uid: g for uid, g in truth.groupby("series_uid")}
    for uid, rows in meta.groupby(meta["series_uid"].astype(str)).indices.items():
        if uid not in by_series:
            raise UserError(f"series {uid} of {store.path} is not in {truth_csv}; score a store made from that cohort")
        t = by_series[uid]
        z = t["z"].to_numpy(np.float64)
        k = np.abs(z[None, :] - meta["z"].to_numpy(np.float64)[rows, None]).argmin(1)
        for r, lab in zip(rows, t["labels"].to_numpy()[k]):
            for name in filter(None, lab.split("|")):
                if name in col:
                    y[r, col[name]] = 1
    return y, meta["patient"].astype(str).to_numpy()


@dataclass
class HeldOut:
    """Held-out inputs split by patient: rows, truth and patient of the validation and test parts."""
    store: object
    rows: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]
    patients: dict[str, np.ndarray]


def heldout_sets(store, truth_csv: str | Path, label_names: Sequence[str], val_fraction: float = 0.3,
                 seed: int = 0) -> HeldOut:
    """Split the held-out store's patients into validation and test (``val_fraction`` of the patients)."""
    y, patients = store_truth(store, truth_csv, label_names)
    uniq = np.array(sorted(set(patients)))
    order = np.random.default_rng([seed, 17]).permutation(len(uniq))
    n_val = max(1, int(round(val_fraction * len(uniq))))
    val_p = set(uniq[order[:n_val]])
    is_val = np.array([p in val_p for p in patients])
    rows = {"val": np.flatnonzero(is_val), "test": np.flatnonzero(~is_val)}
    return HeldOut(store, rows, {k: y[v] for k, v in rows.items()}, {k: patients[v] for k, v in rows.items()})


def score_model(accelerator, model, held: HeldOut, prep, *, taught: np.ndarray, replicates: int,
                batch_size: int = 128, grid: Sequence[float] = THRESHOLD_GRID) -> dict:
    """Held-out scores of one model: thresholds on val, mean AUC / F1 on test (all labels and the taught
    ones) with patient-bootstrap replicates (the same draws for every model, so differences pair up)."""
    s = {k: predict(accelerator, model, held.store, held.rows[k], prep, batch_size) for k in ("val", "test")}
    th = choose_thresholds(s["val"], held.truth["val"].astype(np.float32), grid)
    w = patient_weights(held.patients["test"], replicates, seed=0)
    out = {"val_auc": score_labels(s["val"], held.truth["val"], th, np.ones((1, len(s["val"])))).auc}
    for name, cols in (("all", None), ("taught", taught)):
        res = score_labels(s["test"], held.truth["test"], th, w, cols)
        res.n_patients = len(set(held.patients["test"]))
        out[name] = res
    return out


def pseudo_quality(kept: np.ndarray, truth: np.ndarray) -> dict:
    """Kept pseudo-labels (N, L) bool against truth (N, L): micro precision, recall, labels per input."""
    tp = float((kept & (truth == 1)).sum())
    return {"precision": tp / max(float(kept.sum()), 1.0), "recall": tp / max(float((truth == 1).sum()), 1.0),
            "labels_per_input": float(kept.sum(1).mean()), "truth_per_input": float((truth == 1).sum(1).mean()),
            "inputs_kept": int(kept.any(1).sum()), "inputs": int(len(kept))}


def dense_kept(targets: tuple, n: int, num_labels: int) -> np.ndarray:
    """(n, L) bool of the labels a student trains on, from ``(rows, targets, weights, summary)``."""
    rows, tg = targets[0], targets[1]
    out = np.zeros((n, num_labels), bool)
    for r in rows:
        out[r] = np.asarray(tg[r]) > 0
    return out


def taught_labels(data) -> np.ndarray:
    """Label columns with at least :data:`TAUGHT_MIN` positives among the labeled training inputs."""
    pos = np.nansum(data.labels[data.train_rows] == 1, axis=0)
    return np.flatnonzero(pos >= TAUGHT_MIN)


def run_arms(recipe, data, held: HeldOut, unlabeled_truth: np.ndarray, *, replicates: int = 1000) -> dict:
    """One seed: the Noisy Student run, the oracle and plain arms, each scored on the held-out patients.

    ``data``: the recipe's ``load_run_data`` (the stores and labels do not depend on the training seed).

    Returns ``{"arms": {name: scores}, "pseudo": [quality per iteration], "taught": [...], "run": result}``.
    """
    out = Path(recipe.output_dir)
    accelerator = make_accelerator(recipe, out)
    result = run(recipe, accelerator, data)
    taught = taught_labels(data)
    L, n_unl = len(data.label_names), len(data.unlabeled)
    models = {("teacher" if r["iteration"] == 0 else f"student-{r['iteration']}"): Path(r["stage"])
              for r in result["results"]}
    oracle_targets = (np.arange(n_unl), unlabeled_truth.astype(np.float32), None,
                      {"used": n_unl, "source": "truth"})
    arms = {}
    for name, stage in models.items():
        arms[name] = load_stage_model(stage, data.label_names)
    arms["oracle"] = train_arm(accelerator, recipe, data, "oracle", targets=oracle_targets)
    arms["plain"] = train_arm(accelerator, recipe, data, "plain", noise=False)
    scores = {}
    for name, model in arms.items():
        model = model.to(accelerator.device).eval()
        prep = InputPrep.for_model(model, recipe.model.img_size, recipe.train.channels_last)
        scores[name] = score_model(accelerator, model, held, prep, taught=taught, replicates=replicates,
                                   batch_size=recipe.eval.batch_size, grid=recipe.eval.thresholds)
    pseudo = []
    for it in range(recipe.iterations):
        kept = dense_kept(pseudo_targets(recipe, data, out / f"iter{it}"), n_unl, L)
        pseudo.append({"from": "teacher" if it == 0 else f"student-{it}", **pseudo_quality(kept, unlabeled_truth)})
    accelerator.end_training()
    return {"arms": scores, "pseudo": pseudo, "taught": [data.label_names[j] for j in taught],
            "label_names": data.label_names, "run": result}


# --------------------------------------------------------------------------- across arms and seeds
def _ci(reps: np.ndarray) -> list[float]:
    return list(percentile_interval(reps))


def _arm_row(s: dict) -> dict:
    a, t = s["all"], s["taught"]
    return {"val_auc": float(s["val_auc"]), "auc": a.auc, "auc_ci": a.interval("auc"), "f1": a.f1,
            "f1_ci": a.interval("f1"), "auc_taught": t.auc, "auc_taught_ci": t.interval("auc"),
            "n_inputs": a.n_inputs, "n_patients": a.n_patients, "n_labels": a.n_labels, "n_taught": t.n_labels,
            "replicates": int(len(a.auc_reps))}


def summarize(per_seed: dict[int, dict]) -> dict:
    """Arms x seeds table, the student chosen on validation per seed, gap closed and paired intervals.

    ``per_seed``: seed -> :func:`run_arms` result. The reported student of a seed is the iteration with the
    best validation AUC (never the test figure). ``gap_closed`` = (student - teacher) / (oracle - teacher) on
    test mean AUC over all labels (``_taught``: over the labels the labeled share teaches).
    """
    seeds, rows, pooled = sorted(per_seed), {}, {"all": [], "taught": []}
    for seed in seeds:
        arms = per_seed[seed]["arms"]
        students = [n for n in arms if n.startswith("student-")]
        best = max(students, key=lambda n: arms[n]["val_auc"]) if students else None
        row = {"arms": {n: _arm_row(s) for n, s in arms.items()}, "chosen": best,
               "pseudo": per_seed[seed]["pseudo"]}
        for key in ("all", "taught"):
            if best is None or "oracle" not in arms:
                continue
            t, s, o = (arms[n][key] for n in ("teacher", best, "oracle"))
            diff = s.auc_reps - t.auc_reps
            row[f"student_minus_teacher_{key}"] = {"value": s.auc - t.auc, "ci": _ci(diff)}
            # no gap to close when the oracle is not above the teacher: undefined, not a ratio of two negatives
            row[f"gap_closed_{key}"] = (s.auc - t.auc) / (o.auc - t.auc) if o.auc > t.auc else float("nan")
            row[f"plain_minus_teacher_{key}"] = {"value": arms["plain"][key].auc - t.auc,
                                                 "ci": _ci(arms["plain"][key].auc_reps - t.auc_reps)} \
                if "plain" in arms else None
            pooled[key].append((diff, row[f"gap_closed_{key}"], s.auc - t.auc))
        rows[seed] = row
    out = {"seeds": seeds, "per_seed": rows}
    for key, items in pooled.items():
        if not items:
            continue
        gaps = np.array([g for _, g, _ in items], np.float64)
        diff = np.nanmean(np.stack([d for d, _, _ in items]), 0)  # the same patient draws in every seed
        out[f"gap_closed_{key}"] = {"mean": float(np.nanmean(gaps)) if np.isfinite(gaps).any() else None,
                                    "per_seed": [float(g) for g in gaps], "ci": _t_interval(gaps)}
        out[f"student_minus_teacher_{key}"] = {"mean": float(np.mean([v for _, _, v in items])),
                                               "per_seed": [float(v) for _, _, v in items], "ci": _ci(diff)}
    return out


def _t_interval(values: np.ndarray) -> list[float] | None:
    """95% t-interval of the mean over seeds (None with fewer than two)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return None
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return [float(v.mean() - half), float(v.mean() + half)]


def plot_arms(summary: dict, path: Path) -> None:
    """One figure: held-out test mean AUC (95% patient interval) of every arm, one marker per seed."""
    import matplotlib  # lazy: 0.7 s to import (measured), and only the benchmark's last step plots
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = summary["seeds"]
    names = list(summary["per_seed"][seeds[0]]["arms"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=False)
    for ax, key, title in ((axes[0], "auc", "all labels"), (axes[1], "auc_taught", "labels the labeled share teaches")):
        for j, seed in enumerate(seeds):
            arms = summary["per_seed"][seed]["arms"]
            x = np.arange(len(names)) + (j - (len(seeds) - 1) / 2) * 0.12
            y = np.array([arms[n][key] for n in names])
            lo = np.array([arms[n][f"{key}_ci"][0] for n in names])
            hi = np.array([arms[n][f"{key}_ci"][1] for n in names])
            ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="o", capsize=3, label=f"seed {seed}")
        ax.set_xticks(np.arange(len(names)), names, rotation=20)
        ax.set_ylabel("held-out test mean AUC")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def source_stats(stores: dict, sample: int = 400, seed: int = 0) -> dict:
    """Per source (labeled, unlabeled, held-out store): how much body an input holds, its mean grey and the
    body box it was cut from (median height x width in source pixels), on up to ``sample`` inputs each.
    Inputs made by one preparation should look alike whatever their source."""
    out = {}
    for name, store in stores.items():
        n = len(store)
        rows = np.sort(np.random.default_rng(seed).choice(n, min(sample, n), replace=False))
        img = store.images(rows)
        body = (img > 40).mean(axis=(1, 2, 3))  # grey 40 ~ -380 HU in the default window: body, not air
        row = {"inputs": int(n), "body_fraction": float(body.mean()), "body_fraction_p10": float(np.percentile(body, 10)),
               "mean_grey": float(img.mean())}
        boxes = store.columns(["body_box"])["body_box"].to_numpy()[rows]  # None where not recorded
        box = np.array([b for b in boxes if isinstance(b, (list, tuple, np.ndarray)) and len(b) == 4], np.float64)
        if len(box):
            row["box_h"] = float(np.median(box[:, 1] - box[:, 0]))
            row["box_w"] = float(np.median(box[:, 3] - box[:, 2]))
        out[name] = row
    return out
