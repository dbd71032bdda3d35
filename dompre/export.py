"""Model checkpoints (the unit training writes) and their export as folders that timm loads by itself.

A *checkpoint* is a folder with ``model.safetensors`` and ``checkpoint.json``::

    {"format": "dompre-checkpoint", "version": 1, "arch": "maknet", "num_classes": 115,
     "label_names": [...], "model_kwargs": {...}, "info": {...}}

It works for any timm architecture. An *export* is a folder in timm's Hugging Face layout (``config.json`` with
``architecture``, ``num_classes``, ``label_names``, ``model_args`` and ``pretrained_cfg``; ``model.safetensors``;
``README.md`` model card), loaded with::

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
from dompre.models.maknet import CT_HU_WINDOW, THREE_SLICE_NOTE

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_meta", "export_timm", "WEIGHTS_NAME",
           "CHECKPOINT_JSON"]

_log = logging.getLogger(__name__)
WEIGHTS_NAME = "model.safetensors"
EXPLAIN_PNG = "explanations.png"
CHECKPOINT_JSON = "checkpoint.json"
FORMAT = "dompre-checkpoint"
_RESERVED = ("arch", "label_names", "num_classes", "model_kwargs")
DEFAULT_INPUT_SIZE = (3, 256, 256)


def _to_json(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, indent=2, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable (numbers, strings, lists, dicts): {e}") from e


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (``.module``) / torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def save_checkpoint(model: nn.Module, directory: str | os.PathLike, *, arch: str,
                    label_names: Sequence[str] | None, model_kwargs: Mapping[str, Any] | None = None,
                    info: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` + ``checkpoint.json`` into ``directory`` (each file atomically).

    Args:
        model: a timm model (DDP / compiled wrappers are unwrapped).
        directory: checkpoint folder (created; other files in it are left alone).
        arch: timm model name that rebuilds the model, e.g. ``"maknet"`` or ``"resnet18"``.
        label_names: one name per output (None for a headless backbone).
        model_kwargs: JSON-serialisable kwargs for ``timm.create_model`` besides ``num_classes`` (e.g. in_chans).
        info: JSON-serialisable facts for the model card: ``data``, ``iteration``, ``metrics`` (dict),
            ``hu_window``, ``mean``, ``std``, ``input_size``, ``recipe``, ... (keys ``arch``, ``label_names``,
            ``num_classes``, ``model_kwargs`` are reserved).

    Returns:
        The checkpoint folder.
    """
    from safetensors.torch import save as st_save

    model = _unwrap(model)
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
    kwargs = dict(model_kwargs or {})
    kwargs.pop("pretrained", None)
    kwargs["num_classes"] = num_classes
    record = dict(format=FORMAT, version=1, arch=arch, num_classes=num_classes, label_names=label_names,
                  model_kwargs=kwargs, info=info)
    text = _to_json(record, f"save_checkpoint({directory}): model_kwargs and info")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    write_atomic(directory / WEIGHTS_NAME, st_save(tensors, metadata={"format": "pt", "arch": arch}))
    write_atomic(directory / CHECKPOINT_JSON, text.encode())  # last: its presence marks a whole checkpoint
    return directory


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
    """Input size (default 3×256×256, the SliceStore size) and mean/std (from info, else the model's cfg)."""
    cfg = model.pretrained_cfg
    in_chans = int(getattr(model, "in_chans", DEFAULT_INPUT_SIZE[0]))
    size = tuple(info.get("input_size") or (in_chans, *DEFAULT_INPUT_SIZE[1:]))
    mean, std = info.get("mean") or cfg.get("mean"), info.get("std") or cfg.get("std")
    return dict(input_size=size, mean=tuple(mean), std=tuple(std), crop_pct=1.0, interpolation="bilinear")


def _card(arch: str, model: nn.Module, info: Mapping[str, Any], data_config: Mapping[str, Any],
          hu_window: Sequence[float], card: Mapping[str, Any]) -> str:
    """Markdown model card (Hugging Face front matter + sections)."""
    n_params = sum(p.numel() for p in model.parameters())
    labels = info.get("label_names") or []
    metrics = info.get("metrics") or {}
    lines = ["---", "library_name: timm", "tags: [image-classification, timm, medical-imaging, ct, dompre]",
             f"license: {card.get('license', 'apache-2.0')}", "---", "",
             f"# {card.get('title', f'{arch} — dompre CT domain-pretrained backbone')}", "",
             "## Model", f"- Architecture: `{arch}` (timm), {n_params:,} parameters, {model.num_classes} outputs",
             f"- Input: {tuple(data_config['input_size'])}; {THREE_SLICE_NOTE}",
             f"- HU window: {list(hu_window)}; mean {list(data_config['mean'])}, std {list(data_config['std'])}",
             "", "## Data", str(info.get("data") or card.get("data") or "not recorded"), "",
             "## Training", f"- Noisy Student iteration: {info.get('iteration', 'not recorded')}"]
    for key in ("recipe", "seed", "epochs", "steps"):
        if key in info:
            lines.append(f"- {key}: {info[key]}")
    lines += ["", "## Metrics"]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    else:
        lines.append("none recorded")
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
        'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True)',
        'backbone = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True, num_classes=0)',
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
                  card: Mapping[str, Any], explain_images: Any = None) -> None:
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    if explain_images is not None and len(explain_images):
        from dompre.explain import explain_montage

        label_names = info.get("label_names") or [f"class {i}" for i in range(model.num_classes)]
        explain_montage(model, explain_images, label_names, folder / EXPLAIN_PNG, method="ig")
        card = {**card, "explanations": EXPLAIN_PNG}

    data_config = _data_config(model, info)
    hu_window = list(info.get("hu_window") or CT_HU_WINDOW)
    notes = (THREE_SLICE_NOTE, f"hu_window={hu_window}")
    label_names = info.get("label_names")
    model_config: dict[str, Any] = dict(pretrained_cfg=dict(tag="dompre", notes=notes, description=card.get(
        "title", f"dompre CT domain-pretrained {arch}")))
    if label_names:
        model_config["label_names"] = list(label_names)
    model_config["dompre"] = dict(hu_window=hu_window, slices=["z-1", "z", "z+1"], slice_note=THREE_SLICE_NOTE,
                                  checkpoint_info={k: v for k, v in info.items() if k not in ("label_names",)})
    save_config_for_hf(model, str(folder / "config.json"), model_config=model_config, data_config=data_config)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / "README.md").write_text(_card(arch, model, info, data_config, hu_window, card))
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


def export_timm(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                card: Mapping[str, Any] | str | None = None, check: bool = True,
                explain_images: Any = None) -> dict[str, Any]:
    """Export a checkpoint as a timm folder: ``config.json``, ``model.safetensors``, ``README.md``.

    The folder is written next to ``out_dir`` under a temporary name, checked (``check``: timm loads it and gives
    the same outputs), then renamed into place; an earlier export at ``out_dir`` is replaced.

    Args:
        checkpoint_dir: folder written by ``save_checkpoint``.
        out_dir: export folder (new, empty, or an earlier export).
        card: model-card fields overriding the checkpoint's info: ``note``, ``data``, ``intended_use``,
            ``limits``, ``title``, ``license``; a string is taken as ``note``.
        check: reload with ``timm.create_model('local-dir:...')`` and compare outputs before publishing.
        explain_images: a few uint8 ``(N, 3, H, W)`` inputs; their integrated-gradient montage goes into the
            folder as ``explanations.png`` and is shown in the model card.

    Returns:
        ``{"out_dir", "arch", "num_classes", "params", "max_abs_diff"}`` (``max_abs_diff`` None without check).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise ValueError(f"{out_dir}: exists and is not a timm export; choose a new or empty folder")
    card = {"note": card} if isinstance(card, str) else dict(card or {})
    model, info = load_checkpoint(checkpoint_dir)
    arch = info["arch"]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        _write_export(model, tmp, arch, info, card, explain_images)
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
