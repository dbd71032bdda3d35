"""Transfer study harness: ``dompre study RECIPE --init random,domain --freeze 0,50,100 --seeds 3``.

Runs the grid init × strategy × freeze × seed of one fine-tuning recipe (:mod:`dompre.train.finetune`), each run in
its own folder ``OUT/<init>_<strategy>_f<freeze>_s<seed>/`` (a finished run, one with ``metrics.json``, is reused,
so an interrupted study resumes). The data split is the same for every run (``data.split_seed``); only the
training seed changes, so the spread across seeds is the training noise.

Outputs in ``OUT``: ``runs.csv`` (one row per run), ``summary.csv`` and ``summary.md`` (mean ± std per cell, n),
``comparisons.csv`` and ``study.png`` (metric against freeze %, one line per init), ``convergence.csv``
(convergence speed: mean epoch of the best validation score per cell, and the speed-up of each init over the
first one, ``baseline mean epoch / mean epoch``), and with ``tsne`` ``tsne.png`` (t-SNE of the test-set features
of the first seed, one panel per init and freeze level, coloured by class).

**Rule for "larger than the seed-to-seed spread"**: two cells that differ in one factor only (init at the same
strategy and freeze, or freeze at the same init and strategy) are compared with Welch's two-sided t-test on their
per-seed values; the difference counts when p < ``alpha`` (0.05). A cell with fewer than 2 seeds is never
significant; two cells with zero spread count when their means differ.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy.stats import ttest_ind

from dompre._io import atomic_open, write_atomic
from dompre.errors import UnknownName, UserError
from dompre.recipes import recipe_to_dict
from dompre.train.downstream_plots import plot_study, plot_tsne
from dompre.train.finetune import FinetuneRecipe, load_finetune_recipe, run_finetune
from dompre.train.transfer import check_imagenet_weights

log = logging.getLogger(__name__)


def _cell_recipe(recipe: FinetuneRecipe, init: str, strategy: str, freeze: float, seed: int,
                 weights: str | None, tsne: bool = False) -> FinetuneRecipe:
    model = dataclasses.replace(recipe.model, init=init, weights=(weights or recipe.model.weights)
                                if init not in ("random", "imagenet") else recipe.model.weights)
    train = dataclasses.replace(recipe.train, strategy=strategy, freeze=float(freeze),
                                save_features=recipe.train.save_features or tsne)
    return dataclasses.replace(recipe, model=model, train=train, seed=seed)


def welch(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Welch t-test p-value (NaN with fewer than 2 values a side; 0 or 1 when both spreads are 0)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    if a.std() == 0 and b.std() == 0:
        return 0.0 if a.mean() != b.mean() else 1.0
    return float(ttest_ind(a, b, equal_var=False).pvalue)


def compare_cells(runs: pd.DataFrame, metric: str, alpha: float = 0.05) -> pd.DataFrame:
    """Pairs of cells differing in one factor, with mean difference, Welch p and ``significant``."""
    keys = ["init", "strategy", "freeze"]
    cells = {k: g[metric].to_numpy(float) for k, g in runs.groupby(keys)}
    rows = []
    for (ka, va), (kb, vb) in itertools.combinations(sorted(cells.items()), 2):
        differ = [name for name, x, y in zip(keys, ka, kb) if x != y]
        if len(differ) != 1:
            continue
        p = welch(va, vb)
        rows.append({"factor": differ[0], "a": "/".join(map(str, ka)), "b": "/".join(map(str, kb)),
                     "mean_a": va.mean(), "mean_b": vb.mean(), "diff": vb.mean() - va.mean(), "p_welch": p,
                     "significant": bool(p < alpha) if not np.isnan(p) else False})
    return pd.DataFrame(rows, columns=["factor", "a", "b", "mean_a", "mean_b", "diff", "p_welch", "significant"])


def convergence_table(runs: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Mean and std of ``best_epoch`` per cell, and ``speedup`` = baseline init's mean / this cell's mean (same
    strategy and freeze; NaN without a baseline cell)."""
    g = runs.groupby(["strategy", "freeze", "init"])["best_epoch"]
    out = pd.DataFrame({"mean_best_epoch": g.mean(), "std_best_epoch": g.std(ddof=1), "n": g.count()}).reset_index()
    base = out[out["init"] == baseline].set_index(["strategy", "freeze"])["mean_best_epoch"]
    ref = [base.get((r.strategy, r.freeze), np.nan) for r in out.itertuples()]
    out["speedup_vs_" + baseline] = np.asarray(ref, float) / out["mean_best_epoch"].to_numpy(float)
    return out


def summarize(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean, std (ddof 1), sem and n of ``metric`` per (init, strategy, freeze) cell."""
    g = runs.groupby(["init", "strategy", "freeze"])[metric]
    out = pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n": g.count()}).reset_index()
    out["sem"] = out["std"] / np.sqrt(out["n"])
    return out


def to_markdown(summary: pd.DataFrame, comparisons: pd.DataFrame, metric: str, alpha: float) -> str:
    """The study table (rows init / strategy, columns freeze %) and the list of significant differences."""
    freezes = sorted(summary["freeze"].unique())
    lines = [f"## {metric}: mean ± std over seeds (n)", "",
             "| init / strategy | " + " | ".join(f"freeze {f:g}%" for f in freezes) + " |",
             "|---|" + "---|" * len(freezes)]
    for (init, strategy), rows in summary.groupby(["init", "strategy"]):
        by = {r.freeze: r for r in rows.itertuples()}
        cells = [f"{by[f].mean:.4f} ± {0 if np.isnan(by[f].std) else by[f].std:.4f} ({by[f].n})" if f in by else "–"
                 for f in freezes]
        lines.append(f"| {init} / {strategy} | " + " | ".join(cells) + " |")
    lines += ["", f"Differences larger than the seed-to-seed spread (Welch two-sided t-test, p < {alpha}, cells "
              "differing in one factor):", ""]
    sig = comparisons[comparisons["significant"]]
    lines += [f"- {r.factor}: {r.b} − {r.a} = {r.diff:+.4f} (p = {r.p_welch:.3g})" for r in sig.itertuples()] or \
        ["- none"]
    return "\n".join(lines) + "\n"


def _convergence_markdown(conv: pd.DataFrame, baseline: str) -> str:
    col = "speedup_vs_" + baseline
    lines = ["", f"Convergence: epoch of the best validation score, mean over seeds (speed-up over {baseline}):", ""]
    lines += [f"- {r.init} / {r.strategy} / freeze {r.freeze:g}%: epoch {r.mean_best_epoch:.2f} "
              f"(speed-up {getattr(r, col):.2f}x)" for r in conv.itertuples() if not np.isnan(r.mean_best_epoch)]
    return "\n".join(lines) + "\n"


def _finished(run_dir: Path, cell: FinetuneRecipe) -> bool:
    """A run folder holds finished results of exactly this recipe (a changed recipe or dataset is rerun)."""
    saved = run_dir / "recipe.yaml"
    return ((run_dir / "metrics.json").is_file() and saved.is_file()
            and yaml.safe_load(saved.read_text()) == recipe_to_dict(cell))


def run_study(recipe: FinetuneRecipe | str | Path, *, inits=("random", "domain"), freezes=(0.0,), seeds: int = 3,
              strategies: tuple[str, ...] | None = None, metric: str | None = None, weights: str | None = None,
              out_dir: str | Path | None = None, overrides: tuple[str, ...] = (), alpha: float = 0.05,
              tsne: bool = False) -> dict:
    """Run the grid and write the study outputs.

    Args:
        recipe: a recipe or its YAML path (``overrides`` apply to a path).
        inits: initialisations to compare (``random``, ``domain``, ``file``, ``imagenet``, ``meanvar``); the first
            is the baseline of the convergence speed-up.
        freezes: percents of frozen layers (strategy ``features`` runs once, recorded as freeze 100).
        seeds: training seeds per cell (``recipe.seed`` .. ``recipe.seed + seeds - 1``).
        strategies: ``finetune`` and/or ``features`` (default: the recipe's).
        metric: the compared metric (default: ``auc`` for multi-label, ``mcc`` for single-label tasks).
        weights: export folder / weights file for the non-random inits (default: ``model.weights``).
        out_dir: study folder (default: ``<recipe.out_dir>/study``).
        alpha: significance level of the Welch test.
        tsne: save test-set features in every run and plot their t-SNE per init and freeze level.

    Returns:
        dict with ``runs``, ``summary``, ``comparisons`` (lists of records), ``metric``, ``markdown`` and ``out_dir``.
    """
    if not isinstance(recipe, FinetuneRecipe):
        recipe = load_finetune_recipe(recipe, list(overrides))
    if seeds < 1:
        raise UserError(f"seeds={seeds}: use 1 or more (2 or more to compare against the spread)")
    if "imagenet" in inits or ("meanvar" in inits and not (weights or recipe.model.weights)):
        check_imagenet_weights(recipe.model.arch)  # before any cell runs, not at the first ImageNet cell
    out = Path(out_dir or Path(recipe.out_dir) / "study")
    out.mkdir(parents=True, exist_ok=True)
    strategies = tuple(strategies or (recipe.train.strategy,))
    rows = []
    for init, strategy in itertools.product(inits, strategies):
        for freeze in ((100.0,) if strategy == "features" else freezes):
            for s in range(seeds):
                cell = _cell_recipe(recipe, init, strategy, freeze, recipe.seed + s, weights, tsne)
                if init in ("domain", "file") and not cell.model.weights:
                    raise UserError(f"init={init} needs weights: pass --weights or set model.weights in the recipe")
                run_dir = out / f"{init}_{strategy}_f{freeze:g}_s{cell.seed}"
                done = run_dir / "metrics.json"
                res = json.loads(done.read_text()) if _finished(run_dir, cell) else run_finetune(cell, run_dir)
                metric = metric or ("auc" if res["task"] == "multilabel" else "mcc")
                rows.append({"init": init, "strategy": strategy, "freeze": float(freeze), "seed": cell.seed,
                             **{k: v for k, v in res["test"].items() if isinstance(v, (int, float))},
                             "fps": res["fps"], "best_epoch": res.get("convergence", {}).get("best_epoch", np.nan),
                             "run_dir": str(run_dir)})
    runs = pd.DataFrame(rows)
    if metric not in runs:
        raise UnknownName(f"metric {metric!r} is not among the run metrics {sorted(runs.columns)}")
    summary = summarize(runs, metric)
    comparisons = compare_cells(runs, metric, alpha)
    conv = convergence_table(runs, inits[0])
    markdown = to_markdown(summary, comparisons, metric, alpha) + _convergence_markdown(conv, inits[0])
    for name, df in (("runs.csv", runs), ("summary.csv", summary), ("comparisons.csv", comparisons),
                     ("convergence.csv", conv)):
        with atomic_open(out / name, "w") as f:
            df.to_csv(f, index=False)
    write_atomic(out / "summary.md", markdown)
    plot_study(summary, metric, out / "study.png")
    if tsne:
        first = runs[runs["seed"] == recipe.seed]
        plot_tsne([(f"{r.init} / {r.strategy} / freeze {r.freeze:g}%", Path(r.run_dir) / "features.npz")
                   for r in first.itertuples()], out / "tsne.png", seed=recipe.seed)
    return {"runs": runs.to_dict("records"), "summary": summary.to_dict("records"),
            "convergence": conv.to_dict("records"),
            "comparisons": comparisons.to_dict("records"), "metric": metric, "markdown": markdown,
            "out_dir": str(out)}
