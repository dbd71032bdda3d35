"""Model, optimizer and schedule construction, and one resumable training stage (teacher or student).

The teacher is the special case of a stage with no pseudo-labeled batch and no noise: weighted focal loss on the
labeled rows, Ranger (timm ``lookahead_radam``), cosine schedule with warmup.
"""
from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch

from dompre.errors import UserError
from dompre.train.engine import Position, create_optimizer, create_scheduler, fit
from dompre.train.student import NoisyStudentTask, StudentData

logger = logging.getLogger(__name__)


def create_model(arch: str, num_classes: int, *, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 pretrained: bool = False) -> torch.nn.Module:
    """``timm.create_model`` with the label count; drop path only where the architecture takes it."""
    if arch not in timm.list_models() and not timm.is_model(arch):
        raise UserError(f"model.name {arch!r} is not a timm architecture; try 'maknet_tiny', 'maknet', 'resnet18'")
    kwargs = {"num_classes": num_classes, "drop_rate": drop_rate}
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        return timm.create_model(arch, pretrained=pretrained, **kwargs)
    except TypeError:  # architectures without drop_path_rate (e.g. vgg)
        kwargs.pop("drop_path_rate", None)
        return timm.create_model(arch, pretrained=pretrained, **kwargs)


def train_stage(accelerator, *, model: torch.nn.Module, loss_fn: torch.nn.Module, prep, data: StudentData,
                opt: str, lr: float, weight_decay: float, epochs: int, warmup_epochs: float,
                state_dir: str | Path, position: Position, stage: str, train_cfg, pseudo_weight: float = 1.0,
                fail_after_steps: int = -1) -> torch.nn.Module:
    """Train ``model`` for ``epochs`` (resuming from ``state_dir``) and return it unwrapped, in eval mode."""
    if train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(model, opt, lr, weight_decay)
    model, optimizer, *loaders = accelerator.prepare(model, optimizer, *data.loaders)
    steps = len(loaders[0])
    if steps == 0:
        raise UserError(f"{stage}: no training batch; the labeled training set is smaller than the batch size")
    scheduler = create_scheduler(optimizer, epochs * steps, warmup_steps=int(warmup_epochs * steps))
    task = NoisyStudentTask(model, loss_fn.to(accelerator.device), prep, pseudo_weight, noise=data.noise)

    def step_fn(labeled: dict, pseudo: dict | None = None) -> dict:
        return task(labeled, pseudo)

    fit(accelerator, model=model, optimizer=optimizer, scheduler=scheduler, loaders=loaders,
        samplers=data.samplers, step_fn=step_fn, epochs=epochs, steps_per_epoch=steps, state_dir=state_dir,
        position=position, stage=stage, checkpoint_every=train_cfg.checkpoint_every, log_every=train_cfg.log_every,
        progress=train_cfg.progress, fail_after_steps=fail_after_steps)
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model)
    accelerator.free_memory()
    return model.eval()
