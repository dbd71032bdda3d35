"""Pseudo-label-only pretraining (Virk & Bathula 2020, Table 3): after the Noisy Student loop, train any timm
architecture on the final pseudo-labels only, then export it for downstream fine-tuning.

Switched on with ``pseudo_pretrain.enabled=true`` in the pretraining recipe (:class:`dompre.train.config.
PseudoPretrainConfig`); the stage runs at the end of ``dompre pretrain`` / ``accelerate launch
dompre/noisy_student.py``, so rerunning a finished run's command with the switch on adds it (the finished
iterations are reused). It reuses the loop of every other stage (:func:`dompre.train.teacher.train_stage`, the
same loaders, loss and resume), with the pseudo-labeled rows as its only training data:

1. the final model (``iterN``) labels the unlabeled store into ``iterN/pseudo`` (resumable, as every stage);
2. the kept pseudo-labels (``pseudo.*`` rules, the final model's validation thresholds when
   ``pseudo.val_thresholds``) are the targets; the labeled store is used for evaluation only;
3. ``pseudo_pretrain.arch`` (the paper: ``vgg16``, 5 epochs, its own optimizer keys; the loss: the shared
   ``loss:`` with ``pseudo_pretrain.loss`` overrides) trains on them: ``pseudo_pretrain/checkpoint``,
   ``pseudo_pretrain/metrics.json`` (the LesaNet metrics on the labeled val/test rows) and
   ``pseudo_pretrain/export`` (a timm folder: ``model.init=domain model.weights=.../export`` in a fine-tuning
   recipe, e.g. ``recipes/seeds/virk2020_table3_lesanet.yaml``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from accelerate.utils import set_seed

from dompre.checkpoint import load_checkpoint, save_stage_checkpoint
from dompre.export import export_timm
from dompre.data.prep import InputPrep
from dompre.train.evaluate import evaluate_model, write_json
from dompre.train.losses import WeightedFocalLoss, label_weights
from dompre.train.pseudo_label import PseudoLabels, label_store
from dompre.train.student import build_loaders, noise_transform, pseudo_rows
from dompre.train.teacher import create_model, train_stage

logger = logging.getLogger("dompre.pseudo_pretrain")


def run_pseudo_pretrain(accelerator, recipe, data, out: Path, final_model, position) -> dict:
    """Label with ``final_model``, train ``recipe.pseudo_pretrain.arch`` on the pseudo-labels only, export it.

    Args:
        accelerator: the run's Accelerator.
        recipe: the :class:`~dompre.train.config.PretrainRecipe`.
        data: the run's :class:`dompre.noisy_student.RunData`.
        out: the run's output folder.
        final_model: the last iteration's model (un-noised labeler).
        position: the run's checkpointed :class:`~dompre.train.engine.Position`.

    Returns:
        ``{"stage", "export", "arch", "metrics", "pseudo"}``.
    """
    r, cfg = recipe, recipe.pseudo_pretrain
    final = out / f"iter{r.iterations}"
    stage, ckpt = out / "pseudo_pretrain", out / "pseudo_pretrain" / "checkpoint"
    stage.mkdir(parents=True, exist_ok=True)
    labeler_prep = InputPrep.for_model(final_model, r.model.img_size, r.train.channels_last)
    label_store(accelerator, final_model, data.unlabeled, final / "pseudo", label_names=data.label_names,
                prepare_input=labeler_prep, top_k=r.pseudo.top_k, batch_size=r.pseudo.batch_size,
                chunk_size=r.pseudo.chunk_size, num_workers=r.train.num_workers, progress=r.train.progress)
    pseudo = PseudoLabels(final / "pseudo")
    metrics_file = final / "metrics.json"
    val_th = np.asarray(json.loads(metrics_file.read_text())["thresholds"]) if metrics_file.is_file() else None
    rows, targets, _, summary = pseudo_rows(pseudo, r.pseudo, data.exclusive, val_th)
    if (ckpt / "checkpoint.json").is_file():
        model, _ = load_checkpoint(ckpt)
    else:
        set_seed(r.seed + 1000 * (r.iterations + 1))
        model = create_model(cfg.arch, len(data.label_names), drop_rate=cfg.drop_rate, pretrained=cfg.pretrained)
        transform = noise_transform(r.student, r.model.img_size) if cfg.noise else None
        loaders = build_loaders(data.unlabeled, rows, targets, labeled_batch=cfg.batch_size, seed=r.seed,
                                stage=r.iterations + 1, num_workers=r.train.num_workers,
                                world=accelerator.num_processes, transform=transform)
        optim, loss = r.optim_for("pseudo_pretrain"), r.loss_for("pseudo_pretrain")
        wp, wn = label_weights(data.labels[data.train_rows], loss.max_label_weight)
        loss_fn = WeightedFocalLoss(wp, wn, gamma=loss.focal_gamma, hard_fraction=loss.hard_fraction)
        prep = InputPrep.for_model(model, r.model.img_size, r.train.channels_last)
        model = train_stage(accelerator, model=model, loss_fn=loss_fn, prep=prep, data=loaders, opt=optim.opt,
                            lr=optim.lr, weight_decay=optim.weight_decay, epochs=cfg.epochs,
                            warmup_epochs=optim.warmup_epochs, state_dir=stage / "state",
                            position=position, stage="pseudo_pretrain", train_cfg=r.train)
        if accelerator.is_main_process:
            info = {"role": "pseudo-label pretraining", "pseudo": {k: v for k, v in summary.items() if k != "per_label"},
                    "input_size": [3, r.model.img_size, r.model.img_size],
                    "data": f"pseudo-labels of {r.data.unlabeled_store} by iter{r.iterations} only"}
            save_stage_checkpoint(model, stage, arch=cfg.arch, label_names=data.label_names, info=info)
        accelerator.wait_for_everyone()
    model = model.to(accelerator.device).eval()
    prep = InputPrep.for_model(model, r.model.img_size, r.train.channels_last)
    metrics_path, export = stage / "metrics.json", stage / "export"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
    else:
        metrics = evaluate_model(accelerator, model, data.labeled, data.eval_sets, prep, label_names=data.label_names,
                                 parents=data.parents, batch_size=r.eval.batch_size, grid=r.eval.thresholds)
    if accelerator.is_main_process:
        write_json(metrics_path, metrics)
        if not (export / "config.json").is_file():
            export_timm(ckpt, export, card="Trained on Noisy Student pseudo-labels only (Virk & Bathula 2020, "
                                           "Table 3 pipeline); fine-tune with model.init=domain.")
    accelerator.wait_for_everyone()
    logger.info("pseudo-label pretraining of %s on %d pseudo-labeled inputs -> %s", cfg.arch, len(rows), export)
    return {"stage": str(stage), "export": str(export), "arch": cfg.arch, "metrics": metrics,
            "pseudo": {k: v for k, v in summary.items() if k != "per_label"}}
