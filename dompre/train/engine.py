"""The one training engine: input preparation, the seeded data pipeline, optimizer and schedule, the resumable
fit loop and inference. Pretraining (teacher and students, :mod:`dompre.train.teacher`) and fine-tuning
(:mod:`dompre.train.finetune`) are tasks on it: each supplies a ``step_fn`` returning a dict of losses.

Determinism and resume: data order and augmentation depend only on ``(seed, stage, epoch, position)``
(:class:`StreamSampler` yields ``(row, item_seed)`` and :class:`Items` seeds its transform per item),
DataLoaders draw their worker seeds from their own generator, and ``accelerator.save_state`` keeps model,
optimizer and RNG (dropout), with the :class:`Position` beside them as ``position.json`` (and a task's own
progress, e.g. fine-tuning's validation history and best weights, through ``extras``). So a run killed at any
step and resumed with ``load_state`` + ``skip_first_batches`` continues exactly as the uninterrupted run would
have.

A resume state folder may come from elsewhere (a copied run), so loading it runs nothing: the model is
safetensors, optimizer and RNG states go through ``torch.load(weights_only=True)`` (accelerate's loader), the
position is JSON, and no object is registered with ``register_for_checkpointing`` (accelerate unpickles those
``custom_checkpoint_*.pkl`` files with ``weights_only=False``); a state folder holding such a file is refused.
"""
from __future__ import annotations

import csv
import gc
import ctypes
import functools
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import ProjectConfiguration, tqdm
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler

from dompre._io import write_atomic
from dompre.data.prep import InputPrep
from dompre.errors import UserError

logger = logging.getLogger(__name__)


def make_accelerator(project_dir: str | os.PathLike, *, mixed_precision: str = "no", torch_threads: int = 0,
                     trackers: bool = True) -> Accelerator:
    """A run's Accelerator: CPU runs use gloo for a multi-process launch, no RNG syncing (data order is seeded
    by position), and with ``trackers`` TensorBoard + :class:`CSVTracker` logs in ``project_dir/logs``."""
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    # accelerate only picks gloo (MULTI_CPU) for a multi-process launch when told the run is on CPU
    on_cpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    logs = Path(project_dir) / "logs"
    return Accelerator(cpu=on_cpu, mixed_precision=mixed_precision, rng_types=[],
                       project_config=ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(logs)),
                       log_with=["tensorboard", CSVTracker("dompre", logs)] if trackers else None)


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


class Items(torch.utils.data.Dataset):
    """The one Dataset over a source of inputs: item ``row`` or ``(row, seed)`` -> ``{"image": uint8 (C, H, W),
    "target": float32 (L,), "index": row}`` (plus the source's ``"box"``, when it has one).

    ``source``: a :class:`~dompre.data.store.SliceStore` (``source[row]`` is the uint8 array) or a downstream
    dataset (``source[row]`` is a dict with ``image``, ``label`` and maybe ``box``). ``targets``: per-row targets
    (``targets[row]``: the store's labels, pseudo-label targets); by default the source's own ``label``, and
    none for an unlabeled store. ``transform`` (torchvision v2 on uint8 tensors; one marked ``takes_box`` gets
    ``(image, box)``) runs under a torch RNG seeded with the item's seed, so the noise of an item depends on its
    stream position only, not on workers or on where a run was resumed. With no transform, a DataLoader's batch
    of store rows is read in one call (``__getitems__`` -> ``store.images``).
    """

    def __init__(self, source, targets=None, transform: Callable | None = None) -> None:
        self.source, self.targets, self.transform = source, targets, transform

    def __len__(self) -> int:
        return len(self.source)

    def _item(self, row: int, image: np.ndarray | torch.Tensor | dict, seed: int | None) -> dict:
        item = dict(image) if isinstance(image, dict) else {"image": image}
        label = item.pop("label", None)
        img = item["image"]
        item["image"] = torch.from_numpy(np.ascontiguousarray(img)) if isinstance(img, np.ndarray) else img
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(row if seed is None else seed)
                if getattr(self.transform, "takes_box", False):
                    item["image"], item["box"] = self.transform(item["image"], item["box"])
                else:
                    item["image"] = self.transform(item["image"])
        target = self.targets[row] if self.targets is not None else label
        if target is not None:
            item["target"] = torch.as_tensor(np.asarray(target, dtype=np.float32))
        item["index"] = row
        return item

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        row, seed = (int(item[0]), int(item[1])) if isinstance(item, tuple) else (int(item), None)
        return self._item(row, self.source[row], seed)

    def __getitems__(self, items: list) -> list[dict]:
        if self.transform is None and hasattr(self.source, "images") and not isinstance(items[0], tuple):
            rows = np.asarray(items, dtype=np.int64)
            batch = torch.from_numpy(np.ascontiguousarray(self.source.images(rows)))
            return [self._item(int(r), batch[k], None) for k, r in enumerate(rows)]
        return [self[i] for i in items]


def before_workers_fork() -> None:
    """Ready this process to fork DataLoader workers that share its pages instead of copying them: a garbage
    collection would write to every object's header (so each worker would copy the Python heap), and frozen
    objects are never scanned; the C heap's free pages are given back (:func:`release_free_heap`)."""
    gc.collect()
    gc.freeze()
    release_free_heap()


def release_free_heap(_worker_id: int | None = None) -> None:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim``; a no-op elsewhere).

    A forked loader worker's resident memory counts every page of its parent's heap it inherited, free or
    not, and glibc keeps the pages of freed mid-sized arrays (numpy temporaries of a pass over the unlabeled
    store) in its heap. Called by the parent before it forks workers and by each worker as it starts (a
    ``worker_init_fn``: workers are forked again every epoch), so neither holds pages that only grow with
    the data that passed through the parent.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim(pad)``, or None (another C library or system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # musl and others have none: AttributeError
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def make_loader(dataset, sampler, batch_size: int, num_workers: int, seed: int) -> torch.utils.data.DataLoader:
    """A DataLoader with its own generator (worker seeds never touch the global RNG); its workers give their
    inherited free heap back as they start (:func:`release_free_heap`)."""
    return torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=batch_size, drop_last=True, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed), pin_memory=torch.cuda.is_available(),
        persistent_workers=False, worker_init_fn=release_free_heap if num_workers > 0 else None)


def epoch_steps(n_rows: int, batch_size: int, world: int = 1, max_steps: int = 0) -> int:
    """Global optimizer steps per epoch: one pass over ``n_rows`` in whole batches (at least one, at most
    ``max_steps`` when set), rounded up to a multiple of the number of processes."""
    steps = max(1, n_rows // batch_size)
    if max_steps > 0:
        steps = min(steps, max_steps)
    return -(-steps // world) * world


def create_optimizer(model: torch.nn.Module, opt: str, lr: float, weight_decay: float,
                     momentum: float | None = None) -> torch.optim.Optimizer:
    """A timm optimizer by name (``lookahead_radam`` = Ranger); ``momentum`` for the SGD family."""
    kw = {"momentum": momentum} if momentum is not None and opt in ("sgd", "momentum", "nesterov") else {}
    return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, **kw)


def create_scheduler(optimizer, total_steps: int, *, kind: str = "cosine", warmup_steps: int = 0,
                     milestones: Sequence[int] = (), gamma: float = 0.1, lr_min: float = 1e-6):
    """The one LR-schedule idiom: a timm scheduler over optimizer steps, driven by ``step_update(step)``.

    ``cosine``: decay to ``lr_min`` over ``total_steps`` with linear warmup from 1e-5; ``step``: multiply by
    ``gamma`` at each of ``milestones`` (optimizer steps); ``none``: constant (returns None).
    """
    if kind == "cosine":
        return CosineLRScheduler(optimizer, t_initial=max(1, total_steps), lr_min=lr_min, warmup_t=warmup_steps,
                                 warmup_lr_init=1e-5, warmup_prefix=True, t_in_epochs=False)
    if kind == "step":
        return MultiStepLRScheduler(optimizer, decay_t=list(milestones), decay_rate=gamma, warmup_t=warmup_steps,
                                    warmup_lr_init=1e-5, t_in_epochs=False)
    if kind == "none":
        return None
    raise ValueError(f"schedule {kind!r}: choose cosine, step or none")


class StateExtra(Protocol):
    """Progress a task keeps beside accelerate's state (safe formats only: JSON, safetensors)."""

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...


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
            raise UserError(f"position {d!r}: epoch, step and global_step must be integers >= 0")
        self.epoch, self.step, self.global_step = values

    def save(self, folder: Path) -> None:
        write_atomic(folder / "position.json", json.dumps(self.state_dict()))

    def load(self, folder: Path) -> None:
        pos_file = folder / "position.json"
        try:
            saved = json.loads(pos_file.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{pos_file}: unreadable resume position ({e}); delete {folder} to restart this "
                             f"stage") from None
        self.load_state_dict(saved)


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


def save_state(accelerator, state_dir: Path, global_step: int, position: Position | None = None,
               extras: Sequence[StateExtra] = ()) -> None:
    """``accelerator.save_state`` (+ ``position.json`` and each extra's files) into a temporary folder, then an
    atomic rename; older states removed."""
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
        for extra in ([position] if position is not None else []) + list(extras):
            extra.save(tmp)
        os.replace(tmp, final)
        for old in state_dir.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_state(accelerator, folder: Path, position: Position, extras: Sequence[StateExtra] = ()) -> None:
    """Load a state written by :func:`save_state` without unpickling anything (see the module docstring)."""
    pickles = sorted(p.name for p in folder.glob("custom_checkpoint_*.pkl"))
    if pickles:
        raise UserError(f"{folder} holds {', '.join(pickles)}: resume states are never pickled objects (an older "
                         f"dompre or another program wrote it, or it was planted); it is not loaded. Delete {folder} "
                         f"to restart this stage from its beginning")
    if accelerator._custom_objects:  # noqa: SLF001 - accelerate would unpickle them with weights_only=False
        raise RuntimeError("objects are registered with accelerator.register_for_checkpointing; dompre keeps its "
                           "resume state in position.json instead")
    saved = Position()
    saved.load(folder)  # checked before accelerate reads anything
    accelerator.load_state(str(folder))
    position.load_state_dict(saved.state_dict())
    for extra in extras:
        extra.load(folder)


def fit(accelerator, *, model, optimizer, scheduler, loaders: list, samplers: list, step_fn: Callable,
        epochs: int, steps_per_epoch: int, state_dir: str | Path, position: Position, stage: str,
        checkpoint_every: int, log_every: int, progress: bool = True, fail_after_steps: int = -1,
        train_mode: Callable[[], Any] | None = None, on_epoch_end: Callable[[int], dict | None] | None = None,
        extras: Sequence[StateExtra] = ()) -> None:
    """Run (or resume) ``epochs`` of ``steps_per_epoch`` optimizer steps over zipped prepared ``loaders``.

    Args:
        step_fn: ``(*batches) -> dict`` of scalar tensors with at least ``"loss"`` (distill-task shape).
        samplers: the :class:`StreamSampler` of each loader (their epoch is set before each pass).
        state_dir: where ``save_state`` folders go; the latest complete one is loaded first.
        position: the stage's :class:`Position` (saved as ``position.json`` beside each state, restored from it).
        scheduler: a timm scheduler (``step_update(global_step)`` before each step), or None.
        fail_after_steps: testing hook: raise after this many optimizer steps of this call.
        train_mode: puts the model in training mode before each step (default ``model.train()``; fine-tuning
            keeps frozen BatchNorm layers in eval).
        on_epoch_end: called with the finished epoch count after each epoch, before its state is saved (e.g. a
            validation pass); a returned dict of scalars is logged under ``stage/``.
        extras: a task's progress saved with each state and restored on resume (:class:`StateExtra`).
    """

    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    latest = _latest_state(state_dir)
    position.reset()
    if latest is not None:
        load_state(accelerator, latest, position, extras)
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
            model.train() if train_mode is None else train_mode()
            if scheduler is not None:
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
                save_state(accelerator, state_dir, position.global_step, position, extras)
            if 0 <= fail_after_steps <= done_here:
                raise RuntimeError(f"debug.fail_after_steps={fail_after_steps} reached in {stage} (injected failure)")
        position.epoch += 1
        position.step = 0
        if on_epoch_end is not None:
            values = on_epoch_end(position.epoch)
            if values:
                accelerator.log({f"{stage}/{k}": float(v) for k, v in values.items()}, step=position.global_step)
        save_state(accelerator, state_dir, position.global_step, position, extras)
    bar.close()


def forward(model: torch.nn.Module, x: torch.Tensor, batch: dict) -> torch.Tensor:
    """``model(x)``, or ``model(x, boxes)`` for models that pool lesion boxes (LesaNet)."""
    return model(x, batch["box"]) if "box" in batch else model(x)


def batch_loader(dataset, rows: Sequence[int], batch_size: int, num_workers: int = 0):
    """A DataLoader over ``rows`` of ``dataset`` in order, in batches of ``batch_size``."""
    return torch.utils.data.DataLoader(dataset, sampler=[int(r) for r in rows], batch_size=batch_size,
                                       num_workers=num_workers, pin_memory=torch.cuda.is_available())


@torch.no_grad()
def outputs(accelerator, model: torch.nn.Module, loader, prep: InputPrep, timings: list[float] | None = None
            ) -> Iterator[tuple[dict, torch.Tensor]]:
    """The one inference loop: ``(batch, float logits)`` per batch of ``loader`` on this process.

    ``timings``: when given, each batch's forward seconds (preparation and model, not loading) are appended to
    it (on CUDA after a synchronize, so only then is the loop synchronized)."""
    model.eval()
    for batch in loader:
        t0 = time.perf_counter()
        x = prep(batch["image"].to(accelerator.device))
        with accelerator.autocast():
            logits = forward(model, x, {k: v.to(accelerator.device) for k, v in batch.items() if k == "box"})
        if timings is not None:
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - t0)
        yield batch, logits.float()


@dataclass
class Inference:
    """Outputs over the requested rows, in their order: scores (N, L), targets (N, L) or None, mean loss,
    seconds spent in forward passes (on the main process)."""
    scores: np.ndarray
    targets: np.ndarray | None
    loss: float
    seconds: float


def infer(accelerator, model: torch.nn.Module, dataset, rows: Sequence[int], prep: InputPrep, batch_size: int,
          *, activation: str = "sigmoid", loss_fn: Callable | None = None, num_workers: int = 0) -> Inference:
    """Scores of ``model`` on ``rows`` of ``dataset`` (an :class:`Items`), split over processes and gathered.

    ``activation``: ``sigmoid`` (multi-label) or ``softmax`` (single-label). ``loss_fn(logits, target)``: its
    mean over the batches of every process, when the items have targets (the same value on every process, so
    each picks the same best epoch). ``seconds``: this process's forward time.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if len(np.unique(rows)) != len(rows):
        raise ValueError("infer: rows must be distinct (each score is placed by its row)")
    loader = accelerator.prepare_data_loader(batch_loader(dataset, rows, batch_size, num_workers))
    scores, targets, index, losses, timings = [], [], [], [], []
    for batch, logits in outputs(accelerator, model, loader, prep, timings):
        prob = logits.softmax(1) if activation == "softmax" else torch.sigmoid(logits)
        target = batch.get("target")
        if loss_fn is not None and target is not None:
            losses.append(float(loss_fn(logits, target.to(logits.device))))
        # gather, not gather_for_metrics: that one trims by len(dataset), the whole source, not ``rows``;
        # the samples even_batches repeats are real rows, placed twice by their index below
        got = accelerator.gather((prob, batch["index"].to(accelerator.device)) +
                                 ((target.to(accelerator.device),) if target is not None else ()))
        scores.append(got[0].cpu())
        index.append(got[1].cpu())
        if target is not None:
            targets.append(got[2].cpu())
    seconds = float(sum(timings))
    total, count = float(np.sum(losses)), len(losses)  # np.sum: the same float as np.mean gave
    if accelerator.num_processes > 1:  # sum and count over all processes (one with no batch adds zeros)
        total, count = accelerator.reduce(torch.tensor([total, count], dtype=torch.float64,
                                                       device=accelerator.device), reduction="sum").tolist()
    loss = total / count if count else float("nan")
    if not scores:
        return Inference(np.zeros((0, 0), np.float32), None, loss, seconds)
    order = np.argsort(rows, kind="stable")
    where = order[np.searchsorted(rows[order], torch.cat(index).numpy())]  # gathered row -> requested place
    out = np.zeros((len(rows), scores[0].shape[1]), np.float32)
    out[where] = torch.cat(scores).numpy()
    tgt = None
    if targets:
        tgt = np.zeros((len(rows), targets[0].shape[1]), np.float32)
        tgt[where] = torch.cat(targets).numpy()
    return Inference(out, tgt, loss, seconds)


def predict(accelerator, model: torch.nn.Module, store, rows: np.ndarray, prep: InputPrep,
            batch_size: int) -> np.ndarray:
    """Sigmoid scores (len(rows), L) of ``model`` on store ``rows`` (:func:`infer` without targets)."""
    return infer(accelerator, model, Items(store), rows, prep, batch_size).scores
