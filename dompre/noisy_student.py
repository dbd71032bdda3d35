"""Noisy Student domain pretraining: teacher -> pseudo-labels -> noised student, ``iterations`` times.

Run as ``accelerate launch dompre/noisy_student.py recipes/tcia.yaml [key=value ...]`` (or
``dompre pretrain RECIPE``). Rerunning the same command continues a killed run: every stage leaves a marker,
training stages resume from their latest ``save_state``, pseudo-labeling from its finished shards.

Output folder::

    recipe.yaml                      the resolved recipe (each role's effective optim: and loss: in full)
    iter0/ ... iterN/                iteration 0 is the teacher, 1..N the students
      state/step-*/                  accelerate save_state (latest only; removed once the stage is done)
      checkpoint/                    dompre.checkpoint folder (model.safetensors + checkpoint.json)
      metrics.json                   LesaNet metrics (val thresholds; test, hand-labeled)
      pseudo/                        this model's pseudo-labels of the unlabeled store (for the next iteration)
    metrics.csv  metrics.md  metrics.png   one row per iteration
    logs/                            TensorBoard events and metrics_log.csv
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: import the package, not the script's folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import dataclasses
import json
import logging
from typing import Sequence

import numpy as np
import yaml
from accelerate.utils import set_seed

from dompre.checkpoint import load_checkpoint, read_checkpoint_meta, record_metrics, save_stage_checkpoint
from dompre.data.deeplesion import load_hand_labeled, load_ontology
from dompre.data.store import SliceStore, run_preparation
from dompre.errors import REPORTED, UnknownName, UserError
from dompre.pseudo_pretrain import run_pseudo_pretrain
from dompre.recipes import changed_keys, load_recipe, recipe_to_dict, save_recipe
from dompre.train.config import PretrainRecipe, check_recipe
from dompre.data.prep import InputPrep
from dompre.train.engine import Position
from dompre.train.engine import make_accelerator as engine_accelerator
from dompre.train.evaluate import EvalSets, evaluate_model, write_json, write_report_tables
from dompre.train.losses import WeightedFocalLoss, label_weights
from dompre.train.pseudo_label import PseudoLabels, exclusive_matrix, label_store
from dompre.train.student import build_loaders, noise_transform, pseudo_rows
from dompre.train.teacher import create_model, train_stage

logger = logging.getLogger("dompre.noisy_student")

RESOLVED_HEADER = """The resolved recipe of this run: teacher.optim / teacher.loss, student.optim / student.loss and
pseudo_pretrain.loss hold the values each role trained with (the shared optim: / loss: sections with the role's
overrides, written out in full). Reused as a recipe, a change to a shared optim.* / loss.* key no longer reaches
these roles: change the role's own keys."""


# --------------------------------------------------------------------------- data
@dataclasses.dataclass
class RunData:
    """Everything a run reads from the stores, label files and ontology."""
    labeled: SliceStore
    unlabeled: SliceStore
    label_names: list[str]
    labels: np.ndarray  # (N_labeled, L) over label_names, NaN unknown
    train_rows: np.ndarray
    eval_sets: EvalSets
    exclusive: np.ndarray | None
    parents: list[list[int]] | None


def load_run_data(recipe: PretrainRecipe) -> RunData:
    """Open the stores, pick the label columns and split the labeled rows; clear errors for unusable input."""

    d = recipe.data
    for key, path in (("data.labeled_store", d.labeled_store), ("data.unlabeled_store", d.unlabeled_store)):
        if not (Path(path) / "manifest.json").is_file():
            raise FileNotFoundError(f"{key}: {path} is not a SliceStore (no manifest.json); build it with "
                                    "'dompre ingest' or fix the path")
    labeled, unlabeled = SliceStore(d.labeled_store), SliceStore(d.unlabeled_store)
    if not labeled.label_names:
        raise UserError(f"data.labeled_store: {d.labeled_store} has no labels; ingest it with "
                         "'dompre ingest deeplesion ... --labels JSON' or point to a labeled store")
    if len(unlabeled) == 0:
        raise UserError(f"data.unlabeled_store: {d.unlabeled_store} is empty; ingest DICOM series into it first")
    ontology = None
    if d.ontology:
        ontology = load_ontology(d.ontology)
    store_names = list(labeled.label_names)
    if d.labels:
        names = list(d.labels)
    elif d.label_class == "all":
        names = store_names
    elif ontology is None:
        raise UserError(f"data.label_class={d.label_class!r} needs data.ontology; set it or use data.label_class=all")
    else:
        names = ontology.select(d.label_class, within=store_names)
    missing = [n for n in names if n not in store_names]
    if missing or not names:
        raise UnknownName(f"labels {missing[:5] or names} are not columns of {d.labeled_store} "
                       f"(it has {store_names[:8]}...); fix data.labels / data.label_class")
    cols = [store_names.index(n) for n in names]
    labels = labeled.label_columns(cols)  # only the columns trained on (the store keeps no full copy)
    meta = labeled.columns(["split", "lesion_idx"])  # only the columns used, not the whole table
    split = meta["split"].astype(str).to_numpy()
    known = ~np.isnan(labels).all(1)
    train_rows = np.flatnonzero((split == d.train_split) & known)
    if len(train_rows) == 0:
        raise UserError(f"{d.labeled_store}: no labeled row with split={d.train_split!r}; check data.train_split")
    rows = {"val": np.flatnonzero((split == d.val_split) & known),
            "test": np.flatnonzero((split == d.test_split) & known)}
    set_labels = {k: labels[v] for k, v in rows.items()}
    if d.hand_labeled:
        hand = load_hand_labeled(d.hand_labeled, names)
        # rows of lesions outside the training split only, so the hand-labeled score never sees training inputs
        where = {int(v): i for i, v in enumerate(meta["lesion_idx"].to_numpy())
                 if int(v) >= 0 and split[i] != d.train_split}
        pairs = [(where[idx], k) for k, idx in enumerate(hand.lesion_idxs) if idx in where]
        rows["hand"] = np.array([p[0] for p in pairs], dtype=np.int64)
        set_labels["hand"] = hand.labels[[p[1] for p in pairs]] if pairs else np.zeros((0, len(names)), np.float32)
    exclusive = parents = None
    if ontology is not None:
        exclusive = exclusive_matrix(ontology.exclusive_pairs(names), len(names))
        parents = ontology.parent_indices(names)
    return RunData(labeled, unlabeled, names, labels, train_rows, EvalSets(rows, set_labels), exclusive, parents)


# --------------------------------------------------------------------------- stages
def _checkpoint_dir(stage: Path) -> Path:
    return stage / "checkpoint"


def load_stage_model(stage: Path, label_names: list[str]):
    model, info = load_checkpoint(_checkpoint_dir(stage))
    have = list(info.get("label_names") or [])
    if have != list(label_names):
        raise UserError(f"{_checkpoint_dir(stage)} was trained on {len(have)} labels {have[:4]}..., this recipe "
                         f"selects {len(label_names)} {label_names[:4]}...; use a new output_dir or the same labels")
    return model.eval()


def _save_checkpoint(accelerator, model, stage: Path, arch: str, label_names: list[str], info: dict) -> None:
    if accelerator.is_main_process:
        save_stage_checkpoint(model, stage, arch=arch, label_names=label_names, info=info)
    accelerator.wait_for_everyone()


def _train_iteration(accelerator, recipe: PretrainRecipe, data: RunData, it: int, stage: Path, position,
                     teacher_model, targets: tuple | None = None) -> tuple[object, str, dict]:
    """Train the teacher (it == 0) or student ``it``; returns (model, arch, info).

    ``targets`` = (rows, targets, weights, summary) of the unlabeled store replaces the previous iteration's
    pseudo-labels (the benchmark's oracle arm trains on the truth this way)."""

    r, L = recipe, len(data.label_names)
    role = "teacher" if it == 0 else "student"
    optim, loss = r.optim_for(role), r.loss_for(role)  # shared optim:/loss: with the role's own overrides
    set_seed(r.seed + 1000 * it)  # each stage starts from its own seed, whatever ran before in this process
    wp, wn = label_weights(data.labels[data.train_rows], loss.max_label_weight)
    loss_fn = WeightedFocalLoss(wp, wn, gamma=loss.focal_gamma, hard_fraction=loss.hard_fraction)
    common = dict(labeled_batch=r.teacher.batch_size, seed=r.seed, stage=it, num_workers=r.train.num_workers,
                  world=accelerator.num_processes, augment_on=r.train.augment_on)
    info: dict = {"iteration": it}
    fail = r.debug.fail_after_steps if r.debug.fail_stage == f"iter{it}" else -1
    if it == 0:
        arch = r.model.name
        model = create_model(arch, L, pretrained=r.model.pretrained)
        transform = noise_transform(r.student, r.model.img_size) if r.teacher.augment else None
        loaders = build_loaders(data.labeled, data.train_rows, data.labels, transform=transform, **common)
        epochs, pseudo_weight = r.teacher.epochs, 1.0
    else:
        arch = r.model.student_name or r.model.name
        model = create_model(arch, L, drop_rate=r.model.drop_rate, drop_path_rate=r.model.drop_path_rate,
                             pretrained=r.model.pretrained)
        if r.student.init == "teacher" and teacher_model is not None:
            model.load_state_dict(teacher_model.state_dict())
        if targets is None:
            targets = pseudo_targets(recipe, data, stage.parent / f"iter{it - 1}")
        rows, targets, weights, summary = targets
        info["pseudo"] = {k: v for k, v in summary.items() if k != "per_label"}
        common["labeled_batch"] = r.student.labeled_batch
        loaders = build_loaders(data.labeled, data.train_rows, data.labels,
                                transform=noise_transform(r.student, r.model.img_size),
                                unlabeled_store=data.unlabeled, pseudo_rows_=rows, pseudo_targets=targets,
                                pseudo_batch=r.student.pseudo_batch, pseudo_weights=weights, **common)
        epochs, pseudo_weight = r.student.labeled_epochs, r.student.pseudo_weight
    prep = InputPrep.for_model(model, r.model.img_size, r.train.channels_last)
    model = train_stage(accelerator, model=model, loss_fn=loss_fn, prep=prep, data=loaders, opt=optim.opt,
                        lr=optim.lr, weight_decay=optim.weight_decay, epochs=epochs,
                        warmup_epochs=optim.warmup_epochs, state_dir=stage / "state", position=position,
                        stage=f"iter{it}", train_cfg=r.train, pseudo_weight=pseudo_weight, fail_after_steps=fail)
    return model, arch, info


def pseudo_targets(recipe: PretrainRecipe, data: RunData, prev: Path) -> tuple:
    """(rows, targets, weights, summary) from the pseudo-labels the model of stage ``prev`` made."""

    pseudo = PseudoLabels(prev / "pseudo")
    if pseudo.label_names != data.label_names:
        raise UserError(f"{pseudo.folder}: pseudo-labels over {len(pseudo.label_names)} labels do not match "
                         f"the model's {len(data.label_names)} labels; use a new output_dir")
    metrics = prev / "metrics.json"
    val_th = np.asarray(json.loads(metrics.read_text())["thresholds"]) if metrics.is_file() else None
    return pseudo_rows(pseudo, recipe.pseudo, data.exclusive, val_th)


def _check_same_run(recipe: PretrainRecipe, out: Path) -> None:
    """A resumed output_dir must hold the same recipe (train/debug/iterations settings may differ).

    Compared as :meth:`~dompre.train.config.PretrainRecipe.resolved` (each role's effective settings), the form
    the run folder keeps."""
    saved = out / "recipe.yaml"
    if not saved.is_file():
        return
    old = yaml.safe_load(saved.read_text()) or {}
    diff = changed_keys(old, recipe_to_dict(recipe.resolved()),
                        ignore=("train", "debug", "iterations", "output_dir", "eval", "pseudo_pretrain"))
    if diff:
        layout = (" (it was written before the shared optim:/loss: sections; its teacher: settings were every "
                  "role's)" if "optim" not in old else "")
        raise UserError(f"{out} holds a run with other settings for {diff}{layout}; use a new output_dir or the "
                         f"recipe in {saved}")


def make_accelerator(recipe: PretrainRecipe, out: Path):
    """The run's one Accelerator (:func:`dompre.train.engine.make_accelerator`) with TensorBoard + CSV logs."""
    return engine_accelerator(out, mixed_precision=recipe.train.mixed_precision,
                              torch_threads=recipe.train.torch_threads)


def train_arm(accelerator, recipe: PretrainRecipe, data: RunData, name: str, *, targets: tuple | None = None,
              noise: bool = True):
    """One extra student stage beside a finished run (``output_dir/arm-<name>/``), resumable like the others.

    The student starts as iteration 1 does (same seed, init and schedule) from the run's teacher (``iter0``):
    ``targets`` = (rows, targets, weights, summary) replaces the teacher's pseudo-labels (the benchmark's oracle
    trains on the truth); ``noise=False`` trains without input noise, dropout and drop path (plain
    self-training, the ablation). Returns the model in eval mode.
    """

    out = Path(recipe.output_dir)
    stage = out / f"arm-{name}"
    stage.mkdir(parents=True, exist_ok=True)
    if (_checkpoint_dir(stage) / "checkpoint.json").is_file():
        return load_stage_model(stage, data.label_names)
    if not noise:
        quiet = dataclasses.replace(recipe.student, rotate_degrees=0.0, grayscale_p=0.0, autocontrast_p=0.0,
                                    crop_scale=(1.0, 1.0))
        recipe = dataclasses.replace(recipe, student=quiet,
                                     model=dataclasses.replace(recipe.model, drop_rate=0.0, drop_path_rate=0.0))
    if targets is None:
        targets = pseudo_targets(recipe, data, out / "iter0")
    teacher = load_stage_model(out / "iter0", data.label_names)
    model, arch, info = _train_iteration(accelerator, recipe, data, 1, stage, Position(), teacher, targets)
    info.update(arch=arch, role=f"arm {name}", noise=noise, input_size=[3, recipe.model.img_size, recipe.model.img_size],
                **run_preparation(recipe.data.labeled_store, recipe.data.unlabeled_store))
    _save_checkpoint(accelerator, model, stage, arch, data.label_names, info)
    return model.eval()


def run(recipe: PretrainRecipe, accelerator=None, data: RunData | None = None) -> dict:
    """Run (or resume) the whole Noisy Student loop; returns the per-iteration results and report paths.

    ``accelerator``: reuse one (the benchmark trains its arms with it); by default the run makes its own.
    ``data``: the recipe's :func:`load_run_data`, when the caller already has it."""

    check_recipe(recipe)
    out = Path(recipe.output_dir)
    data = load_run_data(recipe) if data is None else data
    own = accelerator is None
    accelerator = make_accelerator(recipe, out) if own else accelerator
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _check_same_run(recipe, out)
        save_recipe(recipe.resolved(), out / "recipe.yaml", header=RESOLVED_HEADER)
    accelerator.wait_for_everyone()
    accelerator.init_trackers("dompre", config={"seed": recipe.seed, "iterations": recipe.iterations,
                                                "model": recipe.model.name, "labels": len(data.label_names)})
    position = Position()
    results, model = [], None
    for it in range(recipe.iterations + 1):
        stage = out / f"iter{it}"
        stage.mkdir(parents=True, exist_ok=True)
        info_path = stage / "info.json"
        if (_checkpoint_dir(stage) / "checkpoint.json").is_file():
            model = load_stage_model(stage, data.label_names)
            info = json.loads(info_path.read_text()) if info_path.is_file() else {"iteration": it}
        else:
            model, arch, info = _train_iteration(accelerator, recipe, data, it, stage, position, model)
            info.update(arch=arch, role="teacher" if it == 0 else "student",
                        input_size=[3, recipe.model.img_size, recipe.model.img_size],
                        data=f"labeled {recipe.data.labeled_store}; unlabeled {recipe.data.unlabeled_store}",
                        **run_preparation(recipe.data.labeled_store, recipe.data.unlabeled_store))
            if accelerator.is_main_process:
                write_json(info_path, info)
            _save_checkpoint(accelerator, model, stage, arch, data.label_names, info)
        model = model.to(accelerator.device).eval()
        prep = InputPrep.for_model(model, recipe.model.img_size, recipe.train.channels_last)
        metrics_path = stage / "metrics.json"
        if metrics_path.is_file():
            metrics = json.loads(metrics_path.read_text())
        else:
            metrics = evaluate_model(accelerator, model, data.labeled, data.eval_sets, prep,
                                     label_names=data.label_names, parents=data.parents,
                                     batch_size=recipe.eval.batch_size, grid=recipe.eval.thresholds)
            if accelerator.is_main_process:
                write_json(metrics_path, metrics)
            accelerator.wait_for_everyone()
        if accelerator.is_main_process and "metrics" not in read_checkpoint_meta(_checkpoint_dir(stage))["info"]:
            record_metrics(_checkpoint_dir(stage), metrics)  # the model card shows them
        accelerator.log({f"eval/{s}_{m}": v for s in ("test", "hand", "val") for m, v in metrics.get(s, {}).items()
                         if m in ("auc", "f1", "precision", "recall") and v is not None}, step=it)
        results.append({"iteration": it, "model": info.get("arch", ""), "metrics": metrics,
                        "pseudo_used": info.get("pseudo", {}).get("used", 0), "stage": str(stage)})
        if it < recipe.iterations:
            fail = recipe.debug.fail_after_chunks if recipe.debug.fail_stage == f"pseudo{it}" else -1
            label_store(accelerator, model, data.unlabeled, stage / "pseudo", label_names=data.label_names,
                        prepare_input=prep, top_k=recipe.pseudo.top_k, batch_size=recipe.pseudo.batch_size,
                        chunk_size=recipe.pseudo.chunk_size, num_workers=recipe.train.num_workers,
                        fail_after_chunks=fail, progress=recipe.train.progress)
    extra = {}
    if recipe.pseudo_pretrain.enabled:  # Virk & Bathula Table 3: a model trained on the final pseudo-labels only
        extra["pseudo_pretrain"] = run_pseudo_pretrain(accelerator, recipe, data, out, model, position)
    paths = {}
    if accelerator.is_main_process:
        paths = write_report_tables(out, results)
    accelerator.wait_for_everyone()
    if own:
        accelerator.end_training()
    return {"results": results, "output_dir": str(out), "report": {k: str(v) for k, v in paths.items()},
            "label_names": data.label_names, **extra}


def run_recipe(path: str | Path | None, overrides: Sequence[str] = ()) -> dict:
    """Load ``path`` with ``key=value`` overrides and :func:`run` it."""
    recipe = load_recipe(path, PretrainRecipe, list(overrides))
    return run(recipe)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``accelerate launch dompre/noisy_student.py RECIPE [key=value ...]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/tcia.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. output_dir=runs/x")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        result = run_recipe(args.recipe, args.overrides)
    except REPORTED as e:  # bad recipe or data: one line, no traceback; a bug keeps its traceback
        logger.error("error: %s", e)
        return 2
    logger.info("done: %s", json.dumps({"output_dir": result["output_dir"], **result["report"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
