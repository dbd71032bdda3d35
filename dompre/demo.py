"""The main job on the built-in synthetic cohort, and the benchmark that shows whether Noisy Student works.

``dompre demo [--out DIR]`` runs every stage end to end on CPU in minutes: synth (a training cohort whose
labeled share is written as DeepLesion PNGs and the rest as DICOM, plus a cohort of held-out patients) ->
ingest -> Noisy Student -> the arms that bracket it (:mod:`dompre.benchmark`) -> export -> downstream
fine-tuning -> report. ``dompre benchmark`` is the same job over three training seeds, with intervals over seeds.
Every stage resumes when the command is rerun (cohorts, stores, stages and export skip finished work).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from dompre._io import write_atomic
from dompre.benchmark import heldout_sets, plot_arms, run_arms, source_stats, store_truth, summarize
from dompre.data.ingest import ingest_dicom, load_ingest_recipe
from dompre.data.ingest_deeplesion import ingest_deeplesion, load_deeplesion_recipe
from dompre.data.store import SliceStore
from dompre.checkpoint import read_checkpoint_meta, record_metrics
from dompre.export import export_timm
from dompre.noisy_student import load_run_data
from dompre.recipes import load_recipe
from dompre.report import demo_markdown
from dompre.synth.cohort import generate_cohort
from dompre.train.config import PretrainRecipe
from dompre.train.finetune import load_finetune_recipe
from dompre.train.study import run_study

logger = logging.getLogger(__name__)

COHORT_DEFAULTS = {"matrix": 128, "labeled_lesions": (8, 12), "labeled_coverage": "whole-body"}
HELDOUT_SEED_OFFSET = 7919  # the held-out cohort's seed: no patient is shared with the training cohort


def default_recipe() -> Path:
    """``recipes/demo.yaml`` of the source tree."""
    path = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run from a dompre source checkout or pass --recipe")
    return path


def _timed(times: dict, name: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    times[name] = round(time.perf_counter() - t0, 1)
    logger.info("demo: %s done in %.1f s", name, times[name])
    return result


def run_demo(out: str | Path, *, patients: int = 48, seed: int = 0, labeled_fraction: float = 0.25,
             heldout_patients: int = 20, seeds: Sequence[int] | None = None, recipe: str | Path | None = None,
             overrides: Sequence[str] = (), progress: bool = True, downstream_epochs: int = 8,
             downstream_patients: int = 40, synth_options: dict | None = None, replicates: int = 1000) -> dict:
    """Run the whole pipeline and the benchmark arms into ``out``; return the summary written to the report.

    Args:
        out: demo folder (``cohort/``, ``heldout_cohort/``, ``stores/``, ``run/seed-S/``, ``report/``).
        patients: training cohort; ``labeled_fraction`` of them form the labeled DeepLesion share (their
            lesion key slices are the labeled inputs), the rest the unlabeled DICOM share.
        seed: cohort seed (the held-out cohort uses ``seed + 7919``).
        heldout_patients: patients in neither share, prepared like the unlabeled inputs and scored against
            truth (30% validation: thresholds and the choice of student; 70% test).
        seeds: training seeds (default ``(seed,)``); ``dompre benchmark`` passes three.
        recipe: pretraining recipe (default ``recipes/demo.yaml``); ``overrides`` are its ``key=value``s.
        downstream_epochs, downstream_patients: the last step, lesion-type fine-tuning from random vs domain
            init on a separate DeepLesion-layout cohort.
        synth_options: further ``generate_cohort`` arguments for the training cohort (defaults
            :data:`COHORT_DEFAULTS`; the held-out cohort shares ``matrix`` and ``max_slices``).
        replicates: patient-bootstrap replicates for the intervals.
    """
    out = Path(out).resolve()
    cohort, held_dir, stores, report = out / "cohort", out / "heldout_cohort", out / "stores", out / "report"
    dl = cohort / "deeplesion"
    seeds = tuple(seeds) if seeds else (seed,)
    opts = {**COHORT_DEFAULTS, **(synth_options or {})}
    held_opts = {k: opts[k] for k in ("matrix", "max_slices") if k in opts}

    def recipe_for(s: int):
        return load_recipe(recipe or default_recipe(), PretrainRecipe, [
            f"output_dir={out / 'run' / f'seed-{s}'}", f"seed={s}", f"data.labeled_store={stores / 'deeplesion'}",
            f"data.unlabeled_store={stores / 'dicom'}", f"data.ontology={dl / 'lesion_ontology.csv'}",
            f"data.hand_labeled={dl / 'hand_labeled_test_set.json'}", f"train.progress={str(progress).lower()}",
            *overrides])

    rec = recipe_for(seeds[0])
    size = rec.model.img_size
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    if not (cohort / "cohort.json").is_file():
        _timed(times, "synth", generate_cohort, cohort, patients=patients, seed=seed, layout="both",
               labeled_fraction=labeled_fraction, progress=progress, **opts)
    if not (held_dir / "cohort.json").is_file():
        _timed(times, "synth held-out", generate_cohort, held_dir, patients=heldout_patients,
               seed=seed + HELDOUT_SEED_OFFSET, layout="dicom", progress=progress, **held_opts)
    prep = (f"prep.size={size}", "prep.min_slices=20")
    for name, src, dst in (("ingest dicom", cohort / "dicom", stores / "dicom"),
                           ("ingest held-out", held_dir / "dicom", stores / "heldout")):
        _timed(times, name, ingest_dicom, src, dst, workers=2, recipe=load_ingest_recipe(None, prep),
               progress=progress)
    _timed(times, "ingest deeplesion", ingest_deeplesion, dl, stores / "deeplesion",
           labels=dl / "text_mined_labels_171_and_split.json", ontology=dl / "lesion_ontology.csv",
           classes="bodypart", recipe=load_deeplesion_recipe(None, prep), progress=progress)
    data = load_run_data(rec)
    held = heldout_sets(SliceStore(stores / "heldout"), held_dir / "truth" / "slices.csv", data.label_names)
    unl_truth, _ = store_truth(data.unlabeled, cohort / "truth" / "slices.csv", data.label_names)
    per_seed = {s: _timed(times, f"pretrain + arms, seed {s}", run_arms, recipe_for(s), data, held, unl_truth,
                          replicates=replicates) for s in seeds}
    summary = summarize(per_seed)
    report.mkdir(parents=True, exist_ok=True)
    plot_arms(summary, report / "arms.png")

    first = per_seed[seeds[0]]["run"]
    chosen = summary["per_seed"][seeds[0]]["chosen"] or "teacher"
    stage = Path(first["output_dir"]) / ("iter0" if chosen == "teacher" else f"iter{chosen.split('-')[1]}")
    row = summary["per_seed"][seeds[0]]["arms"][chosen]
    known = read_checkpoint_meta(stage / "checkpoint")["info"].get("metrics", {})
    record_metrics(stage / "checkpoint", {**known, "heldout_test": {
        "auc": row["auc"], "auc_ci_low": row["auc_ci"][0], "auc_ci_high": row["auc_ci"][1], "f1": row["f1"],
        "auc_taught_labels": row["auc_taught"], "n_inputs": row["n_inputs"], "n_patients": row["n_patients"]}})
    exported = _timed(times, "export", export_timm, stage / "checkpoint", report / "backbone", overwrite=True,
                      card={"note": f"dompre demo: {chosen} (chosen on held-out validation) of a Noisy Student run "
                                    "on the synthetic CT cohort (not a clinical model)"})
    down_cohort = out / "downstream_cohort"
    if not (down_cohort / "cohort.json").is_file():
        _timed(times, "synth downstream", generate_cohort, down_cohort, patients=downstream_patients,
               seed=seed + 1000, layout="deeplesion", progress=progress,
               **{"matrix": opts["matrix"], "max_slices": 48})
    downstream = _timed(times, "downstream", run_synthetic_downstream, down_cohort, report / "backbone",
                        out / "downstream", epochs=downstream_epochs, seeds=3, image_size=size,
                        overrides=(f"train.progress={str(progress).lower()}",))
    times["total"] = round(time.perf_counter() - t_all, 1)
    for name in ("metrics.png", "metrics.csv", "metrics.md"):
        shutil.copy2(Path(first["output_dir"]) / name, report / name)
    result = {
        "out": str(out), "report": str(report / "README.md"), "backbone": exported["out_dir"], "times_s": times,
        "seeds": list(seeds), "chosen": chosen,
        "results": [{k: r[k] for k in ("iteration", "model", "pseudo_used")}
                    | {"test": r["metrics"].get("test"), "hand": r["metrics"].get("hand")} for r in first["results"]],
        "labeled": _split_sizes(data.labeled),
        "labeled_train_inputs": int(len(data.train_rows)), "unlabeled_inputs": int(len(data.unlabeled)),
        "heldout": {k: {"inputs": int(len(v)), "patients": int(len(set(held.patients[k])))}
                    for k, v in held.rows.items()},
        "taught": per_seed[seeds[0]]["taught"], "label_names": per_seed[seeds[0]]["label_names"],
        "sources": source_stats({"labeled (DeepLesion PNG)": data.labeled, "unlabeled (DICOM)": data.unlabeled,
                                 "held-out (DICOM)": held.store}),
        "benchmark": _jsonable(summary),
        "downstream": {"metric": downstream["metric"], "n": downstream["n"], "arch": downstream["arch"],
                       "summary": downstream["summary"], "comparisons": downstream["comparisons"],
                       "markdown": downstream["markdown"], "out_dir": str(downstream["out_dir"])}}
    result["verdict"] = verdict(summary)
    write_atomic(report / "README.md", demo_markdown(result, (Path(first["output_dir"]) / "metrics.md").read_text(),
                                                     rec))
    write_atomic(report / "summary.json", json.dumps(result, indent=1))
    return result


def run_synthetic_downstream(cohort_dir: str | Path, domain_export_dir: str | Path, out_dir: str | Path, *,
                             epochs: int = 3, seeds: int = 2, image_size: int = 64, freezes=(0.0,),
                             overrides: tuple[str, ...] = ()) -> dict:
    """The demo's last step: lesion type (``Coarse_lesion_type``) of the synthetic cohort's DeepLesion layout,
    fine-tuned from random versus domain initialisation (the same architecture as the export).

    Args:
        cohort_dir: a ``dompre synth`` folder (uses ``COHORT/deeplesion``).
        domain_export_dir: a dompre export folder (``config.json`` + ``model.safetensors``).
        out_dir: study folder.
        epochs, seeds, image_size, freezes: kept small so the demo runs in minutes on a CPU.
        overrides: further ``key=value`` recipe overrides.

    Returns:
        :func:`dompre.train.study.run_study`'s dict plus ``arch`` and ``n`` (train/val/test sizes).
    """
    root = Path(cohort_dir) / "deeplesion"
    export = Path(domain_export_dir)
    if not (root / "DL_info.csv").is_file():
        raise FileNotFoundError(f"{root / 'DL_info.csv'} not found; run `dompre synth` with the deeplesion layout")
    if not (export / "config.json").is_file():
        raise FileNotFoundError(f"{export / 'config.json'} not found; pass a `dompre export` folder")
    arch = json.loads((export / "config.json").read_text()).get("architecture")
    recipe = load_finetune_recipe(None, [
        "data.kind=deeplesion_type", f"data.root={root}", f"data.image_size={image_size}", "data.min_val=1",
        f"model.arch={arch}", f"model.weights={export}", f"train.epochs={epochs}", "train.batch_size=16",
        "train.lr=0.001", "train.class_weights=true", "train.augment=false", f"out_dir={out_dir}", *overrides])
    res = run_study(recipe, inits=("random", "domain"), freezes=tuple(freezes), seeds=seeds, out_dir=out_dir)
    first = json.loads((Path(res["runs"][0]["run_dir"]) / "metrics.json").read_text())
    return {**res, "arch": arch, "n": first["n"]}


def _split_sizes(store) -> dict:
    split = store.columns(["split"])["split"]
    return {s: int((split == s).sum()) for s in sorted(split.unique())}


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (np.floating, float)):
        return None if not np.isfinite(v) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


GOALS = {"teacher_auc": 0.85, "gap_closed": 0.5}


def verdict(summary: dict) -> str:
    """One honest sentence per goal of the benchmark, from the held-out test figures."""
    seeds = summary["seeds"]
    teach = [summary["per_seed"][s]["arms"]["teacher"]["auc"] for s in seeds]
    parts = [f"teacher held-out test mean AUC {np.mean(teach):.3f} over {len(seeds)} seed(s) "
             f"({'meets' if min(teach) >= GOALS['teacher_auc'] else 'misses'} the {GOALS['teacher_auc']} goal)"]
    gap, diff = summary.get("gap_closed_all"), summary.get("student_minus_teacher_all")
    if gap and diff:
        lo, hi = diff["ci"]
        excl = "excludes" if lo > 0 or hi < 0 else "includes"
        per = ", ".join("n/a" if not np.isfinite(g) else f"{g:.0%}" for g in gap["per_seed"])
        closed = "no gap to close (the oracle is not above the teacher)" if gap["mean"] is None else \
            f"closes {gap['mean']:.0%} of the teacher-oracle gap on average"
        parts.append(f"the student chosen on validation {closed} (per seed {per}; goal {GOALS['gap_closed']:.0%}), "
                     f"student - teacher {diff['mean']:+.4f} with 95% interval [{lo:+.4f}, {hi:+.4f}], which "
                     f"{excl} 0")
    return "; ".join(parts) + "."
