"""The noised student: noise, pseudo-label targets, mixed labeled + pseudo-labeled batches, the loss task.

A student step takes one labeled batch and one pseudo-labeled batch (``labeled_batch + pseudo_batch`` inputs),
noises both (RandAugment-style rotation, grayscale, auto-contrast, random resized crop; dropout and drop path in
the model), runs the model once on the concatenation and returns a dict of losses, as open_clip's distill task.
Epochs count passes over the labeled training rows; the pseudo-labeled stream runs on across epochs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from dompre.errors import UserError
from dompre.train.config import PseudoConfig, StudentConfig
from dompre.train.engine import Items, StreamSampler, epoch_steps, before_workers_fork, make_loader
from dompre.train.pseudo_label import PseudoLabels, balance_weights, select_labels


def noise_transform(cfg: StudentConfig, img_size: int) -> v2.Compose:
    """Input noise on uint8 (3, H, W) tensors; the output is ``img_size`` square."""
    return v2.Compose([
        v2.RandomResizedCrop(img_size, scale=cfg.crop_scale, antialias=True),
        v2.RandomRotation(cfg.rotate_degrees),
        v2.RandomGrayscale(cfg.grayscale_p),
        v2.RandomAutocontrast(cfg.autocontrast_p),
    ])


# ----------------------------------------------------------------- the same noise, applied on the accelerator
NOISE_FIELDS = ("top", "left", "height", "width", "angle", "grayscale", "autocontrast")  # one row per item


def noise_params(transform: v2.Compose, in_size: int, seed: int) -> np.ndarray:
    """float32 (7,) noise of one (3, in_size, in_size) item under ``seed``, in :data:`NOISE_FIELDS` order.

    The draws are the CPU path's own: ``transform``'s torchvision ``make_params`` and apply-coin calls, in its
    order, under the same seeded torch RNG as :class:`~dompre.train.engine.Items`, so both paths give
    an item the same crop, angle and flips (hence the same distributions). Cheap: no pixel is touched.

    Raises:
        ValueError: ``transform`` holds a step the device path cannot apply (then use augment_on: cpu).
    """
    out = np.array([0, 0, in_size, in_size, 0, 0, 0], np.float32)
    probe = torch.empty((3, in_size, in_size), dtype=torch.uint8)  # only its size is read
    kinds = [type(t) for t in transform.transforms]
    order = [v2.RandomResizedCrop, v2.RandomRotation, v2.RandomGrayscale, v2.RandomAutocontrast]
    if not set(kinds) <= set(order) or len(set(kinds)) != len(kinds) or sorted(kinds, key=order.index) != kinds:
        raise UserError(f"train.augment_on=device applies {[k.__name__ for k in order]} in that order; the "
                         f"student's noise is {[k.__name__ for k in kinds]}: use train.augment_on=cpu")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # = torch.manual_seed on the CPU, without its stack capture
        for t in transform.transforms:
            if isinstance(t, v2.RandomResizedCrop):
                p = t.make_params([probe])
                out[:4] = p["top"], p["left"], p["height"], p["width"]
            elif isinstance(t, v2.RandomRotation):
                if t.expand or t.center is not None:
                    raise UserError("train.augment_on=device rotates about the centre without expand; use cpu")
                out[4] = t.make_params([probe])["angle"]
            else:  # RandomGrayscale, RandomAutocontrast: one coin each, as _RandomApplyTransform.forward draws it
                out[5 if isinstance(t, v2.RandomGrayscale) else 6] = float(not torch.rand(1) >= t.p)
    return out


class DeviceNoise:
    """The student's noise on a uint8 batch where it lies (GPU): ``(images (B, 3, H, W), params (B, 7))`` ->
    float (B, 3, S, S) in [0, 255], S = ``img_size``.

    Per-sample crop + rotation is one ``grid_sample`` (bilinear; corners the rotation uncovers are 0, as
    torchvision fills them); grayscale (ITU-R 601-2 weights, torchvision's) and auto-contrast (per-sample,
    per-channel min/max stretch, torchvision's rule) are batched and selected per sample. Pixels differ from
    the CPU path only by interpolation (one bilinear resample instead of an antialiased resize then a
    nearest-neighbour rotation, and no rounding to uint8 between steps); the parameters are the same.
    Why this shape: torchvision v2 transforms draw one parameter set per call (a batch would share one crop),
    and kornia would be a new dependency whose samplers draw their own distributions; drawing with
    torchvision's own ``make_params`` (:func:`noise_params`) and applying with torch ops keeps one definition.
    """

    def __init__(self, img_size: int) -> None:
        self.img_size = int(img_size)

    def __call__(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        x = images.float()
        b, _, h_in, w_in = x.shape
        p = params.to(x.device, torch.float32)
        top, left, h, w, angle, gray, auto = (p[:, i].view(b, 1, 1) for i in range(7))
        lin = (torch.arange(self.img_size, device=x.device, dtype=torch.float32) + 0.5) / self.img_size * 2 - 1
        v, u = torch.meshgrid(lin, lin, indexing="ij")  # output pixel centres in [-1, 1], u along x
        a = torch.deg2rad(angle)
        cu = torch.cos(a) * u - torch.sin(a) * v  # where the rotated output pixel lies in the crop
        cv = torch.sin(a) * u + torch.cos(a) * v
        inside = ((cu.abs() <= 1) & (cv.abs() <= 1)).unsqueeze(1)
        gx = (left + (cu + 1) / 2 * w) / w_in * 2 - 1
        gy = (top + (cv + 1) / 2 * h) / h_in * 2 - 1
        out = F.grid_sample(x, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="border",
                            align_corners=False) * inside
        g = (0.2989 * out[:, 0] + 0.587 * out[:, 1] + 0.114 * out[:, 2]).unsqueeze(1).expand_as(out)
        out = torch.where(gray.view(b, 1, 1, 1) > 0, g, out)
        lo, hi = out.amin((2, 3), keepdim=True), out.amax((2, 3), keepdim=True)
        flat = hi <= lo
        stretched = ((out - torch.where(flat, 0, lo)) * torch.where(flat, 1, 255 / (hi - lo))).clamp(0, 255)
        return torch.where(auto.view(b, 1, 1, 1) > 0, stretched, out)


class SeededNoiseParams(Items):
    """:class:`~dompre.train.engine.Items` for ``augment_on: device``: the loader reads uint8 only and adds each item's noise
    parameters (``"noise"``, float32 (7,)), drawn from the item's seed; :class:`DeviceNoise` applies them."""

    def __init__(self, store, targets, transform: v2.Compose) -> None:
        super().__init__(store, targets, None)
        self.noise = transform

    def __getitem__(self, item: tuple[int, int]) -> dict:
        out = super().__getitem__(item)
        out["noise"] = torch.from_numpy(noise_params(self.noise, self.source.image_size, item[1]))
        return out


class PseudoTargets:
    """Dense per-row targets of the unlabeled store from stored top-k and the rule (row -> (L,)).

    Kept labels are 1 (``soft``: the teacher's probability); the other top-k labels follow ``unkept``
    (``negative``: 0, ``soft``: the teacher's probability, ``ignore``: NaN, which the loss leaves out); labels
    outside the stored top-k are 0. A row's top-k is read from disk and the rule (:func:`select_labels`, which
    decides each input from its own row) applied to it when the row is asked for, so the object holds only the
    rule's settings: a loader worker gets no per-input array.
    """

    def __init__(self, pseudo: PseudoLabels, threshold: float | np.ndarray, top_k: int,
                 exclusive: np.ndarray | None, soft: bool, unkept: str = "negative") -> None:
        if unkept not in ("negative", "soft", "ignore"):
            raise UserError(f"pseudo.unkept={unkept!r}; choose negative, soft or ignore")
        self.pseudo, self.threshold, self.top_k, self.exclusive = pseudo, threshold, int(top_k), exclusive
        self.soft, self.unkept = soft, unkept
        self.num_labels = len(pseudo.label_names)

    def kept(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row ``row``'s stored (K,) label indices (int64), probabilities (float32) and kept mask."""
        idx, prob = self.pseudo.row(row)
        k = select_labels(idx[None], prob[None], self.threshold, self.top_k, self.exclusive)[0]
        return idx.astype(np.int64), prob.astype(np.float32), k

    def __getitem__(self, row: int) -> np.ndarray:
        out = np.zeros(self.num_labels, dtype=np.float32)
        idx, prob, k = self.kept(row)
        if self.unkept == "soft":
            out[idx] = prob
        elif self.unkept == "ignore":
            out[idx] = np.nan
        out[idx[k]] = prob[k] if self.soft else 1.0
        return out


def pseudo_rows(pseudo: PseudoLabels, cfg: PseudoConfig, exclusive: np.ndarray | None,
                val_thresholds: np.ndarray | None = None
                ) -> tuple[np.ndarray, PseudoTargets, np.ndarray | None, dict]:
    """Rows of the unlabeled store the student trains on, their targets, sampling weights and a summary.

    ``val_thresholds`` (used when ``cfg.val_thresholds``): the teacher's per-label thresholds from validation;
    a label is then kept above ``max(cfg.threshold, its threshold)``. One pass over the stored shards, one at
    a time (two with ``cfg.balance``: the weights need every label's count first); what is kept is the rows
    (and weights), not the pseudo-labels or their kept mask.

    Raises:
        ValueError: no input has a pseudo-label above the threshold.
    """
    threshold = cfg.threshold
    if cfg.val_thresholds and val_thresholds is not None:
        threshold = np.maximum(cfg.threshold, np.asarray(val_thresholds, dtype=np.float32))
    n_labels = len(pseudo.label_names)
    counts = np.zeros(n_labels, np.int64)
    has, n_kept = [], 0
    for _, _, idx, prob in pseudo.chunks():
        kept = select_labels(idx, prob, threshold, cfg.top_k, exclusive)
        has.append(kept.any(1))
        counts += np.bincount(idx[kept].astype(np.int64), minlength=n_labels)
        n_kept += int(kept.sum())
    has = np.concatenate(has) if has else np.zeros(0, bool)
    rows = np.flatnonzero(has) if cfg.drop_empty else np.arange(len(pseudo))
    if len(rows) == 0:
        raise UserError(f"{pseudo.folder}: no unlabeled input has a label above pseudo.threshold="
                         f"{cfg.threshold}; lower the threshold or train the teacher longer")
    weights = None
    if cfg.balance:
        parts = []
        for start, end, idx, prob in pseudo.chunks():
            a, b = np.searchsorted(rows, [start, end])  # rows are sorted
            mine = rows[a:b] - start
            kept = select_labels(idx[mine], prob[mine], threshold, cfg.top_k, exclusive)
            parts.append(balance_weights(idx[mine], kept, n_labels, counts))
        weights = np.concatenate(parts)
    summary = {"inputs": int(len(pseudo)), "used": int(len(rows)), "empty": int((~has).sum()),
               "labels_per_input": n_kept / len(rows),
               "per_label": {n: int(c) for n, c in zip(pseudo.label_names, counts)}}
    return rows, PseudoTargets(pseudo, threshold, cfg.top_k, exclusive, cfg.soft, cfg.unkept), weights, summary


def mix_batches(labeled: dict, pseudo: dict | None) -> dict:
    """Concatenate a labeled and a pseudo-labeled batch: ``image``, ``target`` and the ``is_pseudo`` mask."""
    if pseudo is None:
        return {"image": labeled["image"], "target": labeled["target"],
                "is_pseudo": torch.zeros(len(labeled["image"]), dtype=torch.bool, device=labeled["image"].device)}
    if labeled["target"].shape[1] != pseudo["target"].shape[1]:
        raise UserError(f"labeled targets have {labeled['target'].shape[1]} labels but pseudo-labels "
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
        noise: the device noise (``train.augment_on: device``), applied to the mixed batch before ``prep``.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, prep, pseudo_weight: float = 1.0,
                 noise: DeviceNoise | None = None) -> None:
        super().__init__()
        self.model, self.loss_fn, self.prep, self.pseudo_weight = model, loss_fn, prep, pseudo_weight
        self.noise = noise  # augment_on: device: batches carry "noise" parameters, applied here

    def forward(self, labeled: dict, pseudo: dict | None = None) -> dict:
        batch = mix_batches(labeled, pseudo)
        images = batch["image"]
        if self.noise is not None:
            params = labeled["noise"] if pseudo is None else torch.cat([labeled["noise"], pseudo["noise"]])
            images = self.noise(images, params)
        logits = self.model(self.prep(images))
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
    noise: DeviceNoise | None = None  # augment_on: device: the task applies the batches' "noise" parameters


def build_loaders(labeled_store, train_rows: np.ndarray, labeled_targets, *, labeled_batch: int, seed: int,
                  stage: int, num_workers: int, world: int = 1, transform=None, unlabeled_store=None,
                  pseudo_rows_: np.ndarray | None = None, pseudo_targets=None, pseudo_batch: int = 0,
                  pseudo_weights: np.ndarray | None = None, augment_on: str = "cpu") -> StudentData:
    """Loaders for a stage: labeled only (teacher) or labeled + pseudo-labeled (student), same batch count.

    An epoch is ``max(1, len(train_rows) // labeled_batch)`` global batches, rounded up to a multiple of the
    number of processes; the pseudo stream gives the same number of batches of ``pseudo_batch``.
    ``augment_on="device"``: the loaders read uint8 and carry each item's parameters of ``transform``; the
    returned ``noise`` (a :class:`DeviceNoise`) applies them on the accelerator.
    """
    if num_workers > 0:
        before_workers_fork()  # also frees the C heap pages of pseudo_rows' numpy temporaries
    steps = epoch_steps(len(train_rows), labeled_batch, world)
    if augment_on not in ("cpu", "device"):
        raise UserError(f"augment_on={augment_on!r}: choose 'cpu' or 'device'")
    noise = None
    images = Items
    if augment_on == "device" and transform is not None:
        noise_params(transform, labeled_store.image_size, 0)  # refuse a noise it cannot apply, before training
        crop = [t for t in transform.transforms if isinstance(t, v2.RandomResizedCrop)]
        noise = DeviceNoise(crop[0].size[0] if crop else labeled_store.image_size)
        images = SeededNoiseParams
    lab_sampler = StreamSampler(train_rows, steps * labeled_batch, seed, 2 * stage)
    loaders = [make_loader(images(labeled_store, labeled_targets, transform), lab_sampler, labeled_batch,
                           num_workers, seed + 2 * stage)]
    samplers = [lab_sampler]
    if pseudo_batch > 0 and pseudo_rows_ is not None:
        ps = StreamSampler(pseudo_rows_, steps * pseudo_batch, seed, 2 * stage + 1, pseudo_weights)
        loaders.append(make_loader(images(unlabeled_store, pseudo_targets, transform), ps, pseudo_batch,
                                   num_workers, seed + 2 * stage + 1))
        samplers.append(ps)
    return StudentData(loaders, samplers, steps, noise)
