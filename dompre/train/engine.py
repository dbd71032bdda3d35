"""Shared training machinery: input preparation, seeded data pipeline, resumable fit loop, prediction.

Determinism and resume: data order and augmentation depend only on ``(seed, stage, epoch, position)``
(:class:`StreamSampler` yields ``(row, item_seed)`` and :class:`SeededImages` seeds its transform per item),
DataLoaders draw their worker seeds from their own generator, and ``accelerator.save_state`` keeps model,
optimizer and RNG (dropout), with the :class:`Position` beside them as ``position.json``. So a run killed at
any step and resumed with ``load_state`` + ``skip_first_batches`` continues exactly as the uninterrupted run
would have.

A resume state folder may come from elsewhere (a copied run), so loading it runs nothing: the model is
safetensors, optimizer and RNG states go through ``torch.load(weights_only=True)`` (accelerate's loader), the
position is JSON, and no object is registered with ``register_for_checkpointing`` (accelerate unpickles those
``custom_checkpoint_*.pkl`` files with ``weights_only=False``); a state folder holding such a file is refused.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.tracking import GeneralTracker

logger = logging.getLogger(__name__)


class InputPrep:
    """uint8 (B, 3, H, W) on device -> normalized float input of ``img_size`` (resized on device if needed)."""

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float], channels_last: bool = False):
        self.img_size = img_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.channels_last = channels_last

    @classmethod
    def for_model(cls, model: torch.nn.Module, img_size: int, channels_last: bool = False) -> "InputPrep":
        """Mean/std from the model's timm ``pretrained_cfg`` (ImageNet defaults when absent)."""
        from timm.data import resolve_data_config
        cfg = resolve_data_config({}, model=model)
        return cls(img_size, cfg["mean"], cfg["std"], channels_last)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True,
                              align_corners=False)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def item_seed(seed: int, stage: int, pos: int) -> int:
    """A 63-bit seed for the item at stream position ``pos`` of ``stage``."""
    return int(np.random.SeedSequence([seed, stage, pos]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class StreamSampler(torch.utils.data.Sampler):
    """Yields ``(row, item_seed)`` for one epoch of an endless stream of shuffled passes over ``rows``.

    Epoch ``e`` covers stream positions ``[e * per_epoch, (e + 1) * per_epoch)``; pass ``p`` is a permutation of
    ``rows`` drawn from ``(seed, stage, p)`` (or, with ``weights``, a weighted draw with replacement).
    """

    def __init__(self, rows: np.ndarray, per_epoch: int, seed: int, stage: int, weights: np.ndarray | None = None):
        if len(rows) == 0:
            raise ValueError("cannot sample from an empty set of rows")
        self.rows = np.asarray(rows, dtype=np.int64)
        self.per_epoch, self.seed, self.stage, self.epoch = int(per_epoch), int(seed), int(stage), 0
        self.p = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _pass(self, p: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.stage, p])
        n = len(self.rows)
        return self.rows[rng.permutation(n) if self.p is None else rng.choice(n, size=n, p=self.p)]

    def __len__(self) -> int:
        return self.per_epoch

    def __iter__(self):
        n = len(self.rows)
        start = self.epoch * self.per_epoch
        cur_pass, order = -1, None
        for pos in range(start, start + self.per_epoch):
            if pos // n != cur_pass:
                cur_pass = pos // n
                order = self._pass(cur_pass)
            yield int(order[pos % n]), item_seed(self.seed, self.stage, pos)


class SeededImages(torch.utils.data.Dataset):
    """Item ``(row, seed)`` -> ``{"image": uint8 (3,H,W), "target": float32 (L,), "index": row}``.

    ``transform`` (torchvision v2 on uint8 tensors) runs under a torch RNG seeded with ``seed``, so the noise of
    an item depends on its stream position only, not on workers or on where a run was resumed.
    """

    def __init__(self, store, targets, transform: Callable | None = None) -> None:
        self.store, self.targets, self.transform = store, targets, transform

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        row, seed = item
        image = torch.from_numpy(np.ascontiguousarray(self.store[row]))
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image = self.transform(image)
        target = torch.as_tensor(np.asarray(self.targets[row], dtype=np.float32))
        return {"image": image, "target": target, "index": row}


def make_loader(dataset, sampler, batch_size: int, num_workers: int, seed: int) -> torch.utils.data.DataLoader:
    """A DataLoader with its own generator (worker seeds never touch the global RNG)."""
    return torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=batch_size, drop_last=True, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed), pin_memory=torch.cuda.is_available(),
        persistent_workers=False)


class Position:
    """Where a stage is: epoch, step inside the epoch, optimizer steps done; saved as ``position.json``."""

    def __init__(self) -> None:
        self.epoch = self.step = self.global_step = 0

    def reset(self) -> None:
        self.epoch = self.step = self.global_step = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "global_step": self.global_step}

    def load_state_dict(self, d: dict) -> None:
        values = [d.get(k) for k in ("epoch", "step", "global_step")] if isinstance(d, dict) else [None]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise ValueError(f"position {d!r}: epoch, step and global_step must be integers >= 0")
        self.epoch, self.step, self.global_step = values


class CSVTracker(GeneralTracker):
    """accelerate tracker appending ``step,name,value`` rows to ``<logging_dir>/metrics_log.csv``."""

    name = "csv"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(logging_dir) / "metrics_log.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        pass

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "name", "value"])
            for k, v in values.items():
                w.writerow([step, k, float(v)])


def _latest_state(state_dir: Path) -> Path | None:
    done = sorted(p for p in state_dir.glob("step-*") if p.is_dir())
    return done[-1] if done else None


def save_state(accelerator, state_dir: Path, global_step: int, position: Position | None = None) -> None:
    """``accelerator.save_state`` (+ ``position.json``) into a temporary folder, then an atomic rename; older
    states removed."""
    tmp = state_dir / f"tmp-{global_step:09d}"
    final = state_dir / f"step-{global_step:09d}"
    if final.exists():
        return
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if position is not None:
            from dompre._io import write_atomic
            write_atomic(tmp / "position.json", json.dumps(position.state_dict()))
        os.replace(tmp, final)
        for old in state_dir.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_state(accelerator, folder: Path, position: Position) -> None:
    """Load a state written by :func:`save_state` without unpickling anything (see the module docstring)."""
    pickles = sorted(p.name for p in folder.glob("custom_checkpoint_*.pkl"))
    if pickles:
        raise ValueError(f"{folder} holds {', '.join(pickles)}: resume states are never pickled objects (an older "
                         f"dompre or another program wrote it, or it was planted); it is not loaded. Delete {folder} "
                         f"to restart this stage from its beginning")
    if accelerator._custom_objects:  # noqa: SLF001 - accelerate would unpickle them with weights_only=False
        raise RuntimeError("objects are registered with accelerator.register_for_checkpointing; dompre keeps its "
                           "resume state in position.json instead")
    pos_file = folder / "position.json"
    try:
        saved = json.loads(pos_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{pos_file}: unreadable resume position ({e}); delete {folder} to restart this stage") \
            from None
    accelerator.load_state(str(folder))
    position.load_state_dict(saved)


def fit(accelerator, *, model, optimizer, scheduler, loaders: list, samplers: list, step_fn: Callable,
        epochs: int, steps_per_epoch: int, state_dir: str | Path, position: Position, stage: str,
        checkpoint_every: int, log_every: int, progress: bool = True, fail_after_steps: int = -1) -> None:
    """Run (or resume) ``epochs`` of ``steps_per_epoch`` optimizer steps over zipped prepared ``loaders``.

    Args:
        step_fn: ``(*batches) -> dict`` of scalar tensors with at least ``"loss"`` (distill-task shape).
        samplers: the :class:`StreamSampler` of each loader (their epoch is set before each pass).
        state_dir: where ``save_state`` folders go; the latest complete one is loaded first.
        position: the stage's :class:`Position` (saved as ``position.json`` beside each state, restored from it).
        fail_after_steps: testing hook: raise after this many optimizer steps of this call.
    """
    from accelerate.utils import tqdm

    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    latest = _latest_state(state_dir)
    position.reset()
    if latest is not None:
        load_state(accelerator, latest, position)
        logger.info("%s: resumed from %s (epoch %d, step %d)", stage, latest, position.epoch, position.step)
    total = epochs * steps_per_epoch
    bar = tqdm(total=total, initial=position.global_step, desc=stage, disable=not progress, main_process_only=True)
    done_here = 0
    while position.epoch < epochs:
        iters = []
        for dl, sampler in zip(loaders, samplers):
            sampler.set_epoch(position.epoch)
            d = accelerator.skip_first_batches(dl, position.step) if position.step else dl
            d.set_epoch(position.epoch)
            iters.append(iter(d))
        for batches in zip(*iters):
            model.train()
            scheduler.step_update(position.global_step)
            losses = step_fn(*batches)
            accelerator.backward(losses["loss"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            position.step += 1
            position.global_step += 1
            done_here += 1
            bar.update(1)
            if position.global_step % log_every == 0:
                values = {f"{stage}/{k}": float(v.detach()) for k, v in losses.items()}
                values[f"{stage}/lr"] = optimizer.param_groups[0]["lr"]
                accelerator.log(values, step=position.global_step)
                bar.set_postfix(loss=f"{values[f'{stage}/loss']:.4f}")
            if position.global_step % checkpoint_every == 0 and position.step < steps_per_epoch:
                save_state(accelerator, state_dir, position.global_step, position)
            if 0 <= fail_after_steps <= done_here:
                raise RuntimeError(f"debug.fail_after_steps={fail_after_steps} reached in {stage} (injected failure)")
        position.epoch += 1
        position.step = 0
        save_state(accelerator, state_dir, position.global_step, position)
    bar.close()


@torch.no_grad()
def predict(accelerator, model: torch.nn.Module, store, rows: np.ndarray, prep: InputPrep,
            batch_size: int) -> np.ndarray:
    """Sigmoid scores (len(rows), L) of ``model`` on store ``rows``, split over processes and gathered."""
    rows = np.asarray(rows, dtype=np.int64)
    dl = accelerator.prepare_data_loader(torch.utils.data.DataLoader(_Rows(store, rows), batch_size=batch_size))
    model.eval()
    scores, index = [], []
    for batch in dl:
        with accelerator.autocast():
            out = torch.sigmoid(model(prep(batch["image"].to(accelerator.device))).float())
        s, i = accelerator.gather_for_metrics((out, batch["index"].to(accelerator.device)))
        scores.append(s.cpu())
        index.append(i.cpu())
    if not scores:
        return np.zeros((0, 0), np.float32)
    scores_np, index_np = torch.cat(scores).numpy(), torch.cat(index).numpy()
    out = np.zeros_like(scores_np)
    out[index_np] = scores_np
    return out


class _Rows(torch.utils.data.Dataset):
    """Item k -> ``{"image": store[rows[k]], "index": k}``."""

    def __init__(self, store, rows: np.ndarray) -> None:
        self.store, self.rows = store, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> dict:
        return {"image": torch.from_numpy(np.ascontiguousarray(self.store[int(self.rows[k])])), "index": k}
