"""Transfer options around the fine-tuning loop: ImageNet and mean/variance inits, a named freezing cut-off,
classification-block regularisation and convergence speed.

- :func:`check_imagenet_weights`: ``model.init=imagenet`` loads timm's pretrained weights (``pretrained=True``).
  Before anything is built, the weights are looked up in the local cache (Hugging Face hub or torch hub); when
  missing they are downloaded into it then, by huggingface_hub itself (no probe of our own); offline
  (``HF_HUB_OFFLINE``) or when the download fails it stops with one line that says how to get them (or to use
  ``init=file``), instead of timm's minute of retries and traceback.
- :func:`meanvar_redraw`: ``model.init=meanvar`` (Kierzynka 2019's control for the "feature-independent benefit of
  transfer"): every parameter tensor of every layer is redrawn from a normal distribution with the mean and
  standard deviation of the pretrained tensor; the scaling of each layer is kept, its features are destroyed.
- :func:`freeze_until`: ``train.freeze_until=<module name>`` (Boit et al.) freezes every parameterised layer
  registered up to and including that module and its children.
- :func:`head_penalty`: ``train.head_l1`` / ``train.head_l2`` (Hicks et al. 2018): ``l1 Σ|w| + l2 Σ w²`` over the
  classification block's parameters, added to the training loss.
- :func:`convergence`: the epoch of the best validation score of a run's history.
"""
from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import huggingface_hub as hf
import huggingface_hub.errors as hf_errors
from huggingface_hub import constants as hf_constants
import numpy as np
import timm
import torch
import torch.nn as nn
from sklearn.metrics import matthews_corrcoef

from dompre.errors import UnknownName, UserError
from dompre.train.metrics import lesanet_eval

if TYPE_CHECKING:
    from dompre.train.finetune import FinetuneRecipe


# ------------------------------------------------------------------------------------------ imagenet init
def _hub_files(cfg: dict) -> list[str]:
    """The hub files timm's ``pretrained=True`` reads for ``cfg``, in its order (``timm/models/_hub.py``
    ``load_state_dict_from_hf``: a ``.safetensors`` alternative of a ``.bin`` name first)."""
    name = cfg.get("hf_hub_filename") or "pytorch_model.bin"
    if name.endswith(".safetensors"):
        return [name]
    safe = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
    alt = safe.get(name) or (name[:-4] + ".safetensors" if name.endswith(".bin") else None)
    return [n for n in (alt, name) if n]


def _hub_repo(cfg: dict) -> tuple[str, str | None]:
    repo, _, revision = cfg["hf_hub_id"].partition("@")
    return repo, revision or None


def _url_file(cfg: dict) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg["url"].split("?")[0])


def _cached_weights(cfg: dict) -> str | None:
    """Path of the cached pretrained weights of a timm pretrained cfg, or None."""
    if cfg.get("hf_hub_id"):
        repo, revision = _hub_repo(cfg)
        for name in _hub_files(cfg):
            hit = hf.try_to_load_from_cache(repo, name, revision=revision)
            if isinstance(hit, str):
                return hit
    if cfg.get("url") and _url_file(cfg).is_file():
        return str(_url_file(cfg))
    return None


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` set (read now, and as huggingface_hub read it at import)."""
    return (os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
            or bool(hf_constants.HF_HUB_OFFLINE))


def _fetch(cfg: dict, timeout: float) -> str:
    """Download the weights into the cache timm reads, now; returns the file. The first request of the hub path is
    huggingface_hub's own metadata request, made once with ``timeout`` (``hf_hub_download`` alone would retry an
    unreachable hub for a minute when nothing is cached); a file the repository lacks is skipped, as timm skips a
    missing safetensors alternative."""
    if cfg.get("hf_hub_id"):
        missing = getattr(hf_errors, "RemoteEntryNotFoundError", hf_errors.EntryNotFoundError)
        repo, revision = _hub_repo(cfg)
        names = _hub_files(cfg)
        for name in names:
            try:
                hf.get_hf_file_metadata(hf.hf_hub_url(repo, name, revision=revision), timeout=timeout)
            except missing:
                if name == names[-1]:
                    raise
                continue
            return hf.hf_hub_download(repo, name, revision=revision)
    dst = _url_file(cfg)
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # torch.hub's urlopen takes no timeout of its own
    try:
        torch.hub.download_url_to_file(cfg["url"], str(dst), progress=False)
    finally:
        socket.setdefaulttimeout(old)
    return str(dst)


def _no_weights(arch: str, cfg: dict, why: str) -> FileNotFoundError:
    where = cfg.get("hf_hub_id") or cfg.get("url")
    return FileNotFoundError(
        f"model.init=imagenet: the pretrained weights of {arch} ({where}) are not in the local cache and {why}; "
        f"fetch them once on a machine online (python -c \"import timm; timm.create_model('{arch}', "
        f"pretrained=True)\") and copy the cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}), or use "
        f"model.init=file model.weights=FILE")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def check_imagenet_weights(arch: str, timeout: float = 10.0) -> str:
    """Make ``arch``'s pretrained weights available to timm's ``pretrained=True``: ``cache:PATH`` when they are in
    the local cache (Hugging Face hub cache, or torch hub for url-only weights), else ``download:PATH`` after
    downloading them into that cache now, so a study stops before its first cell rather than at its first
    ImageNet cell.

    Raises:
        FileNotFoundError: ``arch`` has no pretrained weights in timm, or they are not cached and ``HF_HUB_OFFLINE``
            is set (at once, no network request), or the download failed (after one request of at most
            ``timeout`` seconds when the hub cannot be reached). One line: how to fetch them, or use
            ``model.init=file``.
    """
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise FileNotFoundError(f"model.init=imagenet: timm has no pretrained weights for model.arch={arch!r}; "
                                f"use model.init=file model.weights=FILE or an architecture with weights")
    cfg = cfg.to_dict()
    hit = _cached_weights(cfg)
    if hit:
        return f"cache:{hit}"
    if _offline():
        raise _no_weights(arch, cfg, "HF_HUB_OFFLINE is set")
    try:
        return f"download:{_fetch(cfg, timeout)}"
    except Exception as e:  # any failure of the download (network, HTTP, disk): one line, no traceback
        raise _no_weights(arch, cfg, f"downloading them failed ({_one_line(e)})") from None


def imagenet_load_error(arch: str, e: BaseException) -> FileNotFoundError | None:
    """The one-line error for an exception timm's ``pretrained=True`` raised while getting ``arch``'s weights from
    the hub or a url (None for any other exception, which keeps its traceback)."""
    http = getattr(hf_errors, "HTTPError", OSError)
    if not isinstance(e, (OSError, http)):
        return None
    cfg = timm.models.get_pretrained_cfg(arch)
    return _no_weights(arch, cfg.to_dict() if cfg else {}, f"loading them failed ({_one_line(e)})")


def check_options(recipe: "FinetuneRecipe") -> None:
    """Stop at once on options that cannot work together (and on ImageNet weights that cannot be had)."""
    t, m = recipe.train, recipe.model
    if t.freeze_until and t.freeze:
        raise UserError(f"train.freeze_until={t.freeze_until!r} and train.freeze={t.freeze:g}: set one of them")
    if t.head_l1 < 0 or t.head_l2 < 0:
        raise UserError("train.head_l1 / train.head_l2 must be >= 0")
    if (t.rhem or t.triplet_weight or t.box_augment) and m.head != "lesanet":
        raise UserError("train.rhem, train.triplet_weight and train.box_augment are LesaNet options: set "
                         "model.head=lesanet (with data.kind lesanet)")
    if t.rhem and recipe.data.kind != "lesanet":
        raise UserError(f"train.rhem mines lesion-label pairs of a multi-label task: use data.kind=lesanet, "
                         f"not {recipe.data.kind}")
    if t.rhem and not recipe.data.ontology:
        raise UserError("train.rhem needs data.ontology (lesion_ontology_181022.xlsx): its exclusive relations give "
                        "RHEM's reliable negatives")
    if t.rhem_weight < 0 or t.rhem_samples < 1 or t.rhem_power < 0:
        raise UserError(f"train.rhem_weight={t.rhem_weight} (>= 0), train.rhem_samples={t.rhem_samples} (>= 1) and "
                        f"train.rhem_power={t.rhem_power} (>= 0)")
    if any(s < 8 for s in t.feature_scales):
        raise UserError(f"train.feature_scales={list(t.feature_scales)}: input sides in pixels (>= 8)")
    if m.init == "imagenet" or (m.init == "meanvar" and not m.weights):
        check_imagenet_weights(m.arch)


# ------------------------------------------------------------------------------------------ meanvar init
@torch.no_grad()
def meanvar_redraw(layers: list[tuple[str, nn.Module]], seed: int) -> dict:
    """Redraw every parameter tensor of ``layers`` as N(mean, std) of its current (pretrained) values.

    Tensors of one element keep their value. Returns the number of tensors and values redrawn.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors = values = 0
    for _, mod in layers:
        for p in mod.parameters(recurse=False):
            if p.numel() < 2:
                continue
            mean, std = p.float().mean(), p.float().std()
            draw = torch.randn(p.shape, generator=gen) * std + mean
            p.copy_(draw.to(p))
            tensors, values = tensors + 1, values + p.numel()
    return {"redrawn_tensors": tensors, "redrawn_values": values}


# ------------------------------------------------------------------------------------------ freezing
def freeze_until(model: nn.Module, name: str, layers: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The layers of ``layers`` (bottom first) registered up to and including module ``name`` and its children.

    ``name`` is a ``model.named_modules()`` name (for LesaNet, of the whole model, e.g.
    ``backbone.features_denseblock2``). Raises KeyError listing valid names when ``name`` is not a module of the
    freezable part (below the classifier).
    """
    names = [n for n, _ in model.named_modules()]
    pos = {n: i for i, n in enumerate(names)}
    last = max((pos[n] for n, _ in layers), default=-1)
    if name not in pos or not name or pos[name] > last:
        base = layers[0][0].count(".") if layers else 0
        valid = [n for n in names if n and pos[n] <= last and n.count(".") <= base + 1
                 and (n.startswith("backbone.") or not layers[0][0].startswith("backbone."))]
        raise UnknownName(f"train.freeze_until={name!r} is not a module below the classifier; valid names include "
                       f"{', '.join(valid[:60])}{' ...' if len(valid) > 60 else ''} (or any deeper name of "
                       f"model.named_modules())")
    end = max(i for n, i in pos.items() if n == name or n.startswith(name + "."))
    return [(n, m) for n, m in layers if pos[n] <= end]


# ------------------------------------------------------------------------------------------ regularisation
def head_penalty(head: nn.Module, l1: float, l2: float) -> torch.Tensor | None:
    """``l1 Σ|w| + l2 Σ w²`` over the parameters of ``head`` (None when both are 0)."""
    if not l1 and not l2:
        return None
    params = [p for p in head.parameters() if p.requires_grad]
    out = 0.0
    if l1:
        out = out + l1 * sum(p.abs().sum() for p in params)
    if l2:
        out = out + l2 * sum(p.pow(2).sum() for p in params)
    return out


def classification_block(model: nn.Module) -> nn.Module:
    """The classification block: ``get_classifier()`` (for LesaNet its classifier; the SPL is not regularised)."""
    return model.get_classifier()


# ------------------------------------------------------------------------------------------ convergence
def val_score(task: str, scores: np.ndarray, labels: np.ndarray) -> float:
    """Validation score of an epoch: MCC (single-label) or mean per-label AUC (multi-label, LesaNet protocol)."""
    if not len(scores):
        return float("nan")
    if task == "multiclass":
        return float(matthews_corrcoef(labels.argmax(1), scores.argmax(1)))
    return float(lesanet_eval(scores, labels, 0.5)["auc"])


def convergence(history: list[dict]) -> dict:
    """``best_epoch`` (1-based epoch of the best ``val_score``, the first of ties; the lowest ``val_loss`` when no
    score is defined), ``best_val_score``, ``best_loss_epoch`` and ``epochs`` of one run's history."""
    if not history:
        return {"best_epoch": float("nan"), "best_val_score": float("nan"), "best_loss_epoch": float("nan"),
                "epochs": 0}
    loss = [h["val_loss"] for h in history]
    score = [h.get("val_score", float("nan")) for h in history]
    loss_epoch = int(np.nanargmin(loss)) + 1 if not all(map(math.isnan, loss)) else 1
    if all(map(math.isnan, score)):
        return {"best_epoch": loss_epoch, "best_val_score": float("nan"), "best_loss_epoch": loss_epoch,
                "epochs": len(history)}
    best = int(np.nanargmax(score))
    return {"best_epoch": best + 1, "best_val_score": float(score[best]), "best_loss_epoch": loss_epoch,
            "epochs": len(history)}
