"""Student step throughput (store -> noise -> mixed batch -> forward/backward/step) against a bare loop.

    OMP_NUM_THREADS=1 python tools/bench_train.py [--size 64] [--model maknet_tiny] [--steps 10]

Both loops use the same model, optimizer and batch (labeled_batch + pseudo_batch); the bare loop trains on
random tensors already on the device. Prints images/s of each and the ratio (goal >= 0.85: the data path must
not be the bottleneck).
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
    args = p.parse_args()

    from accelerate import Accelerator

    from dompre.data.store import SliceStore
    from dompre.train.config import StudentConfig
    from dompre.train.engine import InputPrep
    from dompre.train.losses import WeightedFocalLoss
    from dompre.train.student import NoisyStudentTask, build_loaders, noise_transform
    from dompre.train.teacher import create_model, create_optimizer

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
                             pseudo_batch=args.pseudo_batch)
        model, opt, *loaders = acc.prepare(model, opt, *data.loaders)
        task = NoisyStudentTask(model, WeightedFocalLoss(np.ones(L), np.ones(L)).to(acc.device), prep)

        def step(lab, pse):
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
            step(lab, pse)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(lab, pse)
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
    print(f"dompre student step (store + noise + mix): {ours:8.1f} images/s   ratio {ours / bare:.2f} "
          "(goal >= 0.85)")


if __name__ == "__main__":
    main()
