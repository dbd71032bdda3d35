"""Model checkpoints, the unit training writes, and the one reader of weight files.

A *checkpoint* is a folder with ``model.safetensors`` and ``checkpoint.json``::

    {"format": "dompre-checkpoint", "version": 1, "arch": "maknet", "num_classes": 115,
     "label_names": [...], "model_kwargs": {...}, "info": {...}}

``model_kwargs`` are the full constructor arguments (timm's ``get_model_args``: ``in_chans``, ``global_pool``,
``num_classes`` and what ``create_model`` was given); ``info`` holds the facts a model card shows, among them
``preparation`` (how the store's inputs were made, from its manifest: :func:`store_preparation`) and ``metrics``
(:func:`record_metrics`). It works for any timm architecture; :mod:`dompre.export` turns one into a folder timm
loads by itself. Loading never unpickles a checkpoint: its weights are safetensors only.

:func:`read_weights` reads any weights file (safetensors, or a torch file with ``weights_only=True``) and
:func:`unwrap_state_dict` takes the tensors out of however training code saved them; the checkpoint loader,
``model.init=file`` fine-tuning and MAKNet's timm ``pretrained_filter_fn`` all go through them.

The architectures a checkpoint names must be registered with timm before :func:`load_checkpoint`; MAKNet's are,
by ``dompre/__init__``, which runs before any ``dompre.*`` module (this one does not import ``dompre.models``,
whose MAKNet filter imports this module).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import timm
import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from timm.models import clean_state_dict, get_model_args
from timm.utils import unwrap_model
from torch import nn

from dompre._io import write_atomic
from dompre.errors import UserError

__all__ = ["CHECKPOINT_JSON", "WEIGHTS_NAME", "load_checkpoint", "model_kwargs", "read_checkpoint_meta", "read_weights",
           "record_metrics", "save_checkpoint", "save_stage_checkpoint", "unwrap_state_dict"]

WEIGHTS_NAME = "model.safetensors"
CHECKPOINT_JSON = "checkpoint.json"
FORMAT = "dompre-checkpoint"
_RESERVED = ("arch", "label_names", "num_classes", "model_kwargs")  # checkpoint.json fields, not info keys
_CONTAINERS = ("state_dict", "model", "model_state_dict")  # keys training code nests a state dict under


def _to_json(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, indent=2, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable (numbers, strings, lists, dicts): {e}") from e


def model_kwargs(model: nn.Module) -> dict[str, Any]:
    """The constructor keywords a checkpoint needs to rebuild ``model`` (beside its arch)."""
    return {"num_classes": int(model.num_classes)}


def save_stage_checkpoint(model: nn.Module, stage: str | os.PathLike, *, arch: str, label_names: Sequence[str],
                          info: Mapping[str, Any]) -> Path:
    """A finished training stage's ``stage/checkpoint`` folder, written whole (into ``checkpoint.tmp``, then
    renamed), then the stage's resume state ``stage/state`` removed. Call it on the main process only."""
    stage = Path(stage)
    tmp, final = stage / "checkpoint.tmp", stage / "checkpoint"
    shutil.rmtree(tmp, ignore_errors=True)
    card = {k: v for k, v in info.items() if k not in _RESERVED}
    save_checkpoint(model, tmp, arch=arch, label_names=label_names, model_kwargs=model_kwargs(model), info=card)
    os.replace(tmp, final)
    shutil.rmtree(stage / "state", ignore_errors=True)
    return final


def save_checkpoint(model: nn.Module, directory: str | os.PathLike, *, arch: str,
                    label_names: Sequence[str] | None, model_kwargs: Mapping[str, Any] | None = None,
                    info: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` + ``checkpoint.json`` into ``directory`` (each file atomically).

    Args:
        model: a timm model (DDP / compiled / EMA wrappers are unwrapped with timm's ``unwrap_model``).
        directory: checkpoint folder (created; other files in it are left alone).
        arch: timm model name that rebuilds the model, e.g. ``"maknet"`` or ``"resnet18"``.
        label_names: one name per output (None for a headless backbone).
        model_kwargs: JSON-serialisable kwargs for ``timm.create_model`` on top of the model's own constructor
            arguments (timm's ``get_model_args``: ``in_chans``, ``global_pool``, ``num_classes`` and what
            ``create_model`` was given; drop rates are training-only and left out unless given here).
        info: JSON-serialisable facts for the model card: ``data``, ``iteration``, ``metrics`` (dict, or one dict
            per evaluation set), ``preparation`` (:func:`store_preparation`), ``mean``, ``std``, ``input_size``,
            ``recipe``, ... (keys ``arch``, ``label_names``, ``num_classes``, ``model_kwargs`` are reserved).

    Returns:
        The checkpoint folder.
    """
    model = unwrap_model(model)
    directory = Path(directory)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if label_names is not None:
        label_names = [str(n) for n in label_names]
        if len(label_names) != num_classes:
            raise ValueError(f"save_checkpoint({directory}): {len(label_names)} label_names for a model with "
                             f"num_classes={num_classes}; pass one name per output or label_names=None")
    info = dict(info or {})
    clash = sorted(set(info) & set(_RESERVED))
    if clash:
        raise ValueError(f"save_checkpoint({directory}): info keys {clash} are reserved; pass them as arguments")
    kwargs = {**get_model_args(model), **(model_kwargs or {})}
    for runtime in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"):
        kwargs.pop(runtime, None)
    kwargs["num_classes"] = num_classes
    record = dict(format=FORMAT, version=1, arch=arch, num_classes=num_classes, label_names=label_names,
                  model_kwargs=kwargs, info=info)
    text = _to_json(record, f"save_checkpoint({directory}): model_kwargs and info")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    write_atomic(directory / WEIGHTS_NAME, st_save(tensors, metadata={"format": "pt", "arch": arch}))
    write_atomic(directory / CHECKPOINT_JSON, text.encode())  # last: its presence marks a whole checkpoint
    return directory


def record_metrics(directory: str | os.PathLike, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Add measured metrics to a checkpoint's ``info['metrics']`` (checkpoint.json rewritten atomically).

    ``metrics`` is either flat (``{"auc": 0.81}``) or one dict per evaluation set (``{"test": {"auc": ...}}``,
    as ``dompre.train.evaluate`` writes); only numbers, strings and None are kept (per-label tables and thresholds
    stay in the run folder). Returns the metrics recorded.
    """
    def scalars(d: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if v is None or isinstance(v, (int, float, str))}

    kept = {k: scalars(v) for k, v in metrics.items() if isinstance(v, Mapping) and not k.endswith("_per_label")}
    kept.update(scalars(metrics))
    kept.pop("thresholds", None)
    record = read_checkpoint_meta(directory)
    record["info"] = {**(record.get("info") or {}), "metrics": kept}
    write_atomic(Path(directory) / CHECKPOINT_JSON,
                 _to_json(record, f"record_metrics({directory})").encode())
    return kept


def read_checkpoint_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``checkpoint.json`` of a checkpoint folder (FileNotFoundError / ValueError name the fix)."""
    path = Path(directory) / CHECKPOINT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint here; pass a folder written by save_checkpoint "
                                f"(model.safetensors + {CHECKPOINT_JSON})")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); rewrite the checkpoint") from e
    if record.get("format") != FORMAT or "arch" not in record:
        raise UserError(f"{path}: not a {FORMAT} file (format={record.get('format')!r}); "
                         f"pass a folder written by save_checkpoint")
    return record


def unwrap_state_dict(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a state dict however it was saved: taken out of ``{"state_dict" | "model" |
    "model_state_dict": ...}`` containers (nested ones too, in any order), DDP ``module.`` / torch.compile
    ``_orig_mod.`` prefixes stripped (timm's ``clean_state_dict``), entries that are not tensors (epoch, optimizer
    state ...) dropped."""
    while (inner := next((state[k] for k in _CONTAINERS if isinstance(state.get(k), Mapping)), None)) is not None:
        state = inner
    return {k: v for k, v in clean_state_dict(dict(state)).items() if isinstance(v, torch.Tensor)}


def read_weights(path: str | os.PathLike, *, fix: str = "pass a safetensors file or a torch state dict"
                 ) -> dict[str, torch.Tensor]:
    """The unwrapped state dict (:func:`unwrap_state_dict`) of a weights file, on the CPU.

    ``.safetensors`` files are read with safetensors, anything else with ``torch.load(weights_only=True)``, so
    nothing in the file runs. ``fix`` ends the error messages: what the caller should do about a bad file.

    Raises:
        FileNotFoundError: no such file. ValueError: a corrupt or foreign file, a pickle that needs more than
            tensors, or one that holds no state dict (each names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file missing; {fix}")
    try:
        state = (load_file(str(path), device="cpu") if path.suffix == ".safetensors"
                 else torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - SafetensorError, UnpicklingError and friends: a corrupt or foreign file
        raise UserError(f"{path}: not a loadable weights file ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:160]}); {fix}") from None
    if not isinstance(state, Mapping):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a state dict; {fix}")
    return unwrap_state_dict(state)


def load_checkpoint(directory: str | os.PathLike, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the timm model of a checkpoint and load its weights strictly (no unpickling).

    Args:
        directory: checkpoint folder.
        **overrides: ``timm.create_model`` kwargs replacing the stored ones (e.g. ``drop_rate``). A different
            ``num_classes`` gets a freshly initialised classifier (the model's ``pretrained_cfg['classifier']``
            layers); every other weight must still match.

    Returns:
        ``(model in eval mode, info)`` where ``info`` is the ``info`` given to ``save_checkpoint`` plus ``arch``,
        ``label_names``, ``num_classes`` and ``model_kwargs``.
    """
    directory = Path(directory)
    record = read_checkpoint_meta(directory)
    kwargs = {**record.get("model_kwargs", {}), **overrides}
    try:
        model = timm.create_model(record["arch"], pretrained=False, **kwargs)
    except RuntimeError as e:
        raise UserError(f"{directory / CHECKPOINT_JSON}: cannot build arch {record['arch']!r} ({e}); "
                         f"`import` the package that registers it or fix the arch name") from e
    state = read_weights(directory / WEIGHTS_NAME, fix="the checkpoint is incomplete or damaged: rewrite it")
    new_head = kwargs.get("num_classes") != record.get("num_classes")
    if new_head:
        classifiers = model.pretrained_cfg.get("classifier") or ()
        classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
        state = {k: v for k, v in state.items() if k.rsplit(".", 1)[0] not in classifiers}
    result = model.load_state_dict(state, strict=not new_head)
    if new_head and (result.unexpected_keys or any(k.rsplit(".", 1)[0] not in classifiers
                                                   for k in result.missing_keys)):
        raise UserError(f"{directory}: weights do not fit {record['arch']} with num_classes="
                         f"{kwargs.get('num_classes')} (missing {result.missing_keys}, unexpected "
                         f"{result.unexpected_keys})")
    model.eval()
    info = dict(record.get("info") or {})
    info.update({k: record.get(k) for k in _RESERVED})
    if not new_head and record.get("label_names"):
        model.pretrained_cfg = dict(model.pretrained_cfg, label_names=tuple(record["label_names"]))
    return model, info
