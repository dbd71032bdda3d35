"""Export a checkpoint (:mod:`dompre.checkpoint`) as a folder that timm loads by itself.

An *export* is a folder in timm's Hugging Face layout (``config.json`` with ``architecture``, ``num_classes``,
``label_names``, ``model_args`` and ``pretrained_cfg``; ``model.safetensors``; ``README.md`` model card; the
marker ``.dompre-export``; optionally ``explanations.png``, a montage the caller made), loaded with::

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

Of dompre, this module imports only :mod:`dompre.checkpoint`: it knows nothing of explanations (``dompre export
--explain`` computes the montage with :func:`dompre.explain.explain_montage` and hands its PNG to
:func:`export_timm`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from timm.models import save_for_hf
from torch import nn

from dompre.checkpoint import WEIGHTS_NAME, load_checkpoint
from dompre.data.store import SLICES
from dompre.errors import UserError

__all__ = ["export_timm", "check_export_target", "is_export", "EXPORT_MARKER", "EXPLAIN_PNG"]

EXPLAIN_PNG = "explanations.png"
EXPORT_MARKER = ".dompre-export"  # in every export: only a folder holding it is replaced by a new export
EXPORT_FORMAT = "dompre-export"
LICENSE = "bsd-3-clause"  # the project's license (Hugging Face identifier)
_EXPORT_FILES = {"config.json", WEIGHTS_NAME, "README.md", EXPLAIN_PNG}
# pretrained_cfg fields that describe the weights a model started from (e.g. ImageNet), not the exported ones
_SOURCE_FIELDS = ("paper_ids", "paper_name", "origin_url", "notes", "hf_hub_id", "url", "file", "tag", "license")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
                  card: Mapping[str, Any], montage: bytes | None = None, load_as: str | None = None) -> None:
    """config.json + model.safetensors (timm's public ``save_for_hf``), README.md, the export marker and the
    montage (``explanations.png``, shown in the card) when one is given."""
    if montage:
        (folder / EXPLAIN_PNG).write_bytes(montage)
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


def check_export_target(out_dir: str | os.PathLike, *, overwrite: bool = False, hub_repo: str | None = None
                        ) -> Path:
    """Refuse (ValueError) an ``out_dir`` / ``hub_repo`` that :func:`export_timm` would refuse, before any work.

    ``out_dir`` must be new, an empty folder or an earlier export (any folder with ``overwrite``); ``hub_repo``
    ``"OWNER/NAME"``. Returns ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder; choose a new folder for the export")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_export(out_dir) and not overwrite:
        raise UserError(f"{out_dir}: holds files and is not a dompre export (no {EXPORT_MARKER}); choose a new or "
                         f"empty folder, or pass --overwrite to delete its contents")
    if hub_repo is not None and (hub_repo.count("/") != 1 or not all(hub_repo.split("/"))):
        raise UserError(f"hub repo {hub_repo!r}: give it as OWNER/NAME")
    return out_dir


def export_timm(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                card: Mapping[str, Any] | str | None = None, check: bool = True,
                montage: bytes | None = None, overwrite: bool = False,
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
        montage: PNG bytes of an explanation montage of the checkpoint's model (``dompre export --explain``
            makes it with :func:`dompre.explain.explain_montage`); written as ``explanations.png`` and shown in
            the model card.
        overwrite: replace ``out_dir`` even when it is not a dompre export (its contents are deleted).
        hub_repo: ``"owner/name"``: write the Hub layout, exactly the files ``timm.models.push_to_hf_hub``
            uploads with safetensors weights (config.json, model.safetensors, README.md, plus the hidden marker;
            no explanation montage), with the card's load lines naming ``hf-hub:owner/name``.

    Returns:
        ``{"out_dir", "arch", "num_classes", "params", "max_abs_diff"}`` (``max_abs_diff`` None without check).
    """
    out_dir = check_export_target(out_dir, overwrite=overwrite, hub_repo=hub_repo)
    if montage is not None and bytes(montage[:8]) != _PNG_SIGNATURE:
        raise ValueError("montage: not PNG bytes; pass the file explain_montage wrote, read as bytes")
    card = {"note": card} if isinstance(card, str) else dict(card or {})
    model, info = load_checkpoint(checkpoint_dir)
    arch = info["arch"]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        _write_export(model, tmp, arch, info, card, None if hub_repo else montage,
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
