"""Downstream fine-tuning: ``dompre finetune RECIPE [key=value ...]``.

One recipe (:class:`FinetuneRecipe`) says which dataset (:mod:`dompre.data.downstream`), which model and
initialisation, and which transfer strategy:

- ``model.init``: ``random``; ``domain`` (a dompre export folder, loaded with
  ``timm.create_model('local-dir:DIR', pretrained=True, num_classes=K)``); ``file`` (any weights file, loaded through
  timm's ``pretrained_cfg_overlay=dict(file=...)`` so its checkpoint filters and ``in_chans`` adaptation apply, or
  else as a safetensors / ``torch.load(weights_only=True)`` state dict, non-strictly, without the classifier);
  ``imagenet`` (timm ``pretrained=True``; weights not cached are downloaded first, and it stops with one line when
  offline or when that download fails);
  ``meanvar`` (``model.weights``, or ImageNet when unset, then every layer redrawn with its mean and std). See
  :mod:`dompre.train.transfer` for these and ``train.freeze_until``, ``train.head_l1`` / ``head_l2`` and the
  convergence speed (``metrics.json`` ``convergence.best_epoch``: the epoch of the best validation score).
- ``train.strategy``: ``finetune`` (gradient training, with ``train.freeze`` percent of the layers frozen) or
  ``features`` (pooled features of the frozen model into scikit-learn logistic regression or linear SVM; layer,
  pooling, scales and PCA / VLAD encoding: :mod:`dompre.train.features`).
- LesaNet options: ``train.rhem`` (relational hard example mining: ``train.rhem_samples`` reliable lesion-label
  pairs drawn with probability ``∝ |p - y| ** train.rhem_power``, their cross-entropy added with weight
  ``train.rhem_weight``; the reliable negatives come from ``data.ontology``'s exclusive relations:
  :class:`dompre.train.losses.RelationalHardExampleMining`), ``train.triplet_weight`` (triplet loss on the lesion
  embeddings), ``train.box_augment`` (patch and box shifted, scaled and flipped together).
- ``data.ontology`` with ``data.kind=lesanet``: the labels are cleaned with the ontology as LesaNet's loader does
  (every split): a label exclusive with one of the lesion's relevant labels is a certain negative (0, also where
  it was uncertain), the ancestors of an uncertain label are uncertain (NaN) unless relevant
  (:func:`dompre.data.deeplesion.apply_label_relations`); predictions expand to parents before scoring.
- **Layers** (for ``freeze``): the parameterised modules (modules that own parameters directly), in registration
  order, of the backbone: for LesaNet its ``backbone``; for timm models every one registered before
  ``get_classifier()``. Freezing X% freezes the first ``floor(X / 100 × n_layers)`` of them (their parameters stop
  requiring gradients and their BatchNorm statistics stay fixed); the classifier and anything after it (e.g. the
  score propagation layer) always train. ``freeze=100`` trains only the head.
- ``train.class_weights``: inverse-frequency class weights (multiclass) or LesaNet's per-label positive/negative
  weights (multi-label). ``train.augment``: random resized crop, flip, small rotation, brightness/contrast.
- ``model.n_models``: train n models (seeds ``seed``..``seed+n-1``) and average their probabilities.

A run folder holds ``recipe.yaml`` (resolved), ``metrics.json``, ``per_label.csv``, ``predictions.npz``,
``model_<k>.safetensors`` and plots (``roc.png``, ``confusion.png``, ``learning_curves.png``). Metrics come from
:mod:`dompre.train.metrics`: the LesaNet protocol for multi-label tasks (thresholds chosen on val), the
Medico-style report for single-label tasks; plus inference frames per second.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from accelerate.utils import set_seed
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save
from torchvision.transforms import v2

import dompre.models  # noqa: F401  (registers MAKNet and the baselines with timm)
from dompre._io import atomic_open, write_atomic
from dompre.checkpoint import read_weights
from dompre.data.deeplesion import Ontology, apply_label_relations, load_ontology
from dompre.data.downstream import BoxAugment, Clahe, build_dataset, make_splits
from dompre.errors import UserError
from dompre.models.lesanet import LesaNet
from dompre.recipes import PATH, changed_keys, load_recipe, recipe_to_dict, save_recipe
from dompre.train import downstream_plots as plots
from dompre.data.prep import InputPrep
from dompre.train.engine import (Items, Position, StreamSampler, batch_loader, before_workers_fork, create_optimizer,
                                 create_scheduler, epoch_steps, fit, forward, infer, make_accelerator, make_loader)
from dompre.train.features import extract, fit_encoding, fit_linear, linear_scores
from dompre.train.losses import RelationalHardExampleMining, WeightedFocalLoss, label_triplet_loss, label_weights
from dompre.train.metrics import auc_micro, choose_thresholds, classification_report, lesanet_eval
from dompre.train.pseudo_label import exclusive_matrix
from dompre.train.transfer import (check_imagenet_weights, check_options, classification_block, convergence,
                                   freeze_until, head_penalty, imagenet_load_error, meanvar_redraw, val_score)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    kind: Literal["kvasir", "pneumonia", "chestxray14", "deeplesion_type", "lesanet"] = "kvasir"  # dataset reader
    root: str = field(default="data/kvasir", metadata=PATH)  # dataset folder (see dompre.data.downstream)
    labels_json: str | None = field(default=None, metadata=PATH)  # lesanet: text_mined_labels_171_and_split.json
    terms: tuple[str, ...] = ()  # lesanet: label subset (empty = the whole term list)
    ontology: str | None = field(default=None, metadata=PATH)  # lesanet: ontology xlsx/csv; labels exclusive with
    #   a relevant one become 0, uncertain ones spread to their parents, predictions expand to parents (LesaNet)
    image_size: int = 224  # input side in pixels (LesaNet: 120)
    channels: int = 3  # 3 = grayscale repeated; 1 = model built with in_chans=1 (timm adapts the first conv)
    val_fraction: float = 0.1  # share carved for val when the dataset has no (or a tiny) val split
    test_fraction: float = 0.2  # share carved for test when the dataset has no test split
    min_val: int = 100  # an official val split smaller than this is replaced by a carved one
    folds: int = 0  # k > 1: k-fold cross-validation, fold `fold` is the test set
    fold: int = 0
    split_seed: int = 0  # seed of the carved splits (kept fixed across a study's training seeds)
    num_workers: int = 0  # DataLoader workers
    clahe: bool = False  # CLAHE on every image (OpenCV; colour images: on the L channel of Lab)
    clahe_clip: float = 2.0  # CLAHE clip limit
    clahe_tiles: int = 8  # CLAHE tiles per side


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet18"  # timm architecture (LesaNet: its backbone); ignored for init=domain
    head: Literal["timm", "lesanet"] = "timm"  # lesanet = multi-scale RoI head + score propagation
    init: Literal["random", "domain", "file", "imagenet", "meanvar"] = "random"  # imagenet: timm pretrained=True;
    #   meanvar: model.weights (or, unset, ImageNet) redrawn per layer with the same mean and std (Kierzynka)
    weights: str | None = field(default=None, metadata=PATH)  # export folder (domain) or weights file (file)
    drop_rate: float = 0.0  # dropout before the classifier
    n_models: int = 1  # ensemble size: outputs of n models averaged


@dataclass(frozen=True)
class TrainConfig:
    strategy: Literal["finetune", "features"] = "finetune"
    freeze: float = 0.0  # percent of layers frozen from the bottom (0..100)
    freeze_until: str = ""  # or: freeze every layer up to and including this module (e.g. features.denseblock2)
    classifier: Literal["logreg", "linear_svm"] = "logreg"  # strategy=features
    feature_layer: str | int = ""  # strategy=features: module name or feature_info stage ("" = pre-logits)
    feature_pool: Literal["avg", "max"] = "avg"  # global pooling of feature_layer's map
    feature_scales: tuple[int, ...] = ()  # input sides, features of each concatenated (() = image_size)
    feature_encoding: Literal["none", "pca", "vlad"] = "none"  # pca: to pca_dim; vlad: vlad_k k-means centres
    pca_dim: int = 64
    vlad_k: int = 16
    save_features: bool = False  # write test-set features to features.npz (dompre study --tsne)
    head_l1: float = 0.0  # L1 penalty on the classification block's parameters (Hicks et al.)
    head_l2: float = 0.0  # L2 penalty on the classification block's parameters
    rhem: bool = False  # LesaNet relational hard example mining (needs data.ontology: its reliable negatives)
    rhem_weight: float = 1.0  # weight of the RHEM term added to the loss (LesaNet config.yml RHEM_LOSS_WT)
    rhem_samples: int = 10000  # reliable lesion-label pairs drawn per batch, with replacement (RHEM_BATCH_SIZE)
    rhem_power: float = 2.0  # draw probability ∝ |p - y| ** rhem_power (RHEM_POWER; 0 = uniform)
    triplet_weight: float = 0.0  # LesaNet triplet loss on the lesion embeddings (0 = off)
    triplet_margin: float = 0.1
    box_augment: bool = False  # LesaNet: random shift/scale/flip of patch and lesion box together
    epochs: int = 10
    batch_size: int = 32
    opt: str = "adamw"  # any timm.optim.create_optimizer_v2 name (sgd, adamw, lookahead_radam, ...)
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    sched: Literal["cosine", "step", "none"] = "cosine"
    step_epochs: tuple[int, ...] = ()  # sched=step: epochs where lr is multiplied by gamma
    gamma: float = 0.1
    class_weights: bool = False
    augment: bool = True
    progress: bool = True  # tqdm progress bars on the main process
    max_steps_per_epoch: int = 0  # 0 = whole training set each epoch (tests use 1-2)
    eval_batch_size: int = 64
    save_models: bool = True
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # accelerate mixed precision (GPU)
    checkpoint_every: int = 200  # resume state every N optimizer steps (and at every epoch end)
    log_every: int = 10  # loss and lr to the run's logs every N optimizer steps


@dataclass(frozen=True)
class FinetuneRecipe:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    seed: int = 0
    out_dir: str = field(default="runs/finetune", metadata=PATH)


def load_finetune_recipe(path: str | Path | None, overrides: list[str] = ()) -> FinetuneRecipe:
    """Read and check a fine-tuning recipe (see :class:`FinetuneRecipe`)."""
    recipe = load_recipe(path, FinetuneRecipe, overrides)
    t, m = recipe.train, recipe.model
    if not 0 <= t.freeze <= 100:
        raise UserError(f"train.freeze={t.freeze}: a percentage of layers in 0..100")
    if m.init in ("domain", "file") and not m.weights:
        raise UserError(f"model.init={m.init} needs model.weights (an export folder or a weights file)")
    if m.init in ("domain", "file", "meanvar") and m.weights and not Path(m.weights).exists():
        raise FileNotFoundError(f"model.weights {m.weights} does not exist; fix the path")
    if m.init == "domain" and not (Path(m.weights) / "config.json").is_file():
        raise FileNotFoundError(f"model.weights {m.weights}: no config.json; init=domain takes a `dompre export` "
                                f"folder (use init=file for a weights file)")
    if recipe.data.kind == "lesanet" and m.head != "lesanet":
        raise UserError("data.kind=lesanet needs model.head=lesanet (the RoI head uses the lesion box)")
    if t.strategy == "features" and m.head == "lesanet":
        raise UserError("train.strategy=features is for model.head=timm; LesaNet trains its RoI head")
    if m.n_models < 1:
        raise UserError(f"model.n_models={m.n_models}: use 1 or more")
    check_options(recipe)
    return recipe


# ----------------------------------------------------------------------------------------------- models
def load_weights_file(model: nn.Module, path: str | Path) -> dict:
    """Load ``path`` into ``model`` non-strictly, dropping tensors whose shape differs (the classifier).

    Returns ``{"loaded", "missing", "unexpected", "shape_mismatch"}`` counts; raises ValueError if nothing matched.
    """
    path = Path(path)
    sd = read_weights(path)  # safetensors or weights_only torch file, unwrapped (the one reader of weights)
    own = model.state_dict()
    keep = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if not keep:
        raise UserError(f"weights file {path}: none of its {len(sd)} tensors match the model's names and shapes; "
                         f"check model.arch")
    res = model.load_state_dict(keep, strict=False)
    return {"loaded": len(keep), "missing": len(res.missing_keys), "unexpected": len(set(sd) - set(own)),
            "shape_mismatch": sum(1 for k, v in sd.items() if k in own and own[k].shape != v.shape)}


def build_model(recipe: FinetuneRecipe, num_classes: int) -> tuple[nn.Module, dict]:
    """The model of ``recipe`` with ``num_classes`` outputs, and a dict saying how it was initialised."""
    m, c = recipe.model, recipe.data.channels
    info: dict = {"init": m.init, "weights": m.weights or None}
    if m.init == "meanvar":  # the source init, then every layer redrawn with its mean and std
        src = ("domain" if (Path(m.weights) / "config.json").is_file() else "file") if m.weights else "imagenet"
        model, info = build_model(dataclasses.replace(recipe, model=dataclasses.replace(m, init=src)), num_classes)
        info.update(init="meanvar", source=src,
                    **meanvar_redraw(layer_list(model), int(torch.randint(0, 2 ** 31 - 1, (1,)))))
        return model, info
    if m.init == "domain":
        cfg = json.loads((Path(m.weights) / "config.json").read_text())
        info["arch"] = cfg.get("architecture")
        name, kw = f"local-dir:{m.weights}", {"pretrained": True}
    elif m.init == "file":
        name, kw = m.arch, {"pretrained": True, "pretrained_cfg_overlay": dict(file=m.weights)}
        info["arch"] = m.arch
    elif m.init == "imagenet":
        name, kw = m.arch, {"pretrained": True}
        info.update(arch=m.arch, weights=check_imagenet_weights(m.arch))
    else:
        name, kw = m.arch, {"pretrained": False}
        info["arch"] = m.arch

    def create(**extra):
        if m.head == "lesanet":
            return LesaNet(num_classes, name, in_chans=c, drop_rate=m.drop_rate, **kw, **extra)
        return timm.create_model(name, num_classes=num_classes, in_chans=c, drop_rate=m.drop_rate, **kw, **extra)

    if m.init == "imagenet":
        try:
            return create(), info
        except Exception as e:  # the hub or url failing under timm: one line; anything else keeps its traceback
            err = imagenet_load_error(m.arch, e)
            if err is None:
                raise
            raise err from None
    if m.init != "file":
        return create(), info
    try:
        model = create()
        info["loader"] = "timm pretrained_cfg_overlay"
    except (RuntimeError, KeyError, ValueError) as e:  # keys of another layout: load what matches
        log.info("timm could not load %s (%s); loading it non-strictly", m.weights, str(e)[:200])
        kw = {"pretrained": False}
        model = create()
        target = model.backbone if m.head == "lesanet" else model
        info.update(loader="non-strict state dict", **load_weights_file(target, m.weights))
    return model, info


def layer_list(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The freezable layers of ``model``, bottom first (see the module docstring for the definition)."""
    owns = (lambda mod: next(mod.parameters(recurse=False), None) is not None)
    if hasattr(model, "backbone") and isinstance(model.backbone, nn.Module):
        return [(f"backbone.{n}", mod) for n, mod in model.backbone.named_modules() if owns(mod)]
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    layers = []
    for n, mod in model.named_modules():
        if mod is classifier:
            break
        if owns(mod):
            layers.append((n, mod))
    return layers


def freeze_layers(model: nn.Module, percent: float, until: str = "") -> dict:
    """Freeze the bottom ``percent`` % of :func:`layer_list` (or, with ``until``, every layer up to and including
    that module: :func:`dompre.train.transfer.freeze_until`); returns counts and the frozen module names."""
    layers = layer_list(model)
    if until:
        n_frozen = len(freeze_until(model, until, layers))
    else:
        n_frozen = math.floor(len(layers) * percent / 100 + 1e-9)
    for _, mod in layers[:n_frozen]:
        for p in mod.parameters(recurse=False):
            p.requires_grad_(False)
    model._dompre_frozen = [mod for _, mod in layers[:n_frozen]]
    return {"n_layers": len(layers), "n_frozen": n_frozen, "frozen": [n for n, _ in layers[:n_frozen]],
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters())}


def _set_train(model: nn.Module) -> None:
    """train() mode, but frozen layers (BatchNorm statistics) stay in eval()."""
    model.train()
    for mod in getattr(model, "_dompre_frozen", []):
        mod.eval()


# ------------------------------------------------------------------------------------------- training
def _augment(size: int) -> v2.Compose:
    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.75, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                       v2.RandomRotation(10), v2.ColorJitter(brightness=0.2, contrast=0.2)])


class FinetuneTask(nn.Module):
    """One training batch -> ``{"loss", "task_loss"}``: the task loss, plus LesaNet's triplet loss on the
    lesion embeddings and the classification-block penalty when the recipe asks (``"triplet_loss"``,
    ``"head_penalty"``); the fine-tuning step of :func:`dompre.train.engine.fit`, as
    :class:`~dompre.train.student.NoisyStudentTask` is pretraining's."""

    def __init__(self, model: nn.Module, prep: InputPrep, loss_fn, t: TrainConfig,
                 progress: "EpochProgress", rhem: RelationalHardExampleMining | None = None) -> None:
        super().__init__()
        self.model, self.prep, self.loss_fn, self.t, self.progress = model, prep, loss_fn, t, progress
        self.rhem = rhem

    def forward(self, batch: dict) -> dict:
        x, target = self.prep(batch["image"]), batch["target"]
        if self.t.triplet_weight or self.rhem is not None:
            parts = self.model(x, batch["box"], parts=True)
            task = self.loss_fn(parts["logits"].float(), target)
            out = {"task_loss": task, "loss": task}
            if self.t.triplet_weight:
                out["triplet_loss"] = label_triplet_loss(parts["embedding"].float(), target, self.t.triplet_margin)
                out["loss"] = out["loss"] + self.t.triplet_weight * out["triplet_loss"]
            if self.rhem is not None:  # on the classifier's logits, before score propagation, as LesaNet
                out["rhem_loss"] = self.rhem(parts["class_logits"], target)
                out["loss"] = out["loss"] + self.t.rhem_weight * out["rhem_loss"]
        else:
            task = self.loss_fn(forward(self.model, x, batch).float(), target)
            out = {"task_loss": task, "loss": task}
        pen = head_penalty(classification_block(_unwrap(self.model)), self.t.head_l1, self.t.head_l2)
        if pen is not None:
            out["head_penalty"] = pen
            out["loss"] = out["loss"] + pen
        self.progress.add_train_loss(float(out["loss"].detach()))
        return out


class EpochProgress:
    """Fine-tuning's progress beside the engine's state: the epoch's running train loss, the per-epoch history
    and the weights of the epoch with the lowest validation loss. Saved with every resume state
    (``finetune.json`` + ``best.safetensors``), so a resumed run picks the same best epoch and writes the same
    history as an uninterrupted one."""

    def __init__(self) -> None:
        self.history: list[dict] = []
        self.loss_sum, self.loss_steps = 0.0, 0
        self.best_loss = math.inf
        self.best: dict[str, torch.Tensor] | None = None

    def add_train_loss(self, loss: float) -> None:
        self.loss_sum, self.loss_steps = self.loss_sum + loss, self.loss_steps + 1

    def end_epoch(self, row: dict, model: nn.Module) -> None:
        """Record the epoch's ``row`` (with ``val_loss``); keep ``model``'s weights if its loss is the best."""
        self.history.append(row)
        self.loss_sum, self.loss_steps = 0.0, 0
        if row["val_loss"] <= self.best_loss or self.best is None:
            self.best_loss = row["val_loss"]
            self.best = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def save(self, folder: Path) -> None:
        write_atomic(folder / "finetune.json", json.dumps(
            {"history": self.history, "loss_sum": self.loss_sum, "loss_steps": self.loss_steps,
             "best_loss": None if math.isinf(self.best_loss) else self.best_loss}))
        if self.best is not None:
            write_atomic(folder / "best.safetensors", st_save({k: v.contiguous() for k, v in self.best.items()}))

    def load(self, folder: Path) -> None:
        try:
            d = json.loads((folder / "finetune.json").read_text())
            self.history, self.loss_sum, self.loss_steps = list(d["history"]), float(d["loss_sum"]), \
                int(d["loss_steps"])
            self.best_loss = math.inf if d["best_loss"] is None else float(d["best_loss"])
            best = folder / "best.safetensors"
            self.best = st_load_file(str(best)) if best.is_file() else None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{folder}: unreadable fine-tuning progress ({e}); delete {folder.parent} to "
                             f"restart this model") from None


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _loss_fn(task: str, train_labels: np.ndarray, class_weights: bool):
    if task == "multiclass":
        y = torch.from_numpy(train_labels)
        w = None
        if class_weights:
            counts = y.sum(0).clamp(min=1)
            w = counts.sum() / (len(counts) * counts)
        return lambda logits, labels: F.cross_entropy(logits, labels.argmax(1),
                                                      weight=None if w is None else w.to(logits))
    w_pos, w_neg = label_weights(train_labels) if class_weights else (None, None)
    return WeightedFocalLoss(w_pos, w_neg, gamma=0.0)  # gamma 0: weighted BCE


def _exclusive(ontology: Ontology, names: list[str]) -> np.ndarray:
    """(L, L) bool exclusivity matrix of ``names`` in ``ontology``."""
    return exclusive_matrix(ontology.exclusive_pairs(names), len(names))


def train_model(recipe: FinetuneRecipe, ds, splits: dict, seed: int, accelerator, state_dir: Path) -> dict:
    """Train one model with the finetune strategy on the engine (resumable from ``state_dir``); keep the epoch
    with the lowest val loss."""
    t = recipe.train
    set_seed(seed)
    model, init_info = build_model(recipe, len(ds.label_names))
    freeze_info = freeze_layers(model, t.freeze, t.freeze_until)
    prep = InputPrep.for_model(model, None, channels=recipe.data.channels)
    aug = _augment(recipe.data.image_size) if t.augment and recipe.model.head != "lesanet" else None
    if t.box_augment:
        aug = BoxAugment()
    activation = "softmax" if ds.task == "multiclass" else "sigmoid"
    batch = min(t.batch_size, len(splits["train"]))
    steps = epoch_steps(len(splits["train"]), batch, accelerator.num_processes, t.max_steps_per_epoch)
    sampler = StreamSampler(splits["train"], steps * batch, seed, 0)
    loader = make_loader(Items(ds, transform=aug), sampler, batch, recipe.data.num_workers, seed)
    if recipe.data.num_workers > 0:
        before_workers_fork()
    opt = create_optimizer(model, t.opt, t.lr, t.weight_decay, t.momentum)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    per_process = len(loader)
    sched = create_scheduler(opt, t.epochs * per_process, kind=t.sched, lr_min=0.0,
                             milestones=[e * per_process for e in t.step_epochs], gamma=t.gamma)
    loss_fn = _loss_fn(ds.task, ds.labels[splits["train"]], t.class_weights)
    rhem = None
    if t.rhem:
        rhem = RelationalHardExampleMining(_exclusive(load_ontology(recipe.data.ontology), ds.label_names),
                                           t.rhem_samples, t.rhem_power)
    progress = EpochProgress()
    task = FinetuneTask(model, prep, loss_fn, t, progress, rhem)
    plain = Items(ds)

    def validate(epoch: int) -> dict:
        train_loss = progress.loss_sum / max(progress.loss_steps, 1)
        val = (infer(accelerator, model, plain, splits["val"], prep, t.eval_batch_size, activation=activation,
                     loss_fn=loss_fn, num_workers=recipe.data.num_workers) if len(splits["val"]) else None)
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val.loss if val else train_loss,
               "val_score": val_score(ds.task, val.scores, val.targets) if val else float("nan"),
               "lr": opt.param_groups[0]["lr"]}
        progress.end_epoch(row, accelerator.unwrap_model(model))
        return {k: v for k, v in row.items() if k != "epoch"}

    fit(accelerator, model=model, optimizer=opt, scheduler=sched, loaders=[loader], samplers=[sampler],
        step_fn=task, epochs=t.epochs, steps_per_epoch=per_process, state_dir=state_dir, position=Position(),
        stage="finetune", checkpoint_every=t.checkpoint_every, log_every=t.log_every, progress=t.progress,
        train_mode=lambda: _set_train(model), on_epoch_end=validate, extras=[progress])
    unwrapped = accelerator.unwrap_model(model)
    if progress.best is not None:
        unwrapped.load_state_dict(progress.best)
    return {"model": unwrapped.eval(), "history": progress.history, "init": init_info, "freeze": freeze_info,
            "prep": prep}


# ------------------------------------------------------------------------------------ feature extraction
def run_features(recipe: FinetuneRecipe, ds, splits: dict) -> dict:
    """Feature-extraction strategy: frozen model features (:mod:`dompre.train.features`) into a scikit-learn
    linear classifier."""
    set_seed(recipe.seed)
    model, init_info = build_model(recipe, len(ds.label_names))
    prep = InputPrep.for_model(model, None, channels=recipe.data.channels)
    dl = (lambda idx: batch_loader(Items(ds), idx, recipe.train.eval_batch_size, recipe.data.num_workers))
    t, out = recipe.train, {}
    kw = dict(layer=str(t.feature_layer), pool=t.feature_pool, scales=t.feature_scales, seed=recipe.seed)
    if t.feature_encoding == "vlad":  # k-means on a sample of the train descriptors, then VLAD batch by batch
        per_image = max(1, math.ceil(100_000 / max(1, len(splits["train"]))))
        sample = extract(model, dl(splits["train"]), prep, local=True, keep=per_image, **kw)[0]
        encode = fit_encoding(sample, "vlad", vlad_k=t.vlad_k, seed=recipe.seed)
        out = {name: extract(model, dl(splits[name]), prep, local=True, encode=encode, **kw)
               for name in ("train", "val", "test")}
    else:
        out = {name: extract(model, dl(splits[name]), prep, **kw) for name in ("train", "val", "test")}
        encode = fit_encoding(out["train"][0], t.feature_encoding, pca_dim=t.pca_dim, seed=recipe.seed)
        out = {name: (encode(f), y, sec) for name, (f, y, sec) in out.items()}
    (xtr, ytr, _), k = out["train"], len(ds.label_names)
    scores = {s: np.zeros((len(out[s][0]), k)) for s in ("val", "test")}
    if ds.task == "multiclass":
        clf = fit_linear(recipe.train.classifier, xtr, ytr.argmax(1), recipe.train.class_weights, recipe.seed)
        scores = {s: linear_scores(clf, out[s][0], k) for s in scores}
    else:
        for j in range(k):
            known = ~np.isnan(ytr[:, j])
            yj = ytr[known, j].astype(int)
            clf = (fit_linear(recipe.train.classifier, xtr[known], yj, recipe.train.class_weights, recipe.seed)
                   if len(np.unique(yj)) == 2 else None)
            for s in scores:  # a label with one class only gets a constant score at its prior
                scores[s][:, j] = (linear_scores(clf, out[s][0], 2)[:, 1] if clf is not None
                                   else (yj.mean() if len(yj) else 0.0))
    return {"val": {"scores": scores["val"], "labels": out["val"][1]},
            "test": {"scores": scores["test"], "labels": out["test"][1], "seconds": out["test"][2],
                     "index": np.asarray(splits["test"]), "features": out["test"][0]},
            "init": init_info, "feature_dim": int(xtr.shape[1]), "history": []}


# ------------------------------------------------------------------------------------------ evaluation
def evaluate(task: str, val: dict, test: dict, label_names: list[str], parents=None) -> dict:
    """Metrics of test scores: LesaNet protocol (thresholds from val) or the single-label report."""
    if task == "multilabel":
        ths = (choose_thresholds(val["scores"], val["labels"]) if len(val["scores"])
               else np.full(len(label_names), 0.5))
        res = lesanet_eval(test["scores"], test["labels"], ths, parents=parents, label_names=label_names)
        res.pop("pred")
        table = res.pop("per_label")
    else:
        y = test["labels"].argmax(1)
        res = classification_report(y, test["scores"].argmax(1), test["scores"], labels=list(range(len(label_names))))
        table = res.pop("per_class")
        table.index = label_names
        res["confusion_matrix"] = np.asarray(res["confusion_matrix"]).tolist()
        res.pop("labels")
    res["auc_micro"] = auc_micro(test["scores"], test["labels"])
    return {"metrics": {k: v for k, v in res.items()}, "table": table}


def _write_json(obj, path: Path) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def prepare_data(recipe: FinetuneRecipe):
    """(dataset, splits) of ``recipe``."""
    d = recipe.data
    kw = {"image_size": d.image_size, "channels": d.channels}
    if d.kind == "lesanet":
        kw.update(labels_json=d.labels_json, terms=list(d.terms) or None)
    if d.kind in ("lesanet", "deeplesion_type"):
        kw["return_box"] = recipe.model.head == "lesanet"
    elif recipe.model.head == "lesanet":
        raise UserError(f"model.head=lesanet needs lesion boxes: use data.kind lesanet or deeplesion_type, "
                         f"not {d.kind}")
    if d.clahe:
        kw["transform"] = Clahe(d.clahe_clip, d.clahe_tiles, color=d.kind == "kvasir")
    ds = build_dataset(d.kind, d.root, **kw)
    if d.kind == "lesanet" and d.ontology:  # LesaNet's relational label cleaning (every split, as its loader)
        ontology = load_ontology(d.ontology)
        ds.labels = apply_label_relations(ds.labels, _exclusive(ontology, ds.label_names),
                                          ontology.parent_indices(ds.label_names))
    splits = make_splits(ds, val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=d.split_seed,
                         folds=d.folds, fold=d.fold, min_val=d.min_val)
    for name in ("train", "test"):
        if not len(splits[name]):
            raise UserError(f"{d.root}: the {name} split is empty ({len(ds)} usable samples); add data or "
                             f"change data.test_fraction / data.val_fraction")
    return ds, splits


def _check_resumable(recipe: FinetuneRecipe, out: Path) -> None:
    """An interrupted run (``out/state``) resumes only under the recipe it was started with."""
    saved = out / "recipe.yaml"
    if not (out / "state").is_dir() or not saved.is_file():
        return
    diff = changed_keys(yaml.safe_load(saved.read_text()) or {}, recipe_to_dict(recipe),
                        ignore=("train.progress", "data.num_workers", "out_dir"))
    if diff:
        raise UserError(f"{out} holds an interrupted fine-tuning run with other settings for {diff}; rerun with the "
                        f"recipe in {saved} to resume it, or choose another out_dir")


def run_finetune(recipe: FinetuneRecipe, out_dir: str | Path | None = None) -> dict:
    """Run one recipe end to end and write its run folder; returns the metrics dict (also ``metrics.json``).

    Resumable: a killed run (even ``kill -9``) rerun with the same recipe and folder continues from its latest
    state in ``out/state/`` and ends with the metrics of an uninterrupted run; the state goes once the run's
    results are written."""
    out = Path(out_dir or recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_resumable(recipe, out)
    (out / "metrics.json").unlink(missing_ok=True)  # results of an earlier recipe must not outlive a rerun
    save_recipe(recipe, out / "recipe.yaml")
    ds, splits = prepare_data(recipe)
    activation = "softmax" if ds.task == "multiclass" else "sigmoid"
    if recipe.train.strategy == "features":
        res = run_features(recipe, ds, splits)
        val, test, histories, extra = res["val"], res["test"], [], {"feature_dim": res["feature_dim"]}
        init_info, seconds, freeze_info = res["init"], test["seconds"], None
    else:
        t = recipe.train
        accelerator = make_accelerator(out, mixed_precision=t.mixed_precision, trackers=False)
        runs = [train_model(recipe, ds, splits, recipe.seed + m, accelerator, out / "state" / f"model_{m}")
                for m in range(recipe.model.n_models)]
        plain = Items(ds)
        preds = [{name: infer(accelerator, r["model"], plain, splits[name], r["prep"], t.eval_batch_size,
                              activation=activation, num_workers=recipe.data.num_workers)
                  for name in ("val", "test")} for r in runs]
        val = {"scores": np.mean([p["val"].scores for p in preds], 0), "labels": preds[0]["val"].targets}
        test = {"scores": np.mean([p["test"].scores for p in preds], 0), "labels": preds[0]["test"].targets,
                "index": np.asarray(splits["test"])}
        if not len(splits["val"]):
            val = {"scores": np.zeros((0, len(ds.label_names))), "labels": np.zeros((0, len(ds.label_names)))}
        seconds = sum(p["test"].seconds for p in preds)
        histories = [r["history"] for r in runs]
        init_info, freeze_info, extra = runs[0]["init"], runs[0]["freeze"], {}
        if t.save_features:
            test["features"] = extract(runs[0]["model"], batch_loader(plain, splits["test"], t.eval_batch_size),
                                       runs[0]["prep"])[0]
        if t.save_models and accelerator.is_main_process:
            for m, r in enumerate(runs):
                sd = {n: v.detach().cpu().contiguous() for n, v in r["model"].state_dict().items()}
                write_atomic(out / f"model_{m}.safetensors", st_save(sd))
    parents = None
    if recipe.data.ontology and ds.task == "multilabel":
        parents = load_ontology(recipe.data.ontology).parent_indices(ds.label_names)
    ev = evaluate(ds.task, val, test, ds.label_names, parents=parents)
    n_test = len(test["scores"])
    conv = [convergence(h) for h in histories]
    if conv:
        extra["convergence"] = {"best_epoch": float(np.mean([c["best_epoch"] for c in conv])),
                                "best_val_score": float(np.mean([c["best_val_score"] for c in conv])),
                                "per_model": conv}
    if recipe.train.save_features and "features" in test:
        with atomic_open(out / "features.npz") as f:
            np.savez(f, features=np.asarray(test["features"], np.float32), labels=test["labels"])
    result = {"task": ds.task, "dataset": recipe.data.kind, "label_names": ds.label_names,
              "n": {s: int(len(v)) for s, v in splits.items()}, "skipped": len(ds.skipped),
              "init": init_info, "strategy": recipe.train.strategy, "freeze_percent": recipe.train.freeze,
              "freeze": freeze_info, "n_models": recipe.model.n_models, "seed": recipe.seed,
              "test": ev["metrics"], "fps": n_test / seconds if seconds > 0 else float("nan"),
              "history": histories, **extra}
    with atomic_open(out / "per_label.csv", "w") as f:
        ev["table"].to_csv(f)
    with atomic_open(out / "predictions.npz") as f:
        np.savez(f, scores=test["scores"], labels=test["labels"], index=np.asarray(test.get("index", splits["test"])))
    plots.plot_roc(test["scores"], test["labels"], ds.label_names, out / "roc.png")
    if ds.task == "multiclass":
        plots.plot_confusion(np.asarray(ev["metrics"]["confusion_matrix"]), ds.label_names, out / "confusion.png")
    if histories:
        plots.plot_learning_curves(histories, out / "learning_curves.png")
    _write_json(result, out / "metrics.json")
    shutil.rmtree(out / "state", ignore_errors=True)  # dompre's own resume state; the results are written
    return result
