"""What ``dompre explain`` reads: a model folder and the inputs to explain.

MODEL is a checkpoint folder (``checkpoint.json`` + ``model.safetensors``, read with
:func:`dompre.checkpoint.load_checkpoint`) or a timm export folder (``config.json``, read with
``timm.create_model('local-dir:...')``). INPUTS are SliceStore items (``STORE_DIR:INDEX``, ``STORE_DIR:3,7,9``,
``STORE_DIR:10-19``), one slice of a DICOM series (``SERIES_DIR@SLICE``, 0-based index in z order; the stack is
slices SLICE-1, SLICE, SLICE+1 made by ingest's own :func:`dompre.data.prep.prepare_volume` with the preparation
the model's training store recorded, so it is the very array ``dompre ingest`` stored for that stack) or 8-bit
image files (PNG/JPEG).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import timm
from PIL import Image
from torch import nn

from dompre.checkpoint import load_checkpoint
from dompre.data.dicom import read_series
from dompre.data.prep import PrepConfig, prepare_volume
from dompre.data.store import SliceStore
from dompre.errors import UserError
from dompre.explain.attribution import Activation
from dompre.explain.perturb import Box

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


@dataclass
class LoadedModel:
    """A classifier with what explaining it needs: label names, confidence activation and input size."""

    model: nn.Module
    label_names: list[str]
    activation: Activation
    input_size: tuple[int, int]  # (H, W) the model was trained on; image files are resized to it
    mean: tuple[float, ...]  # input normalisation (0..1 units), as training applied it
    std: tuple[float, ...]
    source: str
    prep: PrepConfig = field(default_factory=PrepConfig)  # how DICOM inputs are made: the training store's


@dataclass
class InputItem:
    """One input to explain: a display name, the uint8 ``(3, H, W)`` image, reference labels and a region."""

    name: str
    image: np.ndarray
    truth: np.ndarray | None = None  # float (L,) in the model's label order: 1, 0, NaN = unknown
    box: Box | None = None  # region of interest (x1, y1, x2, y2) in image pixels, e.g. the lesion box


def _activation(*sources: dict[str, Any]) -> Activation:
    """``softmax`` when a config says single-label (``multi_label: false`` or ``task: multiclass``), else sigmoid."""
    for src in sources:
        if isinstance(src, dict) and "multi_label" in src:
            return "sigmoid" if src["multi_label"] else "softmax"
        if isinstance(src, dict) and src.get("task") in ("multiclass", "multilabel"):
            return "softmax" if src["task"] == "multiclass" else "sigmoid"
    return "sigmoid"


def prep_config(preparation: Mapping[str, Any] | None) -> PrepConfig:
    """The :class:`PrepConfig` a store was ingested with, from its recorded preparation (``info['preparation']``
    of a checkpoint, ``config.json['dompre']['preparation']`` of an export); the defaults when none is recorded.
    Only the fields of a 3-slice stack are taken: ``slice_interval`` resampling and ``min_slices`` concern a
    whole series, and SLICE indexes the series as read."""
    prep = dict(preparation or {})
    keep = {f.name for f in dataclasses.fields(PrepConfig)} - {"slice_interval", "min_slices"}
    kwargs = {k: v for k, v in prep.items() if k in keep}
    if "window" in kwargs:
        kwargs["window"] = tuple(float(v) for v in kwargs["window"])
    return PrepConfig(**kwargs)


def load_model(path: str | Path, activation: Activation | None = None) -> LoadedModel:
    """Load a checkpoint folder or a timm export folder for explaining.

    MAKNet folders load because importing any ``dompre`` module registers MAKNet with timm (``dompre/__init__``).

    Args:
        path: the folder.
        activation: force ``"sigmoid"`` or ``"softmax"``; default: from the folder's ``multi_label`` key, else sigmoid.

    Raises:
        FileNotFoundError: the folder holds neither ``checkpoint.json`` nor ``config.json``.
    """
    path = Path(path)
    if (path / "checkpoint.json").is_file():
        model, info = load_checkpoint(path)
        names = list(info.get("label_names") or [])
        act = activation or _activation(info)
        preparation = info.get("preparation")
        size = tuple(info.get("input_size") or (3, *[(preparation or {}).get("size") or 256] * 2))[-2:]  # as export
        norm = info
        source = "checkpoint"
    elif (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        model = timm.create_model(f"local-dir:{path}", pretrained=True)
        pcfg = cfg.get("pretrained_cfg") or {}
        names = list(cfg.get("label_names") or pcfg.get("label_names") or [])
        act = activation or _activation(cfg, cfg.get("dompre") or {}, pcfg)
        preparation = (cfg.get("dompre") or {}).get("preparation")
        size = tuple(pcfg.get("input_size") or (3, 256, 256))[-2:]
        norm = pcfg
        source = "export"
    else:
        raise FileNotFoundError(f"{path} is not a model folder: it has no checkpoint.json (from training / "
                                f"dompre.checkpoint.save_checkpoint) and no config.json (from dompre export)")
    model.eval()
    n = int(getattr(model, "num_classes", len(names)))
    if len(names) != n:
        log.warning("%s: %d label names for %d outputs; using label_<i>", path, len(names), n)
        names = [f"label_{i}" for i in range(n)]
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(norm.get("mean") or cfg.get("mean") or (0.485, 0.456, 0.406))
    std = tuple(norm.get("std") or cfg.get("std") or (0.229, 0.224, 0.225))
    return LoadedModel(model, names, act, (int(size[0]), int(size[1])), mean, std, source,
                       prep_config(preparation))


def _store_item(store: SliceStore, i: int, store_dir: str, label_names: Sequence[str]) -> InputItem:
    """One SliceStore item with its labels mapped onto the model's label order and its lesion box."""
    image = np.asarray(store[i])
    truth = None
    row = store.item_labels(i)  # one item's labels, not the store's whole matrix
    if row is not None and store.label_names:
        col = {n: j for j, n in enumerate(store.label_names)}
        truth = np.array([row[col[n]] if n in col else np.nan for n in label_names], dtype=np.float32)
        if np.isnan(truth).all():
            truth = None
    box = parse_box(store.item_meta(i).get("bbox"))  # one item's metadata, not the store's whole table
    return InputItem(f"{Path(store_dir).name}:{i}", image, truth, box)


def parse_box(value: Any) -> Box | None:
    """A box ``(x1, y1, x2, y2)`` from a store cell (sequence or ``"x1,y1,x2,y2"`` text); None if empty."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,\s]+", value.strip(" []()")) if p]
        if not parts:
            return None
        value = [float(p) for p in parts]
    vals = np.asarray(value, dtype=float).ravel()
    if vals.size != 4 or not np.isfinite(vals).all() or vals[2] <= vals[0] or vals[3] <= vals[1]:
        return None
    return tuple(float(v) for v in vals)


def _indices(text: str) -> list[int]:
    """``"3"``, ``"3,7,9"`` or ``"10-19"`` (inclusive) -> indices."""
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    return out


def _image_file(path: Path, size: tuple[int, int]) -> np.ndarray:
    """An 8-bit gray or colour image file -> uint8 (3, H, W) at the model's input size."""
    with Image.open(path) as im:
        if im.mode in ("I", "I;16", "I;16B", "F"):
            raise UserError(f"{path} is a {im.mode} (16-bit or float) image; HU slices need windowing: "
                             f"ingest them into a SliceStore (dompre ingest deeplesion) and explain STORE:INDEX")
        im = im.convert("RGB")
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BILINEAR)
        return np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1))


def _dicom_stack(series: Path, index: int, cfg: PrepConfig) -> np.ndarray:
    """Slices index-1..index+1 (clamped at the ends) of a DICOM series as ONE input, made exactly as ingest makes
    each of its inputs: :func:`dompre.data.prep.prepare_volume` on the stored values with their rescale (no HU
    volume is made), here on those three slices only."""
    vol = read_series(series)
    n = vol.stored.shape[0]
    if not 0 <= index < n:
        raise UserError(f"{series}@{index}: slice index out of range; the series has slices 0..{n - 1}")
    rows = [max(0, index - 1), index, min(n - 1, index + 1)]
    one = dataclasses.replace(cfg, slice_interval=None, stride=3)  # three slices -> exactly one stack
    stacks, _ = prepare_volume(vol.stored[rows], vol.spacing, one, window=vol.meta["window"],
                               rescale=(vol.slope[rows], vol.intercept[rows]))
    return stacks[0]


def parse_inputs(specs: Sequence[str], label_names: Sequence[str], input_size: tuple[int, int] = (256, 256),
                 prep: PrepConfig | None = None) -> tuple[list[InputItem], list[tuple[str, str]]]:
    """Read every input spec; a bad one is skipped and reported, the rest go on.

    Args:
        specs: ``STORE_DIR:INDEX`` (or ``:3,7,9``, ``:10-19``), ``SERIES_DIR@SLICE`` or image files.
        label_names: the model's labels (store labels are mapped onto them).
        input_size: ``(H, W)`` image files are resized to.
        prep: how ``SERIES_DIR@SLICE`` inputs are made (:func:`prep_config` of the model's recorded
            preparation, :attr:`LoadedModel.prep`); default ``PrepConfig()``, ingest's default.

    Returns:
        ``(items, skipped)`` where ``skipped`` holds ``(spec, reason)`` pairs.
    """
    prep = PrepConfig() if prep is None else prep
    items: list[InputItem] = []
    skipped: list[tuple[str, str]] = []
    stores: dict[str, SliceStore] = {}
    for spec in specs:
        try:
            head, sep, tail = spec.rpartition(":")
            dhead, dsep, dtail = spec.rpartition("@")
            if sep and Path(head).is_dir() and re.fullmatch(r"[\d,\-]+", tail):
                if head not in stores:
                    stores[head] = SliceStore(head)
                store = stores[head]
                for i in _indices(tail):
                    if not 0 <= i < len(store):
                        skipped.append((f"{head}:{i}", f"index out of range; the store has items 0..{len(store) - 1}"))
                        continue
                    items.append(_store_item(store, i, head, label_names))
            elif dsep and Path(dhead).exists() and re.fullmatch(r"\d+", dtail):
                items.append(InputItem(f"{Path(dhead).name}@{dtail}", _dicom_stack(Path(dhead), int(dtail), prep)))
            elif Path(spec).is_file() and Path(spec).suffix.lower() in IMAGE_SUFFIXES:
                items.append(InputItem(Path(spec).name, _image_file(Path(spec), input_size)))
            elif Path(spec).exists():
                raise UserError("not an input: use STORE_DIR:INDEX, SERIES_DIR@SLICE or a PNG/JPEG file")
            else:
                raise FileNotFoundError(f"{spec} does not exist")
        except (ValueError, FileNotFoundError, KeyError, OSError) as e:
            log.warning("skipping input %s: %s", spec, e)
            skipped.append((spec, str(e)))
    return items, skipped
