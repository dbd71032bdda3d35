"""Pseudo-labeling throughput against a bare ``model(x)`` loop, and peak memory for a 10x larger store.

    OMP_NUM_THREADS=1 python tools/bench_pseudo_label.py [--n 512] [--size 64] [--model maknet_tiny]

Prints images/s of ``dompre.train.pseudo_label.label_store`` (store reads through a DataLoader, sigmoid, top-k,
atomic .npy shards) and of a bare loop over the same inputs already in memory, their ratio (goal >= 0.9), and
the peak RSS of labeling stores of N and 10 N inputs in fresh processes (goal: within 10%).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_store(path: Path, n: int, size: int) -> None:
    from dompre.data.store import StoreWriter
    rng = np.random.default_rng(0)
    with StoreWriter(path, image_size=size, shard_size=1024) as w:
        for i in range(n):
            w.add(rng.integers(0, 255, (3, size, size), dtype=np.uint8))
            if i % 256 == 255 or i == n - 1:
                w.commit_unit(f"u{i}")


def _setup(args):
    import timm
    from accelerate import Accelerator

    import dompre  # noqa: F401
    from dompre.data.prep import InputPrep
    acc = Accelerator(cpu=not torch.cuda.is_available())
    model = timm.create_model(args.model, num_classes=115).to(acc.device).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return acc, model, InputPrep.for_model(model, args.size, args.channels_last)


def run_dompre(args, store_path: Path, out: Path) -> float:
    from dompre.data.store import SliceStore
    from dompre.train.pseudo_label import label_store
    acc, model, prep = _setup(args)
    store = SliceStore(store_path)
    t0 = time.perf_counter()
    with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=args.bf16):
        label_store(acc, model, store, out, label_names=[str(i) for i in range(115)], prepare_input=prep, top_k=15,
                    batch_size=args.batch, chunk_size=args.batch * 8, num_workers=args.workers, progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(store) / (time.perf_counter() - t0)


@torch.no_grad()
def run_bare(args, store_path: Path) -> float:
    from dompre.data.store import SliceStore
    acc, model, prep = _setup(args)
    store = SliceStore(store_path)
    x_all = torch.from_numpy(store.images(np.arange(len(store)))).to(acc.device)
    t0 = time.perf_counter()
    with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=args.bf16):
        for s in range(0, len(x_all), args.batch):
            model(prep(x_all[s:s + args.batch]))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(x_all) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048, help="inputs in the store")
    p.add_argument("--size", type=int, default=64, help="stored and model image size")
    p.add_argument("--model", default="maknet_tiny")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:  # peak-memory child: label one store, print peak RSS
        store, out = args.child.split(",")
        run_dompre(args, Path(store), Path(out))
        peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        print(json.dumps({"peak_rss_mb": peak / 1024}))  # loader workers (children) count too
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_store(tmp / "s1", args.n, args.size)
        make_store(tmp / "s10", 10 * args.n, args.size)
        bare = run_bare(args, tmp / "s1")
        ours = run_dompre(args, tmp / "s1", tmp / "pl-warm")
        print(f"bare model(x) loop  : {bare:8.1f} images/s")
        print(f"dompre label_store  : {ours:8.1f} images/s   ratio {ours / bare:.2f} (goal >= 0.9)")
        peaks = []
        for name in ("s1", "s10"):
            cmd = [sys.executable, __file__, "--child", f"{tmp / name},{tmp / ('pl-' + name)}",
                   "--size", str(args.size), "--model", args.model, "--batch", str(args.batch),
                   "--workers", str(args.workers)]
            outp = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            peaks.append(json.loads(outp)["peak_rss_mb"])
        print(f"peak RSS {args.n} inputs: {peaks[0]:.0f} MB; {10 * args.n} inputs: {peaks[1]:.0f} MB; "
              f"ratio {peaks[1] / peaks[0]:.2f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
