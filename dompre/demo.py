"""The main job on the built-in synthetic cohort: synth -> ingest -> Noisy Student -> export -> report.

``dompre demo [--out DIR]`` runs every stage of dompre end to end on CPU in minutes; each stage resumes when
the command is rerun (cohort, stores, pretraining and export all skip finished work). The report folder holds a
Markdown summary with the metrics table per iteration, the plots and the exported timm backbone.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

logger = logging.getLogger(__name__)


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


def run_demo(out: str | Path, *, patients: int = 36, seed: int = 0, labeled_fraction: float = 0.3,
             recipe: str | Path | None = None, overrides: Sequence[str] = (), progress: bool = True,
             downstream_epochs: int = 8, downstream_patients: int = 40, synth_options: dict | None = None) -> dict:
    """Run the whole pipeline into ``out`` and return a summary (paths, timings, per-iteration metrics).

    Args:
        out: demo folder (``cohort/``, ``stores/``, ``run/``, ``report/``).
        patients: synthetic patients; ``labeled_fraction`` of them form the labeled DeepLesion share.
        seed: cohort and training seed.
        recipe: pretraining recipe (default ``recipes/demo.yaml``); ``overrides`` are its ``key=value``s.
        downstream_epochs: epochs of the last step, lesion-type fine-tuning from random vs domain init, on a
            separate DeepLesion-layout cohort of ``downstream_patients`` held-out patients.
        synth_options: further ``generate_cohort`` arguments (default matrix 128).
    """
    from dompre.data.ingest import ingest_dicom, load_ingest_recipe
    from dompre.data.ingest_deeplesion import ingest_deeplesion, load_deeplesion_recipe
    from dompre.data.synthetic import generate_cohort
    from dompre.export import export_timm
    from dompre.noisy_student import run as run_pretraining
    from dompre.recipes import load_recipe
    from dompre.train.config import PretrainRecipe
    from dompre.train.study import run_synthetic_downstream

    out = Path(out).resolve()
    cohort, stores, run_dir, report = out / "cohort", out / "stores", out / "run", out / "report"
    dl = cohort / "deeplesion"
    rec = load_recipe(recipe or default_recipe(), PretrainRecipe, [
        f"output_dir={run_dir}", f"seed={seed}", f"data.labeled_store={stores / 'deeplesion'}",
        f"data.unlabeled_store={stores / 'dicom'}", f"data.ontology={dl / 'lesion_ontology.csv'}",
        f"data.hand_labeled={dl / 'hand_labeled_test_set.json'}", f"train.progress={str(progress).lower()}",
        *overrides])
    size = rec.model.img_size
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    if not (cohort / "cohort.json").is_file():
        _timed(times, "synth", generate_cohort, cohort, patients=patients, seed=seed, layout="both",
               labeled_fraction=labeled_fraction, progress=progress, **{"matrix": 128, **(synth_options or {})})
    prep = (f"prep.size={size}", "prep.min_slices=20")
    _timed(times, "ingest dicom", ingest_dicom, cohort / "dicom", stores / "dicom", workers=2,
           recipe=load_ingest_recipe(None, prep), progress=progress)
    _timed(times, "ingest deeplesion", ingest_deeplesion, dl, stores / "deeplesion",
           labels=dl / "text_mined_labels_171_and_split.json", ontology=dl / "lesion_ontology.csv",
           classes="bodypart", recipe=load_deeplesion_recipe(None, prep), progress=progress)
    result = _timed(times, "pretrain", run_pretraining, rec)
    report.mkdir(parents=True, exist_ok=True)
    last = result["results"][-1]
    exported = _timed(times, "export", export_timm, Path(last["stage"]) / "checkpoint", report / "backbone",
                      card={"note": f"dompre demo: iteration {last['iteration']} of a Noisy Student run on the "
                                    "synthetic CT cohort (not a clinical model)"})
    # held-out patients (another seed) in the DeepLesion layout, so the downstream task has enough lesions
    # and none of the images the backbone was pretrained on
    down_cohort = out / "downstream_cohort"
    if not (down_cohort / "cohort.json").is_file():
        _timed(times, "synth downstream", generate_cohort, down_cohort, patients=downstream_patients,
               seed=seed + 1000, layout="deeplesion", progress=progress,
               **{"matrix": 128, "max_slices": 48, **(synth_options or {})})
    downstream = _timed(times, "downstream", run_synthetic_downstream, down_cohort, report / "backbone",
                        out / "downstream", epochs=downstream_epochs, seeds=3, image_size=size,
                        overrides=(f"train.progress={str(progress).lower()}",))
    times["total"] = round(time.perf_counter() - t_all, 1)
    for name in ("metrics.png", "metrics.csv", "metrics.md"):
        shutil.copy2(run_dir / name, report / name)
    summary = {"out": str(out), "report": str(report / "README.md"), "backbone": exported["out_dir"],
               "times_s": times, "results": [{k: r[k] for k in ("iteration", "model", "pseudo_used")}
                                             | {"test": r["metrics"].get("test"), "hand": r["metrics"].get("hand")}
                                             for r in result["results"]],
               "labeled": {k: int(len(v)) for k, v in _split_sizes(stores / "deeplesion").items()},
               "unlabeled_inputs": _store_len(stores / "dicom"),
               "downstream": {"metric": downstream["metric"], "n": downstream["n"], "arch": downstream["arch"],
                              "summary": downstream["summary"], "comparisons": downstream["comparisons"],
                              "markdown": downstream["markdown"], "out_dir": str(downstream["out_dir"])}}
    summary["verdict"] = verdict(summary["results"])
    (report / "README.md").write_text(_report_markdown(summary, (run_dir / "metrics.md").read_text(), rec))
    (report / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _split_sizes(path: Path) -> dict:
    from dompre.data.store import SliceStore
    meta = SliceStore(path).meta
    return {s: meta.index[meta["split"] == s] for s in sorted(meta["split"].unique())}


def _store_len(path: Path) -> int:
    from dompre.data.store import SliceStore
    return len(SliceStore(path))


def verdict(results: list[dict]) -> str:
    """One honest sentence: does the best student beat the teacher on the test and hand-labeled sets?"""
    parts = []
    for name in ("test", "hand"):
        t = (results[0].get(name) or {}).get("auc")
        s = [(r.get(name) or {}).get("auc") for r in results[1:]]
        s = [v for v in s if v is not None]
        if t is None or not s:
            continue
        best = max(s)
        word = "beats" if best > t else "does not beat"
        parts.append(f"on the {name} set the best student ({best:.4f} mean AUC) {word} the teacher ({t:.4f})")
    return ("; ".join(parts) + ".") if parts else "no test metrics to compare."


def _report_markdown(s: dict, table: str, rec) -> str:
    times = ", ".join(f"{k} {v} s" for k, v in s["times_s"].items())
    return f"""# dompre demo report

Noisy Student domain pretraining on the built-in synthetic CT cohort: a {rec.model.name} teacher trained on the
labeled DeepLesion-layout share, {rec.iterations} noised students trained on the labeled inputs plus the teacher's
pseudo-labels of the unlabeled DICOM share, evaluated with the LesaNet protocol (per-label thresholds on val,
mean over labels; hand-labeled = the cohort's hand-labeled lesions outside the training split).

- labeled inputs per split: {s['labeled']}; unlabeled inputs: {s['unlabeled_inputs']}
- image size {rec.model.img_size} px; teacher {rec.teacher.epochs} epochs; students {rec.student.labeled_epochs}
  labeled epochs with {rec.student.labeled_batch} labeled + {rec.student.pseudo_batch} pseudo-labeled inputs a step
- wall time: {times}

## Result

{s['verdict'].capitalize()}

{table}
![metrics per iteration](metrics.png)

## Downstream: lesion type from random vs domain initialisation

The last step fine-tunes the exported {s['downstream']['arch']} to predict lesion type (`Coarse_lesion_type`) on a
separate DeepLesion-layout cohort of held-out synthetic patients (inputs per split {s['downstream']['n']}), once
from random weights and once from the pretrained backbone, three seeds each; the metric is
{s['downstream']['metric']}. Full runs in
`{s['downstream']['out_dir']}`.

{s['downstream']['markdown'].replace('## ', '### ', 1)}

## Exported backbone

`backbone/` loads with `import dompre, timm; timm.create_model('local-dir:{s['backbone']}')`.
Synthetic data only: this model says nothing about real CT.
"""
