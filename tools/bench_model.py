"""Benchmark MAKNet against ResNet18, VGG16-BN and DenseNet121 in one run.

Prints parameters, forward FLOPs (torch.utils.flop_counter), and training / inference images per second at
3×256×256, with ratios to resnet18 measured in the same run. Steps of all models are interleaved one by one and each figure is
the fastest single step seen, so load from other users on a shared machine biases no model (rerun when in
doubt). Example:

    OMP_NUM_THREADS=2 python tools/bench_model.py --batch 8 --steps 5
    python tools/bench_model.py --device cuda --batch 64 --steps 20 --channels-last --bf16
    OMP_NUM_THREADS=1 python tools/bench_model.py --cpu-time --models resnet18 maknet   # busy shared CPU
    python tools/bench_model.py --models maknet --profile    # where does MAKNet's training step spend its time
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F
import timm
from torch.utils.flop_counter import FlopCounterMode

import dompre  # noqa: F401  (registers maknet)

DEFAULT_MODELS = ("resnet18", "maknet", "vgg16_bn", "densenet121")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(args: argparse.Namespace, device: torch.device):
    if args.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def count_flops(model: torch.nn.Module, size: int) -> float:
    """Forward FLOPs for one 3×size×size image (FlopCounterMode counts a multiply-add as 2)."""
    model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.randn(1, 3, size, size))
    return fc.get_total_flops()


def make_step(model: torch.nn.Module, args: argparse.Namespace, device: torch.device, train: bool):
    """A closure running one training (forward, backward, SGD step) or inference step on a fixed batch."""
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=fmt)
    y = torch.randint(0, model.num_classes, (args.batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        model.train(train)
        with _autocast(args, device):
            if train:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
            else:
                with torch.no_grad():
                    model(x)
    return step


def timed(step, device: torch.device, clock=time.perf_counter) -> float:
    _sync(device)
    t0 = clock()
    step()
    _sync(device)
    return clock() - t0


def interleaved_times(steps: dict, args: argparse.Namespace, device: torch.device) -> dict[str, list[float]]:
    """Step times per key, models interleaved step by step so drifting machine load hits every model alike."""
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.steps):
        for key, step in steps.items():
            times[key].append(timed(step, device, time.process_time if args.cpu_time else time.perf_counter))
    return times


def create(name: str, num_classes: int) -> torch.nn.Module:
    """timm model by name; MAKNet suffixes ``+fused`` / ``+split``: every MAKConv fused / split into 4 groups."""
    base, _, extra = name.partition("+")
    kwargs = {"fused": dict(fused_mak=True), "split": dict(fused_mak=False)}.get(extra, {})
    return timm.create_model(base, pretrained=False, num_classes=num_classes, **kwargs)


def build(name: str, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    model = create(name, args.num_classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def profile(name: str, args: argparse.Namespace, device: torch.device) -> str:
    """torch.profiler table of one training step (after warm-up), sorted by self time."""
    step = make_step(build(name, args, device), args, device, train=True)
    for _ in range(max(1, args.warmup)):
        step()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                     if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        timed(step, device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                   help="timm names (maknet+fused / maknet+split: all MAKConvs fused / split); resnet18 is the baseline")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per model and mode (interleaved; fastest counts)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--num-classes", type=int, default=115)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument("--cpu-time", action="store_true",
                   help="time steps by this process's CPU seconds, not wall clock: on a shared CPU machine, with "
                        "OMP_NUM_THREADS=1, this measures the work itself (images per CPU-second)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table per model instead")
    args = p.parse_args()
    device = torch.device(args.device)
    if "resnet18" not in args.models and not args.profile:
        args.models = ["resnet18", *args.models]

    if args.profile:
        for name in args.models:
            print(f"== {name}\n{profile(name, args, device)}")
        return

    steps, rows = {}, {}
    for name in args.models:
        model = build(name, args, device)
        flops = count_flops(create(name, args.num_classes), args.size)
        rows[name] = [name, sum(p.numel() for p in model.parameters()), flops, 0.0, 0.0]
        run = torch.compile(model) if args.compile else model
        steps[(name, True)] = make_step(run, args, device, train=True)
        steps[(name, False)] = make_step(run, args, device, train=False)
    times = interleaved_times(steps, args, device)
    for (name, train), ts in times.items():  # the fastest step: load from other users only ever adds time
        rows[name][3 if train else 4] = args.batch / min(ts)
    rows, base = list(rows.values()), rows["resnet18"]
    print(f"device={device} batch={args.batch} steps={args.steps} size={args.size} channels_last={args.channels_last}"
          f" bf16={args.bf16} compile={args.compile} cpu_time={args.cpu_time} threads={torch.get_num_threads()}")
    print(f"{'model':<14}{'params':>12}{'GFLOPs':>9}{'train img/s':>13}{'infer img/s':>13}"
          f"{'params×':>9}{'train×':>8}{'infer×':>8}")
    for name, params, flops, tr, inf in rows:
        print(f"{name:<14}{params:>12,}{flops / 1e9:>9.2f}{tr:>13.1f}{inf:>13.1f}"
              f"{params / base[1]:>9.2f}{tr / base[3]:>8.2f}{inf / base[4]:>8.2f}")


if __name__ == "__main__":
    main()
