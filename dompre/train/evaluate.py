"""Evaluation of each stage with the LesaNet protocol, and the per-iteration table (CSV, Markdown) and plot.

Thresholds per label are chosen on the validation rows (``dompre.train.metrics.choose_thresholds``) and reused
on the text-mined test rows and on the hand-labeled rows; predictions are expanded to ontology parents;
uncertain labels are left out (``dompre.train.metrics.lesanet_eval``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from dompre._io import save_figure, write_atomic
from dompre.data.prep import InputPrep
from dompre.train.engine import predict
from dompre.train.metrics import choose_thresholds, lesanet_eval

METRICS = ("auc", "f1", "precision", "recall")


@dataclass
class EvalSets:
    """Rows of the labeled store and their label matrices: ``val`` (thresholds), ``test``, ``hand`` (optional)."""
    rows: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]


def evaluate_model(accelerator, model, store, sets: EvalSets, prep: InputPrep, *, label_names: Sequence[str],
                   parents: Sequence[Sequence[int]] | None, batch_size: int,
                   grid: Sequence[float]) -> dict:
    """Scores on every set, thresholds from val, LesaNet metrics on test (and hand). Returns a JSON-able dict."""
    scores = {name: predict(accelerator, model, store, rows, prep, batch_size)
              for name, rows in sets.rows.items() if len(rows)}
    if "val" in scores:
        thresholds = choose_thresholds(scores["val"], sets.labels["val"], grid)
    else:
        thresholds = np.full(len(label_names), 0.5)
    out: dict = {"thresholds": [float(t) for t in thresholds]}
    for name in ("val", "test", "hand"):
        if name not in scores:
            continue
        r = lesanet_eval(scores[name], sets.labels[name], thresholds, parents=parents, label_names=label_names)
        out[name] = {m: _num(r[m]) for m in METRICS}
        out[name]["n_labels"] = int(r["n_labels"])
        out[name]["n_inputs"] = int(len(sets.rows[name]))
        out[f"{name}_per_label"] = {k: {c: _num(v) for c, v in row.items()}
                                    for k, row in r["per_label"].to_dict(orient="index").items()}
    return out


def _num(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def write_json(path: Path, data: dict) -> None:
    """Atomic JSON write."""
    write_atomic(path, json.dumps(data, indent=1))


def iteration_table(results: list[dict]) -> list[dict]:
    """One row per iteration (teacher = 0): model, pseudo-label use and the mean metrics per set."""
    rows = []
    for r in results:
        row = {"iteration": r["iteration"], "role": "teacher" if r["iteration"] == 0 else "student",
               "model": r["model"], "pseudo_inputs": r.get("pseudo_used", 0)}
        for name in ("test", "hand", "val"):
            for m in METRICS:
                v = r.get("metrics", {}).get(name, {}).get(m)
                row[f"{name}_{m}"] = v
        rows.append(row)
    return rows


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_report_tables(out_dir: Path, results: list[dict]) -> dict[str, Path]:
    """``metrics.csv``, ``metrics.md`` (Table-2 style) and ``metrics.png`` in ``out_dir``."""
    rows = iteration_table(results)
    df = pd.DataFrame(rows)
    df = df.loc[:, [c for c in df.columns if df[c].notna().any()]]
    paths = {"csv": out_dir / "metrics.csv", "md": out_dir / "metrics.md", "png": out_dir / "metrics.png"}
    write_atomic(paths["csv"], df.to_csv(index=False))
    header = "| " + " | ".join(df.columns) + " |"
    lines = [header, "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(_fmt(v if not (isinstance(v, float) and math.isnan(v)) else None)
                                for v in rec) + " |" for rec in df.itertuples(index=False)]
    write_atomic(paths["md"], "\n".join(lines) + "\n")
    _plot(df, paths["png"])
    return paths


def _plot(df, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("auc", "f1")):
        for name in ("test", "hand", "val"):
            col = f"{name}_{metric}"
            if col in df:
                ax.plot(df["iteration"], df[col].astype(float), marker="o", label=name)
        ax.set_xlabel("iteration (0 = teacher)")
        ax.set_ylabel(f"mean {metric.upper()} over labels")
        ax.set_xticks(list(df["iteration"]))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
