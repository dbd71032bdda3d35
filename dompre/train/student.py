"""The noised student: noise, pseudo-label targets, mixed labeled + pseudo-labeled batches, the loss task.

A student step takes one labeled batch and one pseudo-labeled batch (``labeled_batch + pseudo_batch`` inputs),
noises both (RandAugment-style rotation, grayscale, auto-contrast, random resized crop; dropout and drop path in
the model), runs the model once on the concatenation and returns a dict of losses, as open_clip's distill task.
Epochs count passes over the labeled training rows; the pseudo-labeled stream runs on across epochs.
"""
from __future__ import annotations

import gc
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from dompre.train.config import PseudoConfig, StudentConfig
from dompre.train.engine import SeededImages, StreamSampler, make_loader
from dompre.train.pseudo_label import PseudoLabels, balance_weights


def noise_transform(cfg: StudentConfig, img_size: int) -> v2.Compose:
    """Input noise on uint8 (3, H, W) tensors; the output is ``img_size`` square."""
    return v2.Compose([
        v2.RandomResizedCrop(img_size, scale=cfg.crop_scale, antialias=True),
        v2.RandomRotation(cfg.rotate_degrees),
        v2.RandomGrayscale(cfg.grayscale_p),
        v2.RandomAutocontrast(cfg.autocontrast_p),
    ])


class PseudoTargets:
    """Dense per-row targets of the unlabeled store from stored top-k and the kept mask (row -> (L,))."""

    def __init__(self, pseudo: PseudoLabels, kept: np.ndarray, soft: bool) -> None:
        self.idx, self.prob, self.kept, self.soft = pseudo.idx, pseudo.prob, kept, soft
        self.num_labels = len(pseudo.label_names)

    def __getitem__(self, row: int) -> np.ndarray:
        out = np.zeros(self.num_labels, dtype=np.float32)
        k = self.kept[row]
        out[self.idx[row][k].astype(np.int64)] = self.prob[row][k].astype(np.float32) if self.soft else 1.0
        return out


def pseudo_rows(pseudo: PseudoLabels, cfg: PseudoConfig, exclusive: np.ndarray | None,
                val_thresholds: np.ndarray | None = None
                ) -> tuple[np.ndarray, PseudoTargets, np.ndarray | None, dict]:
    """Rows of the unlabeled store the student trains on, their targets, sampling weights and a summary.

    ``val_thresholds`` (used when ``cfg.val_thresholds``): the teacher's per-label thresholds from validation;
    a label is then kept above ``max(cfg.threshold, its threshold)``.

    Raises:
        ValueError: no input has a pseudo-label above the threshold.
    """
    threshold = cfg.threshold
    if cfg.val_thresholds and val_thresholds is not None:
        threshold = np.maximum(cfg.threshold, np.asarray(val_thresholds, dtype=np.float32))
    kept = pseudo.kept(threshold, cfg.top_k, exclusive)
    has = kept.any(1)
    rows = np.flatnonzero(has) if cfg.drop_empty else np.arange(len(pseudo))
    if len(rows) == 0:
        raise ValueError(f"{pseudo.folder}: no unlabeled input has a label above pseudo.threshold="
                         f"{cfg.threshold}; lower the threshold or train the teacher longer")
    weights = None
    if cfg.balance:
        weights = balance_weights(pseudo.idx[rows], kept[rows], len(pseudo.label_names))
    counts = np.bincount(pseudo.idx[kept].astype(np.int64), minlength=len(pseudo.label_names))
    summary = {"inputs": int(len(pseudo)), "used": int(len(rows)), "empty": int((~has).sum()),
               "labels_per_input": float(kept.sum(1)[rows].mean()),
               "per_label": {n: int(c) for n, c in zip(pseudo.label_names, counts)}}
    return rows, PseudoTargets(pseudo, kept, cfg.soft), weights, summary


def mix_batches(labeled: dict, pseudo: dict | None) -> dict:
    """Concatenate a labeled and a pseudo-labeled batch: ``image``, ``target`` and the ``is_pseudo`` mask."""
    if pseudo is None:
        return {"image": labeled["image"], "target": labeled["target"],
                "is_pseudo": torch.zeros(len(labeled["image"]), dtype=torch.bool, device=labeled["image"].device)}
    if labeled["target"].shape[1] != pseudo["target"].shape[1]:
        raise ValueError(f"labeled targets have {labeled['target'].shape[1]} labels but pseudo-labels "
                         f"{pseudo['target'].shape[1]}: the pseudo-labels were made for another label set")
    mask = torch.cat([torch.zeros(len(labeled["image"]), dtype=torch.bool),
                      torch.ones(len(pseudo["image"]), dtype=torch.bool)]).to(labeled["image"].device)
    return {"image": torch.cat([labeled["image"], pseudo["image"]]),
            "target": torch.cat([labeled["target"], pseudo["target"]]), "is_pseudo": mask}


class NoisyStudentTask(nn.Module):
    """One forward over a mixed batch -> ``{"loss", "labeled_loss", "pseudo_loss"}``.

    Args:
        model: the student (or, with no pseudo batch, the teacher).
        loss_fn: ``(logits, target) -> scalar`` (e.g. :class:`dompre.train.losses.WeightedFocalLoss`).
        prep: uint8 batch -> model input (:class:`dompre.train.engine.InputPrep`).
        pseudo_weight: weight of the pseudo-labeled loss.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, prep, pseudo_weight: float = 1.0) -> None:
        super().__init__()
        self.model, self.loss_fn, self.prep, self.pseudo_weight = model, loss_fn, prep, pseudo_weight

    def forward(self, labeled: dict, pseudo: dict | None = None) -> dict:
        batch = mix_batches(labeled, pseudo)
        logits = self.model(self.prep(batch["image"]))
        m = batch["is_pseudo"]
        lab = self.loss_fn(logits[~m], batch["target"][~m])
        out = {"labeled_loss": lab, "loss": lab}
        if m.any():
            pse = self.loss_fn(logits[m], batch["target"][m])
            out["pseudo_loss"] = pse
            out["loss"] = lab + self.pseudo_weight * pse
        return out


@dataclass
class StudentData:
    """Samplers and loaders of one training stage (loaders not yet prepared by accelerate)."""
    loaders: list
    samplers: list
    steps_per_epoch: int  # global steps (before splitting over processes)


def build_loaders(labeled_store, train_rows: np.ndarray, labeled_targets, *, labeled_batch: int, seed: int,
                  stage: int, num_workers: int, world: int = 1, transform=None, unlabeled_store=None,
                  pseudo_rows_: np.ndarray | None = None, pseudo_targets=None, pseudo_batch: int = 0,
                  pseudo_weights: np.ndarray | None = None) -> StudentData:
    """Loaders for a stage: labeled only (teacher) or labeled + pseudo-labeled (student), same batch count.

    An epoch is ``max(1, len(train_rows) // labeled_batch)`` global batches, rounded up to a multiple of the
    number of processes; the pseudo stream gives the same number of batches of ``pseudo_batch``.
    """
    if num_workers > 0:
        # forked workers share the parent's pages until a garbage collection writes to the objects' headers;
        # frozen objects are never scanned, so each worker no longer copies the parent's Python heap
        gc.collect()
        gc.freeze()
    steps = max(1, len(train_rows) // labeled_batch)
    steps = math.ceil(steps / world) * world
    lab_sampler = StreamSampler(train_rows, steps * labeled_batch, seed, 2 * stage)
    loaders = [make_loader(SeededImages(labeled_store, labeled_targets, transform), lab_sampler, labeled_batch,
                           num_workers, seed + 2 * stage)]
    samplers = [lab_sampler]
    if pseudo_batch > 0 and pseudo_rows_ is not None:
        ps = StreamSampler(pseudo_rows_, steps * pseudo_batch, seed, 2 * stage + 1, pseudo_weights)
        loaders.append(make_loader(SeededImages(unlabeled_store, pseudo_targets, transform), ps, pseudo_batch,
                                   num_workers, seed + 2 * stage + 1))
        samplers.append(ps)
    return StudentData(loaders, samplers, steps)
