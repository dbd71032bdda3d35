"""Student step throughput (store -> noise -> mixed batch -> forward/backward/step) against a bare loop.

    OMP_NUM_THREADS=1 python tools/bench_train.py [--size 64] [--model maknet_tiny] [--steps 10] [--augment-on device]

Both loops use the same model, optimizer and batch (labeled_batch + pseudo_batch); the bare loop trains on
random tensors already on the device. Prints images/s of each and the ratio (goal >= 0.85: the data path must
not be the bottleneck). ``--augment-on device`` runs the student's noise on the batch where the model runs
(``train.augment_on: device``; the loader then only reads uint8); without a GPU that is the CPU too.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_store(path: Path, n: int, size: int, labels: int) -> None:
    from dompre.data.store import StoreWriter
    rng = np.random.default_rng(0)
    names = [str(i) for i in range(labels)]
    with StoreWriter(path, image_size=size, label_names=names) as w:
        for i in range(n):
            w.add(rng.integers(0, 255, (3, size, size), dtype=np.uint8), meta={"split": "train"},
                  labels=(rng.random(labels) < 0.2).astype(np.float32))
        w.commit_unit("all")


def noise_alone(size: int, device: torch.device, n: int = 64, repeats: int = 3) -> str:
    """Inputs/s of the noise alone: CPU per item (the loader's work), parameter draws only (the loader's work
    with augment_on: device) and the batched device noise."""
    from dompre.train.config import StudentConfig
    from dompre.train.student import DeviceNoise, noise_params, noise_transform
    tf, dev = noise_transform(StudentConfig(), size), DeviceNoise(size)
    x = torch.randint(0, 255, (n, 3, size, size), dtype=torch.uint8)
    cpu, draw, batched = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for k in range(n):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(k)
                tf(x[k])
        cpu.append(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        params = torch.from_numpy(np.stack([noise_params(tf, size, k) for k in range(n)]))
        draw.append(n / (time.perf_counter() - t0))
        xd, pd = x.to(device), params.to(device)
        dev(xd, pd)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev(xd, pd)
        if device.type == "cuda":
            torch.cuda.synchronize()
        batched.append(n / (time.perf_counter() - t0))
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return (f"noise alone at {size} px (median of {repeats}, inputs/s): CPU per item {med(cpu):.0f}; "
            f"parameter draws only {med(draw):.0f}; batched DeviceNoise on {device} {med(batched):.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--model", default="maknet_tiny")
    p.add_argument("--labeled-batch", type=int, default=16)
    p.add_argument("--pseudo-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--labels", type=int, default=115)
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--augment-on", default="cpu", choices=["cpu", "device"], help="train.augment_on")
    args = p.parse_args()

    from accelerate import Accelerator

    from dompre.data.store import SliceStore
    from dompre.train.config import StudentConfig
    from dompre.data.prep import InputPrep
    from dompre.train.losses import WeightedFocalLoss
    from dompre.train.student import NoisyStudentTask, build_loaders, noise_transform
    from dompre.train.engine import create_optimizer
    from dompre.train.teacher import create_model

    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=args.mixed_precision)
    L = args.labels
    bsz = args.labeled_batch + args.pseudo_batch
    n = (args.steps + 3) * max(args.labeled_batch, args.pseudo_batch)
    with tempfile.TemporaryDirectory() as tmp:
        make_store(Path(tmp) / "s", n, args.size, L)
        store = SliceStore(Path(tmp) / "s")
        model = create_model(args.model, L, drop_rate=0.5, drop_path_rate=0.1)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = create_optimizer(model, "lookahead_radam", 1e-3, 1e-4)
        prep = InputPrep.for_model(model, args.size, args.channels_last)
        data = build_loaders(store, np.arange(n), store.labels, labeled_batch=args.labeled_batch, seed=0, stage=1,
                             num_workers=args.workers, transform=noise_transform(StudentConfig(), args.size),
                             unlabeled_store=store, pseudo_rows_=np.arange(n), pseudo_targets=store.labels,
                             pseudo_batch=args.pseudo_batch, augment_on=args.augment_on)
        model, opt, *loaders = acc.prepare(model, opt, *data.loaders)
        loss = WeightedFocalLoss(np.ones(L), np.ones(L)).to(acc.device)
        task = NoisyStudentTask(model, loss, prep, noise=data.noise)
        bare_task = NoisyStudentTask(model, loss, prep)  # the bare loop has no noise at all

        def step(lab, pse, task=task):
            out = task(lab, pse)
            acc.backward(out["loss"])
            opt.step()
            opt.zero_grad(set_to_none=True)

        def sync():
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        # bare loop: random uint8 tensors already on the device, same task and optimizer
        x = torch.randint(0, 255, (bsz, 3, args.size, args.size), dtype=torch.uint8, device=acc.device)
        y = (torch.rand(bsz, L, device=acc.device) < 0.2).float()
        lab = {"image": x[:args.labeled_batch], "target": y[:args.labeled_batch]}
        pse = {"image": x[args.labeled_batch:], "target": y[args.labeled_batch:]}
        model.train()
        for _ in range(2):
            step(lab, pse, bare_task)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(lab, pse, bare_task)
        sync()
        bare = args.steps * bsz / (time.perf_counter() - t0)

        it = zip(*loaders)
        for _ in range(2):
            step(*next(it))
        sync()
        t0 = time.perf_counter()
        done = 0
        for batches in it:
            step(*batches)
            done += 1
            if done == args.steps:
                break
        sync()
        ours = done * bsz / (time.perf_counter() - t0)
    print(f"bare forward/backward on random tensors: {bare:8.1f} images/s ({acc.device})")
    print(noise_alone(args.size, acc.device))
    print(f"dompre student step (store + noise on {args.augment_on} + mix, {args.workers} workers): "
          f"{ours:8.1f} images/s   ratio {ours / bare:.2f} "
          "(goal >= 0.85)")


if __name__ == "__main__":
    main()
