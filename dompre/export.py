"""Model checkpoints (the unit training writes) and their export as folders that timm loads by itself.

A *checkpoint* is a folder with ``model.safetensors`` and ``checkpoint.json``::

    {"format": "dompre-checkpoint", "version": 1, "arch": "maknet", "num_classes": 115,
     "label_names": [...], "model_kwargs": {...}, "info": {...}}

``model_kwargs`` are the full constructor arguments (timm's ``get_model_args``: ``in_chans``, ``global_pool``,
``num_classes`` and what ``create_model`` was given); ``info`` holds the facts the model card shows, among them
``preparation`` (how the store's inputs were made, from its manifest: :func:`store_preparation`) and ``metrics``
(:func:`record_metrics`). It works for any timm architecture. An *export* is a folder in timm's Hugging Face
layout (``config.json`` with ``architecture``, ``num_classes``, ``label_names``, ``model_args`` and
``pretrained_cfg``; ``model.safetensors``; ``README.md`` model card; the marker ``.dompre-export``), loaded with::

    import dompre, timm                      # `import dompre` only for MAKNet; not for resnet18 & co.
    model = timm.create_model("local-dir:OUT", pretrained=True)                  # same outputs as the checkpoint
    model = timm.create_model("local-dir:OUT", pretrained=True, num_classes=5)   # new head
    model = timm.create_model("resnet18", pretrained=True, num_classes=0,                 # backbone only
                              pretrained_cfg_overlay=dict(file="OUT/model.safetensors"))
    model = timm.create_model("resnet18", pretrained=True, num_classes=N,                 # with the head
                              pretrained_cfg_overlay=dict(file="OUT/model.safetensors", num_classes=N))

timm's ``PretrainedCfg`` accepts only its own fields, so the CT conventions (HU window, three-slice channels) are
written into ``pretrained_cfg.notes`` (strings) and, machine-readable, into a top-level ``"dompre"`` block of
``config.json`` that timm ignores. Loading never unpickles: weights are safetensors only.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from dompre._io import write_atomic

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_meta", "record_metrics", "store_preparation",
           "run_preparation", "export_timm", "is_export", "WEIGHTS_NAME", "CHECKPOINT_JSON", "EXPORT_MARKER"]

_log = logging.getLogger(__name__)
WEIGHTS_NAME = "model.safetensors"
EXPLAIN_PNG = "explanations.png"
CHECKPOINT_JSON = "checkpoint.json"
EXPORT_MARKER = ".dompre-export"  # in every export: only a folder holding it is replaced by a new export
FORMAT = "dompre-checkpoint"
EXPORT_FORMAT = "dompre-export"
LICENSE = "bsd-3-clause"  # the project's license (Hugging Face identifier)
_RESERVED = ("arch", "label_names", "num_classes", "model_kwargs")
_EXPORT_FILES = {"config.json", WEIGHTS_NAME, "README.md", EXPLAIN_PNG}
# pretrained_cfg fields that describe the weights a model started from (e.g. ImageNet), not the exported ones
_SOURCE_FIELDS = ("paper_ids", "paper_name", "origin_url", "notes", "hf_hub_id", "url", "file", "tag", "license")
SLICES = ("z-1", "z", "z+1")


def _to_json(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, indent=2, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable (numbers, strings, lists, dicts): {e}") from e


def store_preparation(store_dir: str | os.PathLike) -> dict[str, Any] | None:
    """How the inputs of a SliceStore were made, from its manifest: HU window, size, slice convention, stride.

    Returns the ingest recipe's ``prep`` section plus ``source``, ``slices`` (the three channels),
    ``neighbours`` / ``interval_mm`` (DeepLesion stores) and ``store`` (the folder), for ``info['preparation']``;
    None for a store whose manifest records no preparation (not written by ``dompre ingest``).
    """
    from dompre.data.store import read_manifest

    manifest = read_manifest(store_dir)
    desc = manifest.get("info") or {}
    prep = desc.get("prep")
    if not isinstance(prep, dict) or "window" not in prep:
        return None
    out = dict(prep, source=desc.get("source"), slices=list(SLICES), store=str(store_dir),
               image_size=manifest.get("image_size"))
    for key in ("neighbours", "interval_mm"):
        if key in desc:
            out[key] = desc[key]
    return out


def run_preparation(labeled_store: str | os.PathLike, unlabeled_store: str | os.PathLike) -> dict[str, Any]:
    """``info`` entries for a model trained on two stores: ``preparation`` (the labeled store's, which the metrics
    are measured on) and, when the unlabeled store was made otherwise, ``unlabeled_preparation``."""
    labeled, unlabeled = store_preparation(labeled_store), store_preparation(unlabeled_store)
    out: dict[str, Any] = {"preparation": labeled}
    same = ("window", "window_source", "size", "crop", "keep_aspect", "stride", "slice_interval", "neighbours")
    if unlabeled != labeled and (labeled is None or unlabeled is None
                                 or any(labeled.get(k) != unlabeled.get(k) for k in same)):
        out["unlabeled_preparation"] = unlabeled
    return out


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
    from safetensors.torch import save as st_save
    from timm.models import get_model_args
    from timm.utils import unwrap_model

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
        raise ValueError(f"{path}: not valid JSON ({e}); rewrite the checkpoint") from e
    if record.get("format") != FORMAT or "arch" not in record:
        raise ValueError(f"{path}: not a {FORMAT} file (format={record.get('format')!r}); "
                         f"pass a folder written by save_checkpoint")
    return record


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file missing; the checkpoint is incomplete, rewrite it")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: a corrupt or foreign file
        raise ValueError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:160]}); "
                         f"rewrite the checkpoint") from None


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
    import timm

    import dompre.models  # noqa: F401  (registers maknet)

    directory = Path(directory)
    record = read_checkpoint_meta(directory)
    kwargs = {**record.get("model_kwargs", {}), **overrides}
    try:
        model = timm.create_model(record["arch"], pretrained=False, **kwargs)
    except RuntimeError as e:
        raise ValueError(f"{directory / CHECKPOINT_JSON}: cannot build arch {record['arch']!r} ({e}); "
                         f"`import` the package that registers it or fix the arch name") from e
    state = _load_weights(directory / WEIGHTS_NAME)
    new_head = kwargs.get("num_classes") != record.get("num_classes")
    if new_head:
        classifiers = model.pretrained_cfg.get("classifier") or ()
        classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
        state = {k: v for k, v in state.items() if k.rsplit(".", 1)[0] not in classifiers}
    result = model.load_state_dict(state, strict=not new_head)
    if new_head and (result.unexpected_keys or any(k.rsplit(".", 1)[0] not in classifiers
                                                   for k in result.missing_keys)):
        raise ValueError(f"{directory}: weights do not fit {record['arch']} with num_classes="
                         f"{kwargs.get('num_classes')} (missing {result.missing_keys}, unexpected "
                         f"{result.unexpected_keys})")
    model.eval()
    info = dict(record.get("info") or {})
    info.update({k: record.get(k) for k in _RESERVED})
    if not new_head and record.get("label_names"):
        model.pretrained_cfg = dict(model.pretrained_cfg, label_names=tuple(record["label_names"]))
    return model, info


def _data_config(model: nn.Module, info: Mapping[str, Any]) -> dict[str, Any]:
    """Input size (the training size in info, else the store's, else the model's cfg); mean/std when info records
    them (else timm resolves the model's own, fitted to its channels, as ``save_for_hf`` writes them)."""
    in_chans = int(getattr(model, "in_chans", 3))
    prep = info.get("preparation") or {}
    if info.get("input_size"):
        size = tuple(int(v) for v in info["input_size"])
    elif prep.get("size"):
        size = (in_chans, int(prep["size"]), int(prep["size"]))
    else:
        size = (in_chans, *model.pretrained_cfg["input_size"][1:])
    out = dict(input_size=size, crop_pct=1.0, interpolation="bilinear")
    out.update({k: tuple(info[k]) for k in ("mean", "std") if info.get(k)})
    return out


def _hu_window(info: Mapping[str, Any]) -> list[float] | None:
    """The HU window of the inputs: the store's preparation, else an explicit ``info['hu_window']``."""
    window = (info.get("preparation") or {}).get("window") or info.get("hu_window")
    return [float(v) for v in window] if window else None


def _input_note(info: Mapping[str, Any], data_config: Mapping[str, Any]) -> str:
    """One sentence on how an input is made, from the recorded preparation (nothing assumed)."""
    prep = info.get("preparation") or {}
    c, h, w = data_config["input_size"]
    window = _hu_window(info)
    win = f"HU-windowed {window} to [0, 255]" if window else "HU-windowed to [0, 255] (window not recorded)"
    if prep.get("window_source") == "series":
        win = f"HU-windowed to [0, 255] with each series' own DICOM window (else {window})"
    if prep.get("neighbours") == "interval":
        slices = f"three CT slices {prep.get('interval_mm')} mm apart (z-1, z, z+1, interpolated)"
    elif prep.get("slice_interval"):
        slices = f"three consecutive CT slices (z-1, z, z+1) after resampling to {prep['slice_interval']} mm"
    else:
        slices = "three consecutive CT slices (z-1, z, z+1)"
    store = (f", cropped to the body and stored at {prep['size']}x{prep['size']}" if prep.get("crop") else
             f", stored at {prep['size']}x{prep['size']}") if prep.get("size") else ""
    return (f"in_chans={c} are {slices} of one series, each {win}{store}, resized to {h}x{w}, scaled to [0, 1] "
            f"and normalised by mean/std")


def _metric_rows(metrics: Mapping[str, Any]) -> list[str]:
    rows = []
    for name, value in metrics.items():
        items = value.items() if isinstance(value, Mapping) else [("", value)]
        for key, v in items:
            label = f"{name} {key}".strip()
            rows.append(f"| {label} | {v:.4f} |" if isinstance(v, float) else f"| {label} | {v} |")
    return rows


def _card(arch: str, model: nn.Module, info: Mapping[str, Any], data_config: Mapping[str, Any],
          card: Mapping[str, Any], load_as: str) -> str:
    """Markdown model card (Hugging Face front matter + sections); every fact comes from ``info``."""
    n_params = sum(p.numel() for p in model.parameters())
    labels = info.get("label_names") or []
    metrics = info.get("metrics") or {}
    prep = info.get("preparation") or {}
    window = _hu_window(info)
    lines = ["---", "library_name: timm", "pipeline_tag: image-classification",
             "tags: [image-classification, timm, medical-imaging, ct, dompre]",
             f"license: {card.get('license', LICENSE)}", "---", "",
             f"# {card.get('title', f'{arch} — dompre CT domain-pretrained backbone')}", "",
             "## Model", f"- Architecture: `{arch}` (timm), {n_params:,} parameters, {model.num_classes} outputs",
             f"- Constructor arguments: `{json.dumps(info.get('model_kwargs') or {}, sort_keys=True)}`",
             f"- Input: {'x'.join(str(v) for v in data_config['input_size'])}; {_input_note(info, data_config)}",
             f"- HU window: {window if window else 'not recorded'}; mean {list(data_config['mean'])}, "
             f"std {list(data_config['std'])}"]
    keys = ("source", "window", "window_source", "size", "crop", "keep_aspect", "stride", "slice_interval",
            "neighbours", "interval_mm", "store")
    if prep:
        lines.append("- Preparation (from the store manifest): "
                     + ", ".join(f"{k}={prep[k]}" for k in keys if k in prep))
    if "unlabeled_preparation" in info:
        other = info["unlabeled_preparation"] or {}
        lines.append("- The unlabeled store was prepared otherwise: "
                     + (", ".join(f"{k}={other[k]}" for k in keys if k in other) or "not recorded"))
    lines += ["", "## Data", str(info.get("data") or card.get("data") or "not recorded"), "",
              "## Training", f"- Noisy Student iteration: {info.get('iteration', 'not recorded')}"]
    for key in ("role", "recipe", "seed", "epochs", "steps"):
        if key in info:
            lines.append(f"- {key}: {info[key]}")
    lines += ["", "## Metrics"]
    lines += ["| metric | value |", "|---|---|", *_metric_rows(metrics)] if metrics else ["none recorded"]
    lines += ["", "## Intended use", card.get("intended_use") or (
        "Research use: an initialisation (backbone) for fine-tuning on CT and other medical imaging tasks, "
        "and slice-level body-part / finding tagging in research pipelines. Not a medical device; not for "
        "diagnosis or treatment decisions."),
        "", "## Limits", card.get("limits") or (
        "Trained on the data above only: expect degraded outputs on other scanners, protocols, reconstruction "
        "kernels, contrast phases, paediatric patients, or inputs not prepared with the HU window and three-slice "
        "convention above. Pseudo-labels carry the teacher's errors. Labels are text-mined and noisy."),
        "", "## Load", "```python", "import timm" + ("\nimport dompre  # registers MAKNet" if
                                                      arch.startswith("maknet") else ""),
        f'model = timm.create_model("{load_as}", pretrained=True)',
        f'backbone = timm.create_model("{load_as}", pretrained=True, num_classes=0)',
        "```"]
    if card.get("explanations"):
        lines += ["", "## Explanations", "Integrated gradients on example inputs (top-3 labels with confidences):",
                  "", f"![explanations]({card['explanations']})"]
    if card.get("note"):
        lines += ["", "## Note", str(card["note"])]
    if labels:
        lines += ["", f"## Labels ({len(labels)})", ", ".join(labels)]
    return "\n".join(lines) + "\n"


def _write_export(model: nn.Module, folder: Path, arch: str, info: Mapping[str, Any],
                  card: Mapping[str, Any], explain_images: Any = None, load_as: str | None = None) -> None:
    """config.json + model.safetensors (timm's public ``save_for_hf``), README.md and the export marker."""
    from timm.models import save_for_hf

    if explain_images is not None and len(explain_images):
        from dompre.explain import explain_montage

        label_names = info.get("label_names") or [f"class {i}" for i in range(model.num_classes)]
        explain_montage(model, explain_images, label_names, folder / EXPLAIN_PNG, method="ig")
        card = {**card, "explanations": EXPLAIN_PNG}

    data_config = _data_config(model, info)
    hu_window = _hu_window(info)
    note = _input_note(info, data_config)
    label_names = info.get("label_names")
    # the registry cfg of a non-MAKNet arch describes its ImageNet weights (papers, origin, license): not these;
    # MAKNet's (written by dompre) keeps its paper name
    drop = _SOURCE_FIELDS if not arch.startswith("maknet") else ("notes", "license", "tag")
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in drop}
    notes = (note, f"hu_window={hu_window}" if hu_window else "hu_window not recorded")
    model_config: dict[str, Any] = dict(pretrained_cfg=dict(
        tag="dompre", license=card.get("license", LICENSE), notes=notes,
        description=card.get("title", f"dompre CT domain-pretrained {arch}")))
    if label_names:
        model_config["label_names"] = list(label_names)
    model_config["dompre"] = dict(format=EXPORT_FORMAT, version=2, hu_window=hu_window, slices=list(SLICES),
                                  slice_note=note, preparation=info.get("preparation"),
                                  checkpoint_info={k: v for k, v in info.items() if k != "label_names"})
    save_for_hf(model, str(folder), model_config=model_config, model_args=info.get("model_kwargs") or None,
                safe_serialization=True, data_config=data_config)
    data_config = json.loads((folder / "config.json").read_text())["pretrained_cfg"]  # as timm resolved it
    (folder / "README.md").write_text(_card(arch, model, info, data_config, card,
                                            load_as or "local-dir:PATH/TO/THIS/FOLDER"))
    (folder / EXPORT_MARKER).write_text(json.dumps(dict(format=EXPORT_FORMAT, version=2, arch=arch)) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _check_export(model: nn.Module, folder: Path) -> float:
    """Load ``folder`` the way a user would and return the max |difference| of outputs on a random input."""
    import timm

    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    size = json.loads((folder / "config.json").read_text())["pretrained_cfg"]["input_size"]
    x = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((loaded(x) - model(x)).abs().max())


def is_export(folder: str | os.PathLike) -> bool:
    """True for a folder written by :func:`export_timm`: it holds the marker, or (exports made before the marker)
    only export files and a config.json with a ``dompre`` block, so replacing it deletes nothing else."""
    folder = Path(folder)
    if (folder / EXPORT_MARKER).is_file():
        return True
    names = {p.name for p in folder.iterdir()}
    if "config.json" not in names or not names <= _EXPORT_FILES:
        return False
    try:
        return isinstance(json.loads((folder / "config.json").read_text()).get("dompre"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def export_timm(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                card: Mapping[str, Any] | str | None = None, check: bool = True,
                explain_images: Any = None, overwrite: bool = False,
                hub_repo: str | None = None) -> dict[str, Any]:
    """Export a checkpoint as a timm folder: ``config.json``, ``model.safetensors``, ``README.md``, marker.

    The folder is written next to ``out_dir`` under a temporary name, checked (``check``: timm loads it and gives
    the same outputs), then renamed into place. An earlier export at ``out_dir`` is replaced; any other non-empty
    folder is refused unless ``overwrite``.

    Args:
        checkpoint_dir: folder written by ``save_checkpoint``.
        out_dir: export folder (new, empty, or an earlier export).
        card: model-card fields overriding the checkpoint's info: ``note``, ``data``, ``intended_use``,
            ``limits``, ``title``, ``license``; a string is taken as ``note``.
        check: reload with ``timm.create_model('local-dir:...')`` and compare outputs before publishing.
        explain_images: a few uint8 ``(N, 3, H, W)`` inputs; their integrated-gradient montage goes into the
            folder as ``explanations.png`` and is shown in the model card.
        overwrite: replace ``out_dir`` even when it is not a dompre export (its contents are deleted).
        hub_repo: ``"owner/name"``: write the Hub layout, exactly the files ``timm.models.push_to_hf_hub``
            uploads with safetensors weights (config.json, model.safetensors, README.md, plus the hidden marker;
            no explanation montage), with the card's load lines naming ``hf-hub:owner/name``.

    Returns:
        ``{"out_dir", "arch", "num_classes", "params", "max_abs_diff"}`` (``max_abs_diff`` None without check).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a folder; choose a new folder for the export")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_export(out_dir) and not overwrite:
        raise ValueError(f"{out_dir}: holds files and is not a dompre export (no {EXPORT_MARKER}); choose a new or "
                         f"empty folder, or pass --overwrite to delete its contents")
    if hub_repo is not None and (hub_repo.count("/") != 1 or not all(hub_repo.split("/"))):
        raise ValueError(f"hub repo {hub_repo!r}: give it as OWNER/NAME")
    card = {"note": card} if isinstance(card, str) else dict(card or {})
    model, info = load_checkpoint(checkpoint_dir)
    arch = info["arch"]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        _write_export(model, tmp, arch, info, card, None if hub_repo else explain_images,
                      f"hf-hub:{hub_repo}" if hub_repo else None)
        diff = _check_export(model, tmp) if check else None
        if diff is not None and diff > 1e-5:
            raise ValueError(f"{out_dir}: the exported model gives different outputs (max |diff| {diff:.3g}); "
                             f"arch {arch!r} may not rebuild from its config, export not written")
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dict(out_dir=str(out_dir), arch=arch, num_classes=model.num_classes,
                params=sum(p.numel() for p in model.parameters()), max_abs_diff=diff)
