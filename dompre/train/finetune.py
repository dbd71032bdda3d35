"""Downstream fine-tuning: ``dompre finetune RECIPE [key=value ...]``.

One recipe (:class:`FinetuneRecipe`) says which dataset (:mod:`dompre.data.downstream`), which model and
initialisation, and which transfer strategy:

- ``model.init``: ``random``; ``domain`` (a dompre export folder, loaded with
  ``timm.create_model('local-dir:DIR', pretrained=True, num_classes=K)``); ``file`` (any weights file, loaded through
  timm's ``pretrained_cfg_overlay=dict(file=...)`` so its checkpoint filters and ``in_chans`` adaptation apply, or
  else as a safetensors / ``torch.load(weights_only=True)`` state dict, non-strictly, without the classifier);
  ``imagenet`` (timm ``pretrained=True``; stops at once when the weights are neither cached nor reachable);
  ``meanvar`` (``model.weights``, or ImageNet when unset, then every layer redrawn with its mean and std). See
  :mod:`dompre.train.transfer` for these and ``train.freeze_until``, ``train.head_l1`` / ``head_l2`` and the
  convergence speed (``metrics.json`` ``convergence.best_epoch``: the epoch of the best validation score).
- ``train.strategy``: ``finetune`` (gradient training, with ``train.freeze`` percent of the layers frozen) or
  ``features`` (pooled features of the frozen model into scikit-learn logistic regression or linear SVM; layer,
  pooling, scales and PCA / VLAD encoding: :mod:`dompre.train.features`).
- LesaNet options: ``train.rhem`` (hard lesion-label pairs only), ``train.triplet_weight`` (triplet loss on the
  lesion embeddings), ``train.box_augment`` (patch and box shifted, scaled and flipped together).
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

import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dompre._io import write_atomic
from dompre.checkpoint import read_weights
from dompre.recipes import PATH, load_recipe, save_recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    kind: Literal["kvasir", "pneumonia", "chestxray14", "deeplesion_type", "lesanet"] = "kvasir"  # dataset reader
    root: str = field(default="data/kvasir", metadata=PATH)  # dataset folder (see dompre.data.downstream)
    labels_json: str | None = field(default=None, metadata=PATH)  # lesanet: text_mined_labels_171_and_split.json
    terms: tuple[str, ...] = ()  # lesanet: label subset (empty = the whole term list)
    ontology: str | None = field(default=None, metadata=PATH)  # lesanet: ontology xlsx/csv; predictions expand
    #                                                              to parents before scoring (LesaNet protocol)
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
    rhem: bool = False  # LesaNet relational hard example mining: the hardest lesion-label pairs only
    rhem_fraction: float = 0.5  # share of the batch's certain lesion-label pairs kept by RHEM
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
        raise ValueError(f"train.freeze={t.freeze}: a percentage of layers in 0..100")
    if m.init in ("domain", "file") and not m.weights:
        raise ValueError(f"model.init={m.init} needs model.weights (an export folder or a weights file)")
    if m.init in ("domain", "file", "meanvar") and m.weights and not Path(m.weights).exists():
        raise FileNotFoundError(f"model.weights {m.weights} does not exist; fix the path")
    if m.init == "domain" and not (Path(m.weights) / "config.json").is_file():
        raise FileNotFoundError(f"model.weights {m.weights}: no config.json; init=domain takes a `dompre export` "
                                f"folder (use init=file for a weights file)")
    if recipe.data.kind == "lesanet" and m.head != "lesanet":
        raise ValueError("data.kind=lesanet needs model.head=lesanet (the RoI head uses the lesion box)")
    if t.strategy == "features" and m.head == "lesanet":
        raise ValueError("train.strategy=features is for model.head=timm; LesaNet trains its RoI head")
    if m.n_models < 1:
        raise ValueError(f"model.n_models={m.n_models}: use 1 or more")
    from dompre.train.transfer import check_options
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
        raise ValueError(f"weights file {path}: none of its {len(sd)} tensors match the model's names and shapes; "
                         f"check model.arch")
    res = model.load_state_dict(keep, strict=False)
    return {"loaded": len(keep), "missing": len(res.missing_keys), "unexpected": len(set(sd) - set(own)),
            "shape_mismatch": sum(1 for k, v in sd.items() if k in own and own[k].shape != v.shape)}


def build_model(recipe: FinetuneRecipe, num_classes: int) -> tuple[nn.Module, dict]:
    """The model of ``recipe`` with ``num_classes`` outputs, and a dict saying how it was initialised."""
    import timm

    import dompre  # noqa: F401  (registers MAKNet with timm)
    m, c = recipe.model, recipe.data.channels
    info: dict = {"init": m.init, "weights": m.weights or None}
    if m.init == "meanvar":  # the source init, then every layer redrawn with its mean and std
        import dataclasses

        from dompre.train.transfer import meanvar_redraw
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
        from dompre.train.transfer import check_imagenet_weights
        name, kw = m.arch, {"pretrained": True}
        info.update(arch=m.arch, weights=check_imagenet_weights(m.arch))
    else:
        name, kw = m.arch, {"pretrained": False}
        info["arch"] = m.arch

    def create(**extra):
        if m.head == "lesanet":
            from dompre.models.lesanet import LesaNet
            return LesaNet(num_classes, name, in_chans=c, drop_rate=m.drop_rate, **kw, **extra)
        return timm.create_model(name, num_classes=num_classes, in_chans=c, drop_rate=m.drop_rate, **kw, **extra)

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
        from dompre.train.transfer import freeze_until
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


def _norm_stats(model: nn.Module, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    from timm.data import resolve_data_config
    cfg = resolve_data_config({}, model=model.backbone if hasattr(model, "backbone") else model)
    mean, std = list(cfg["mean"]), list(cfg["std"])
    if len(mean) != channels:
        mean, std = [float(np.mean(mean))] * channels, [float(np.mean(std))] * channels
    return torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)


# ------------------------------------------------------------------------------------------- training
def _augment(size: int):
    from torchvision.transforms import v2
    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.75, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                       v2.RandomRotation(10), v2.ColorJitter(brightness=0.2, contrast=0.2)])


class _View(torch.utils.data.Dataset):
    """``ds`` restricted to ``indices`` with its own transform (train augmentation or none)."""

    def __init__(self, ds, indices: np.ndarray, transform=None):
        self.ds, self.indices, self.transform = ds, np.asarray(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        item = self.ds[int(self.indices[i])]
        if self.transform is not None and getattr(self.transform, "takes_box", False):
            item["image"], item["box"] = self.transform(item["image"], item["box"])
        elif self.transform is not None:
            item["image"] = self.transform(item["image"])
        return item


def _forward(model: nn.Module, batch: dict, mean: torch.Tensor, std: torch.Tensor, embed: bool = False):
    x = (batch["image"].float() / 255 - mean.to(batch["image"].device)) / std.to(batch["image"].device)
    if embed:  # LesaNet: (logits, lesion embeddings)
        return model(x, batch["box"], return_embedding=True)
    return model(x, batch["box"]) if "box" in batch else model(x)


def _step_loss(model: nn.Module, batch: dict, mean, std, loss_fn, t: TrainConfig) -> torch.Tensor:
    """The training loss of one batch: task loss (+ triplet loss on embeddings) (+ classification-block penalty)."""
    from dompre.train.transfer import classification_block, head_penalty
    if t.triplet_weight:
        from dompre.models.lesanet import label_triplet_loss
        logits, emb = _forward(model, batch, mean, std, embed=True)
        loss = loss_fn(logits.float(), batch["label"]) + t.triplet_weight * label_triplet_loss(
            emb.float(), batch["label"], t.triplet_margin)
    else:
        loss = loss_fn(_forward(model, batch, mean, std).float(), batch["label"])
    pen = head_penalty(classification_block(_unwrap(model)), t.head_l1, t.head_l2)
    return loss if pen is None else loss + pen


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _loss_fn(task: str, train_labels: np.ndarray, class_weights: bool, rhem: float = 0.0):
    from dompre.models.lesanet import label_weights, weighted_bce
    y = torch.from_numpy(train_labels)
    if task == "multiclass":
        w = None
        if class_weights:
            counts = y.sum(0).clamp(min=1)
            w = counts.sum() / (len(counts) * counts)
        return lambda logits, labels: F.cross_entropy(logits, labels.argmax(1),
                                                      weight=None if w is None else w.to(logits))
    w_pos, w_neg = label_weights(y) if class_weights else (None, None)
    if rhem:
        return lambda logits, labels: weighted_bce(logits, labels, w_pos, w_neg, hard_fraction=rhem)
    return lambda logits, labels: weighted_bce(logits, labels, w_pos, w_neg)


@torch.no_grad()
def predict(model: nn.Module, loader, accelerator, mean, std, task: str, loss=None) -> dict:
    """Probabilities, labels, indices, mean loss and forward seconds over ``loader``."""
    model.eval()
    scores, labels, index, losses, seconds = [], [], [], [], 0.0
    for batch in loader:
        t0 = time.perf_counter()
        logits = _forward(model, batch, mean, std)
        prob = logits.softmax(1) if task == "multiclass" else logits.sigmoid()
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        if loss is not None:
            losses.append(float(loss(logits.float(), batch["label"])))
        p, y, i = accelerator.gather_for_metrics((prob.float(), batch["label"], batch["index"]))
        scores.append(p.cpu().numpy()), labels.append(y.cpu().numpy()), index.append(i.cpu().numpy())
    cat = (lambda xs, w: np.concatenate(xs) if xs else np.zeros((0, w), np.float32))
    return {"scores": cat(scores, model.num_classes), "labels": cat(labels, model.num_classes),
            "index": np.concatenate(index) if index else np.zeros(0, int),
            "loss": float(np.mean(losses)) if losses else float("nan"), "seconds": seconds}


def train_model(recipe: FinetuneRecipe, ds, splits: dict, seed: int, accelerator) -> dict:
    """Train one model with the finetune strategy; keep the epoch with the lowest val loss."""
    from accelerate.utils import set_seed, tqdm
    from timm.optim import create_optimizer_v2

    from dompre.train.transfer import val_score
    t = recipe.train
    set_seed(seed)
    model, init_info = build_model(recipe, len(ds.label_names))
    freeze_info = freeze_layers(model, t.freeze, t.freeze_until)
    mean, std = _norm_stats(model, recipe.data.channels)
    aug = _augment(recipe.data.image_size) if t.augment and recipe.model.head != "lesanet" else None
    if t.box_augment:
        from dompre.data.downstream import BoxAugment
        aug = BoxAugment()
    gen = torch.Generator().manual_seed(seed)
    train_set = _View(ds, splits["train"], aug)
    mk = (lambda idx, bs, shuffle: torch.utils.data.DataLoader(
        _View(ds, idx) if not shuffle else train_set, batch_size=bs, shuffle=shuffle, generator=gen,
        drop_last=shuffle and len(idx) > bs, num_workers=recipe.data.num_workers))
    train_dl = mk(splits["train"], t.batch_size, True)
    val_dl = mk(splits["val"], t.eval_batch_size, False)
    opt_kw = {"momentum": t.momentum} if t.opt in ("sgd", "momentum", "nesterov") else {}
    opt = create_optimizer_v2(model, opt=t.opt, lr=t.lr, weight_decay=t.weight_decay, **opt_kw)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, t.epochs)) if t.sched == "cosine" else
             torch.optim.lr_scheduler.MultiStepLR(opt, list(t.step_epochs), t.gamma) if t.sched == "step" else None)
    model, opt, train_dl, val_dl = accelerator.prepare(model, opt, train_dl, val_dl)
    loss_fn = _loss_fn(ds.task, ds.labels[splits["train"]], t.class_weights)
    train_loss_fn = _loss_fn(ds.task, ds.labels[splits["train"]], t.class_weights, t.rhem_fraction if t.rhem else 0)
    history, best, best_loss = [], None, math.inf
    for epoch in range(t.epochs):
        _set_train(model)
        total, n = 0.0, 0
        for step, batch in enumerate(tqdm(train_dl, desc=f"epoch {epoch + 1}/{t.epochs}", leave=False, disable=not t.progress)):
            if t.max_steps_per_epoch and step >= t.max_steps_per_epoch:
                break
            loss = _step_loss(model, batch, mean, std, train_loss_fn, t)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            total, n = total + float(loss.detach()), n + 1
        if sched is not None:
            sched.step()
        val = predict(model, val_dl, accelerator, mean, std, ds.task, loss_fn) if len(splits["val"]) else None
        val_loss = val["loss"] if val else total / max(n, 1)
        history.append({"epoch": epoch + 1, "train_loss": total / max(n, 1), "val_loss": val_loss,
                        "val_score": val_score(ds.task, val["scores"], val["labels"]) if val else float("nan"),
                        "lr": opt.param_groups[0]["lr"]})
        if val_loss <= best_loss or best is None:
            best_loss, best = val_loss, copy.deepcopy(accelerator.unwrap_model(model).state_dict())
    accelerator.unwrap_model(model).load_state_dict(best)
    return {"model": model, "history": history, "init": init_info, "freeze": freeze_info, "mean": mean,
            "std": std}


# ------------------------------------------------------------------------------------ feature extraction
def run_features(recipe: FinetuneRecipe, ds, splits: dict) -> dict:
    """Feature-extraction strategy: frozen model features (:mod:`dompre.train.features`) into a scikit-learn
    linear classifier."""
    from accelerate.utils import set_seed

    from dompre.train.features import extract, fit_encoding, fit_linear, linear_scores
    set_seed(recipe.seed)
    model, init_info = build_model(recipe, len(ds.label_names))
    mean, std = _norm_stats(model, recipe.data.channels)
    dl = (lambda idx: torch.utils.data.DataLoader(_View(ds, idx), batch_size=recipe.train.eval_batch_size,
                                                  num_workers=recipe.data.num_workers))
    t, out = recipe.train, {}
    kw = dict(layer=str(t.feature_layer), pool=t.feature_pool, scales=t.feature_scales, seed=recipe.seed)
    if t.feature_encoding == "vlad":  # k-means on a sample of the train descriptors, then VLAD batch by batch
        per_image = max(1, math.ceil(100_000 / max(1, len(splits["train"]))))
        sample = extract(model, dl(splits["train"]), mean, std, local=True, keep=per_image, **kw)[0]
        encode = fit_encoding(sample, "vlad", vlad_k=t.vlad_k, seed=recipe.seed)
        out = {name: extract(model, dl(splits[name]), mean, std, local=True, encode=encode, **kw)
               for name in ("train", "val", "test")}
    else:
        out = {name: extract(model, dl(splits[name]), mean, std, **kw) for name in ("train", "val", "test")}
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
    from dompre.train.metrics import auc_micro, choose_thresholds, classification_report, lesanet_eval
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
    from dompre.data.downstream import build_dataset, make_splits
    d = recipe.data
    kw = {"image_size": d.image_size, "channels": d.channels}
    if d.kind == "lesanet":
        kw.update(labels_json=d.labels_json, terms=list(d.terms) or None)
    if d.kind in ("lesanet", "deeplesion_type"):
        kw["return_box"] = recipe.model.head == "lesanet"
    elif recipe.model.head == "lesanet":
        raise ValueError(f"model.head=lesanet needs lesion boxes: use data.kind lesanet or deeplesion_type, "
                         f"not {d.kind}")
    if d.clahe:
        from dompre.data.downstream import Clahe
        kw["transform"] = Clahe(d.clahe_clip, d.clahe_tiles, color=d.kind == "kvasir")
    ds = build_dataset(d.kind, d.root, **kw)
    splits = make_splits(ds, val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=d.split_seed,
                         folds=d.folds, fold=d.fold, min_val=d.min_val)
    for name in ("train", "test"):
        if not len(splits[name]):
            raise ValueError(f"{d.root}: the {name} split is empty ({len(ds)} usable samples); add data or "
                             f"change data.test_fraction / data.val_fraction")
    return ds, splits


@torch.no_grad()
def _embeddings(model: nn.Module, loader, mean, std) -> np.ndarray:
    """Pre-logits features (N, D) of ``loader`` (LesaNet: its concatenated RoI features)."""
    model.eval()
    out = []
    for batch in loader:
        x = (batch["image"].float() / 255 - mean.to(batch["image"].device)) / std.to(batch["image"].device)
        m = _unwrap(model)
        f = (m.forward_features(x, batch["box"]) if "box" in batch
             else m.forward_head(m.forward_features(x), pre_logits=True))
        out.append(f.flatten(1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def run_finetune(recipe: FinetuneRecipe, out_dir: str | Path | None = None) -> dict:
    """Run one recipe end to end and write its run folder; returns the metrics dict (also ``metrics.json``)."""
    from accelerate import Accelerator

    from dompre.train import downstream_plots as plots
    from safetensors.torch import save_file
    out = Path(out_dir or recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)  # results of an earlier recipe must not outlive a rerun
    save_recipe(recipe, out / "recipe.yaml")
    ds, splits = prepare_data(recipe)
    if recipe.train.strategy == "features":
        res = run_features(recipe, ds, splits)
        val, test, histories, extra = res["val"], res["test"], [], {"feature_dim": res["feature_dim"]}
        init_info, seconds, freeze_info = res["init"], test["seconds"], None
    else:
        accelerator = Accelerator()
        runs = [train_model(recipe, ds, splits, recipe.seed + m, accelerator) for m in range(recipe.model.n_models)]
        mk = (lambda idx: accelerator.prepare(torch.utils.data.DataLoader(
            _View(ds, idx), batch_size=recipe.train.eval_batch_size, num_workers=recipe.data.num_workers)))
        val_dl, test_dl = mk(splits["val"]), mk(splits["test"])
        preds = [(predict(r["model"], val_dl, accelerator, r["mean"], r["std"], ds.task),
                  predict(r["model"], test_dl, accelerator, r["mean"], r["std"], ds.task)) for r in runs]
        val = {"scores": np.mean([p[0]["scores"] for p in preds], 0), "labels": preds[0][0]["labels"]}
        test = {"scores": np.mean([p[1]["scores"] for p in preds], 0), "labels": preds[0][1]["labels"],
                "index": preds[0][1]["index"]}
        seconds = sum(p[1]["seconds"] for p in preds)
        histories = [r["history"] for r in runs]
        init_info, freeze_info, extra = runs[0]["init"], runs[0]["freeze"], {}
        if recipe.train.save_features:
            test["features"] = _embeddings(runs[0]["model"], test_dl, runs[0]["mean"], runs[0]["std"])
        if recipe.train.save_models and accelerator.is_main_process:
            for m, r in enumerate(runs):
                sd = {n: t.detach().cpu().contiguous() for n, t in accelerator.unwrap_model(r["model"]).state_dict().items()}
                save_file(sd, str(out / f"model_{m}.safetensors.tmp"))
                os.replace(out / f"model_{m}.safetensors.tmp", out / f"model_{m}.safetensors")
    parents = None
    if recipe.data.ontology and ds.task == "multilabel":
        from dompre.data.deeplesion import load_ontology
        parents = load_ontology(recipe.data.ontology).parent_indices(ds.label_names)
    ev = evaluate(ds.task, val, test, ds.label_names, parents=parents)
    n_test = len(test["scores"])
    from dompre.train.transfer import convergence
    conv = [convergence(h) for h in histories]
    if conv:
        extra["convergence"] = {"best_epoch": float(np.mean([c["best_epoch"] for c in conv])),
                                "best_val_score": float(np.mean([c["best_val_score"] for c in conv])),
                                "per_model": conv}
    if recipe.train.save_features and "features" in test:
        import io
        buf = io.BytesIO()
        np.savez(buf, features=np.asarray(test["features"], np.float32), labels=test["labels"])
        write_atomic(out / "features.npz", buf.getvalue())
    result = {"task": ds.task, "dataset": recipe.data.kind, "label_names": ds.label_names,
              "n": {s: int(len(v)) for s, v in splits.items()}, "skipped": len(ds.skipped),
              "init": init_info, "strategy": recipe.train.strategy, "freeze_percent": recipe.train.freeze,
              "freeze": freeze_info, "n_models": recipe.model.n_models, "seed": recipe.seed,
              "test": ev["metrics"], "fps": n_test / seconds if seconds > 0 else float("nan"),
              "history": histories, **extra}
    ev["table"].to_csv(out / "per_label.csv")
    np.savez(out / "predictions.npz", scores=test["scores"], labels=test["labels"],
             index=np.asarray(test.get("index", splits["test"])))
    plots.plot_roc(test["scores"], test["labels"], ds.label_names, out / "roc.png")
    if ds.task == "multiclass":
        plots.plot_confusion(np.asarray(ev["metrics"]["confusion_matrix"]), ds.label_names, out / "confusion.png")
    if histories:
        plots.plot_learning_curves(histories, out / "learning_curves.png")
    _write_json(result, out / "metrics.json")
    return result
