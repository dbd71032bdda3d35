"""SliceStore at the seed paper's input count: write, commit cost, random reads, metadata, student-loader memory.

    OMP_NUM_THREADS=1 python tools/bench_store.py [--size 16] [--scale 1.0] [--repeats 3] [--workers 2]

Builds, in a temporary folder (removed at the end), an unlabeled store of 504,779 inputs (units of 16 inputs,
as series) and a labeled one of 17,697 (one input per unit, as DeepLesion lesions, 115 labels), of
``--size`` px inputs, plus the same at 1/10 of the count and a one-shard copy of the unlabeled store. Prints,
with ratios measured in this run (min / median / max over ``--repeats`` where repeated):

- write rate and the time of the last 500 units over the first 500 (goal <= 1.2: commits cost the new units),
  and the full garbage collections during the write (count, seconds),
  wall and CPU time (the CPU time of this process is less disturbed by other jobs on a shared machine);
- the same comparison with contention evened out: 500+ more units committed into a copy of the full store and
  into an empty store, the two writers taking turns (a single write's first and last windows are ~0.1 s
  apart by minutes, so one scheduler stall on a shared machine moves their ratio by tens of percent);
- random single-item reads and 64-item batch gathers against the one-shard store (goal <= 1.5);
- one metadata column, one item's metadata and the whole table: time and resident memory added;
- peak resident memory (RSS, and PSS: shared pages split between processes) of the main process, of the loader
  workers together and of all of them together (PSS, sampled at one instant) over ``--steps`` student loader
  steps (labeled + pseudo-labeled batches with the CPU noise), at the full count and at 1/10 (goal: full /
  tenth <= 1.1). Sampling starts before the first worker is forked. A forked worker's RSS counts every page of
  its parent it inherited (shared copy-on-write, not copied), so what the parent holds when it forks (per-input
  arrays, freed heap) shows once in main and again in each worker; PSS splits those pages between them.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

UNLABELED, LABELED, LABELS = 504_779, 17_697, 115
KINDS = {"unlabeled": (16, 0), "labeled": (1, LABELS)}  # store -> (inputs per unit, labels)
print = functools.partial(print, flush=True)  # noqa: A001  (lines show as they are measured)


class Units:
    """The benchmark's work units: ``per_unit`` random inputs with series-like metadata (labels when ``labels``)."""

    def __init__(self, size: int, per_unit: int, labels: int):
        import pyarrow.parquet  # noqa: F401  (imported here, not in a timed first write or flush)

        import dompre.data.store  # noqa: F401
        rng = np.random.default_rng(0)
        self.size, self.per_unit, self.labels = size, per_unit, labels
        self.pool = rng.integers(0, 255, (997, 3, size, size), dtype=np.uint8)
        self.lab = (rng.random((101, labels)) < 0.05).astype(np.float32) if labels else None

    def writer(self, path: Path, shard_size: int):
        from dompre.data.store import StoreWriter
        return StoreWriter(path, image_size=self.size, shard_size=shard_size,
                           label_names=[f"l{j}" for j in range(self.labels)] if self.labels else None)

    def write(self, w, u: int, n: int | None = None) -> None:
        """Add unit ``u``'s items (its share of ``n`` inputs) and commit it."""
        start = u * self.per_unit
        for i in range(start, start + self.per_unit if n is None else min(start + self.per_unit, n)):
            w.add(self.pool[i % len(self.pool)],
                  meta={"source": "bench", "series_uid": f"series-{u}", "patient": f"p{u // 4}",
                        "z": float(i - start), "spacing": [1.0, 0.7, 0.7], "window": [-1024.0, 3071.0],
                        "split": SPLITS[u % 10], "lesion_idx": u if self.labels else -1,
                        "bbox": [1.0, 2.0, 8.0, 9.0] if self.labels else []},
                  labels=None if self.lab is None else self.lab[i % len(self.lab)])
        w.commit_unit(f"series-{u}", info={"status": "ok"})


SPLITS = ["train"] * 7 + ["val", "test", "test"]


def write_store(path: Path, n: int, size: int, per_unit: int, labels: int, shard_size: int) -> dict:
    """Write ``n`` random inputs in units of ``per_unit``; per-unit wall times of adds + commit.

    ``last_first``: time per unit of the last units over the first, each window ending at a shard flush and
    holding the same number of flushes (at least 500 units), so both pay for the same shard writes.
    ``full_gcs``: full (generation 2) garbage collections during the write and their seconds; each walks every
    object of the process (~0.27 s with pandas and pyarrow loaded), so one in a window dwarfs its commits.
    """
    import gc

    units = Units(size, per_unit, labels)
    times, cpu, flushes, full_gcs = [], [], [], []

    def on_gc(phase: str, info: dict) -> None:
        if info["generation"] == 2:
            full_gcs.append(time.perf_counter() * (1 if phase == "stop" else -1))

    gc.callbacks.append(on_gc)
    t_all = time.perf_counter()
    with units.writer(path, shard_size) as w:
        for u in range(-(-n // per_unit)):
            t0, c0 = time.perf_counter(), time.process_time()
            shards = len(w._shards)
            units.write(w, u, n)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            if len(w._shards) > shards:
                flushes.append(u + 1)  # units [.. u] are on disk
    total = time.perf_counter() - t_all
    gc.callbacks.remove(on_gc)
    t = np.asarray(times)
    flushes = flushes or [len(t)]
    k = next((j + 1 for j, end in enumerate(flushes) if end >= 500), len(flushes))
    first, last = slice(0, flushes[k - 1]), slice(flushes[-k - 1] if len(flushes) > k else 0, flushes[-1])
    c = np.asarray(cpu)
    return {"items": n, "units": len(t), "seconds": total, "items_per_s": n / total, "window": first.stop,
            "last_first": float(t[last].mean() / t[first].mean()),
            "cpu_last_first": float(c[last].mean() / c[first].mean()),
            "full_gcs": len(full_gcs) // 2, "full_gc_s": sum(full_gcs)}


def commit_cost(big: Path, work: Path, size: int, per_unit: int, labels: int, shard_size: int, window: int,
                blocks: int) -> dict:
    """Time ``window`` more units committed into (a copy of) the store ``big`` against into an empty store.

    The two writers stay open side by side and take turns, a window each, ``blocks`` times (alternating which
    goes first), so contention on a shared machine hits both alike; a window holds whole shards, so both pay for
    the same shard writes. The copy hard-links the shard files (never changed once written) and copies the
    manifest, log and units files (the writer appends to the log). Returns the ratios of the summed times.
    """
    def link_shards(a: str, b: str) -> None:
        if "/shards/" in a:
            try:
                return os.link(a, b)
            except OSError:  # a filesystem without hard links: copy
                pass
        shutil.copy2(a, b)

    copy = work / "commit-big"
    shutil.copytree(big, copy, copy_function=link_shards)
    units = Units(size, per_unit, labels)
    spent = {"big": [0.0, 0.0], "empty": [0.0, 0.0]}
    with units.writer(copy, shard_size) as wb, units.writer(work / "commit-empty", shard_size) as we:
        held = len(wb.units)
        first_unit = {"big": held, "empty": 0}
        for block in range(blocks):
            for name, w in (("big", wb), ("empty", we)) if block % 2 else (("empty", we), ("big", wb)):
                t0, c0 = time.perf_counter(), time.process_time()
                for u in range(first_unit[name] + block * window, first_unit[name] + (block + 1) * window):
                    units.write(w, u)
                spent[name][0] += time.perf_counter() - t0
                spent[name][1] += time.process_time() - c0
    shutil.rmtree(copy)
    shutil.rmtree(work / "commit-empty")
    return {"held": held, "wall": spent["big"][0] / spent["empty"][0], "cpu": spent["big"][1] / spent["empty"][1]}


def _spread(xs: list[float]) -> str:
    return f"{min(xs):.3g} / {statistics.median(xs):.3g} / {max(xs):.3g}"


def bench_reads(sharded: Path, one: Path, repeats: int, n_single: int = 20000, n_batch: int = 300) -> None:
    from dompre.data.store import SliceStore
    a, b = SliceStore(sharded), SliceStore(one)
    n = len(a)
    t0 = time.perf_counter()  # a reader opens (and checks) each shard on its first read, once per process
    for start in a._starts:
        a[start]
    opened = time.perf_counter() - t0
    b[0]
    single, gather = {"sharded": [], "one": []}, {"sharded": [], "one": []}
    for r in range(repeats):
        rng = np.random.default_rng(r)
        idx = rng.integers(0, n, n_single)
        batches = rng.integers(0, n, (n_batch, 64))
        spent = {("single", "sharded"): 0.0, ("single", "one"): 0.0, ("gather", "sharded"): 0.0,
                 ("gather", "one"): 0.0}
        for block in range(10):  # the two stores take turns in blocks, so contention hits both alike
            for name, st in (("one", b), ("sharded", a)) if (r + block) % 2 else (("sharded", a), ("one", b)):
                t0 = time.perf_counter()
                for i in idx[block::10]:
                    st[int(i)]
                spent["single", name] += time.perf_counter() - t0
                t0 = time.perf_counter()
                for bt in batches[block::10]:
                    st.images(bt)
                spent["gather", name] += time.perf_counter() - t0
        for name in ("sharded", "one"):
            single[name].append(spent["single", name] / n_single * 1e6)
            gather[name].append(spent["gather", name] / n_batch * 1e3)
    rs = [x / y for x, y in zip(single["sharded"], single["one"])]
    rg = [x / y for x, y in zip(gather["sharded"], gather["one"])]
    print(f"random single read  {len(a._names)} shards: {_spread(single['sharded'])} us   one shard: "
          f"{_spread(single['one'])} us   ratio {_spread(rs)} (goal <= 1.5; every shard opened before: "
          f"{opened * 1e3:.1f} ms for the first read of each, once per process)")
    print(f"batch gather of 64  {len(a._names)} shards: {_spread(gather['sharded'])} ms   one shard: "
          f"{_spread(gather['one'])} ms   ratio {_spread(rg)}")


def _rss_mb(pid: int | None = None) -> float:
    import psutil
    return psutil.Process(pid).memory_info().rss / 2 ** 20


def phase_meta(path: Path) -> dict:
    """(fresh process) time and resident memory added by one column, one item and the whole table."""
    import gc

    import pandas  # noqa: F401  (imported before measuring)
    import pyarrow.parquet  # noqa: F401

    from dompre.data.store import SliceStore
    out = {}
    st = SliceStore(path)
    r0 = _rss_mb()
    t0 = time.perf_counter()
    col = st.columns(["split"])
    out["column_s"], out["column_mb"] = time.perf_counter() - t0, _rss_mb() - r0
    t0 = time.perf_counter()
    for i in np.random.default_rng(0).integers(0, len(st), 50):
        st.item_meta(int(i))
    out["item_ms"] = (time.perf_counter() - t0) / 50 * 1e3
    del col
    st = SliceStore(path)
    gc.collect()
    r0 = _rss_mb()
    t0 = time.perf_counter()
    table = st.meta
    out["table_s"], out["table_mb"], out["rows"] = time.perf_counter() - t0, _rss_mb() - r0, len(table)
    return out


def phase_loader(unlabeled: Path, labeled: Path, size: int, workers: int, steps: int) -> dict:
    """(fresh process) peak RSS / PSS of main and workers over ``steps`` student loader steps."""
    import psutil
    import torch

    from dompre.data.store import SliceStore
    from dompre.train.config import PseudoConfig, StudentConfig
    from dompre.train.pseudo_label import PseudoLabels, write_chunk
    from dompre.train.student import build_loaders, noise_transform, pseudo_rows

    torch.set_num_threads(1)
    unl, lab = SliceStore(unlabeled), SliceStore(labeled)
    pl_dir = unlabeled.parent / f"{unlabeled.name}-pseudo"
    if not (pl_dir / "index.json").is_file():  # pseudo-labels as the teacher writes them (60 bytes an input)
        rng = np.random.default_rng(0)
        for s in range(0, len(unl), 65536):
            e = min(s + 65536, len(unl))
            idx = np.stack([rng.permutation(LABELS)[:15] for _ in range(64)])[np.arange(e - s) % 64]
            write_chunk(pl_dir, s, e, idx, rng.random((e - s, 15)).astype(np.float16))
        (pl_dir / "index.json").write_text(json.dumps({"num_inputs": len(unl), "chunk_size": 65536, "top_k": 15,
                                                       "label_names": [f"l{j}" for j in range(LABELS)]}))
    rows, targets, weights, _ = pseudo_rows(PseudoLabels(pl_dir), PseudoConfig(threshold=0.5), None)
    split = lab.columns(["split"])["split"].to_numpy()
    data = build_loaders(lab, np.flatnonzero(split == "train"), lab.labels, labeled_batch=16, seed=0, stage=1,
                         num_workers=workers, transform=noise_transform(StudentConfig(), size),
                         unlabeled_store=unl, pseudo_rows_=rows, pseudo_targets=targets, pseudo_batch=16,
                         pseudo_weights=weights)
    me = psutil.Process()
    peak = {"main_rss": 0.0, "workers_rss": 0.0, "main_pss": 0.0, "workers_pss": 0.0, "total_pss": 0.0}
    held = [lab.labels, *vars(targets).values()] + [a for sp in data.samplers for a in (sp.rows, sp.p)]
    unique = {id(a): a for a in held if isinstance(a, np.ndarray)}.values()  # a shared array counts once
    peak["per_input_mb"] = sum(a.nbytes for a in unique) / 2 ** 20  # targets' arrays, sampled rows and weights
    stop, first = threading.Event(), threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                kids = me.children(recursive=True)
                m = me.memory_full_info()
                ks = [k.memory_full_info() for k in kids]
            except psutil.Error:
                continue
            peak["main_rss"] = max(peak["main_rss"], m.rss / 2 ** 20)
            peak["main_pss"] = max(peak["main_pss"], m.pss / 2 ** 20)
            peak["workers_rss"] = max(peak["workers_rss"], sum(k.rss for k in ks) / 2 ** 20)
            peak["workers_pss"] = max(peak["workers_pss"], sum(k.pss for k in ks) / 2 ** 20)
            peak["total_pss"] = max(peak["total_pss"], (m.pss + sum(k.pss for k in ks)) / 2 ** 20)
            first.set()
            stop.wait(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    first.wait()  # main is sampled once before its workers are forked (and share, so split, its pages)
    done, t0 = 0, time.perf_counter()
    while done < steps:
        for sampler in data.samplers:
            sampler.set_epoch(done // data.steps_per_epoch)
        for _ in zip(*data.loaders):
            done += 1
            if done >= steps:
                break
    peak["steps_per_s"] = steps / (time.perf_counter() - t0)
    stop.set()
    thread.join()
    return peak


def _child(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, *args], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the paper's input count")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--parts", nargs="+", default=["write", "read", "meta", "loader"],
                   choices=["write", "read", "meta", "loader"], help="what to measure (the stores are always written)")
    p.add_argument("--dir", default=None, help="where the stores go (default: a temporary folder, removed)")
    p.add_argument("--phase", choices=["meta", "loader"], help=argparse.SUPPRESS)
    p.add_argument("--paths", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase == "meta":
        print(json.dumps(phase_meta(Path(args.paths[0]))))
        return
    if args.phase == "loader":
        print(json.dumps(phase_loader(Path(args.paths[0]), Path(args.paths[1]), args.size, args.workers,
                                      args.steps)))
        return

    root = Path(tempfile.mkdtemp(prefix="bench_store-", dir=args.dir))
    try:
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start (a shared machine: other "
              f"jobs contend for the cores and the disk); inputs uint8 3x{args.size}x{args.size}")
        sizes = {}
        for tag, frac in (("tenth", args.scale / 10), ("full", args.scale)):
            n_u, n_l = int(UNLABELED * frac), int(LABELED * frac)
            for (kind, (per_unit, labels)), n in zip(KINDS.items(), (n_u, n_l)):
                rs = []
                for r in range(args.repeats if "write" in args.parts else 1):  # the first copy is kept
                    path = root / (f"{kind}-{tag}" if r == 0 else "scratch")
                    rs.append(write_store(path, n, args.size, per_unit, labels, args.shard_size))
                    shutil.rmtree(root / "scratch", ignore_errors=True)
                print(f"write {kind:9s} {tag:5s}: {n:7d} inputs {rs[0]['units']:6d} units, "
                      f"{_spread([r['items_per_s'] for r in rs])} inputs/s; last/first {rs[0]['window']} units: "
                      f"wall {_spread([r['last_first'] for r in rs])}, CPU {_spread([r['cpu_last_first'] for r in rs])}"
                      f" (goal <= 1.2); full GCs {_spread([r['full_gcs'] for r in rs])}, "
                      f"{_spread([r['full_gc_s'] for r in rs])} s")
            sizes[tag] = (n_u, n_l)
        for kind, (per_unit, labels) in KINDS.items() if "write" in args.parts else ():
            per_shard = max(1, args.shard_size // per_unit)
            window = -(-500 // per_shard) * per_shard  # whole shards, at least 500 units
            cs = [commit_cost(root / f"{kind}-full", root, args.size, per_unit, labels, args.shard_size, window,
                              blocks=6) for _ in range(args.repeats)]
            print(f"commit {kind:9s}: {window} units into a store of {cs[0]['held']} units / into an empty one, "
                  f"6 turns each, alternated: wall {_spread([c['wall'] for c in cs])}, CPU "
                  f"{_spread([c['cpu'] for c in cs])} (goal <= 1.2)")
        if "read" in args.parts:
            one = write_store(root / "one-shard", sizes["full"][0], args.size, 16, 0, 1 << 30)
            print(f"write one-shard store: {one['items_per_s']:.0f} inputs/s (baseline for reads)")
            bench_reads(root / "unlabeled-full", root / "one-shard", args.repeats)
            shutil.rmtree(root / "one-shard")
        for kind in KINDS if "meta" in args.parts else ():
            ms = [_child("--phase", "meta", "--paths", str(root / f"{kind}-full")) for _ in range(args.repeats)]
            print(f"meta {kind:9s} ({ms[0]['rows']} rows): one column {_spread([m['column_s'] for m in ms])} s "
                  f"+{_spread([m['column_mb'] for m in ms])} MB; one item {_spread([m['item_ms'] for m in ms])} "
                  f"ms; whole table {_spread([m['table_s'] for m in ms])} s +{_spread([m['table_mb'] for m in ms])}"
                  " MB")
        runs: dict[str, list[dict]] = {"tenth": [], "full": []}
        for _ in range(args.repeats if "loader" in args.parts else 0):
            for tag in ("tenth", "full"):
                runs[tag].append(_child("--phase", "loader", "--size", str(args.size), "--workers",
                                        str(args.workers), "--steps", str(args.steps), "--paths",
                                        str(root / f"unlabeled-{tag}"), str(root / f"labeled-{tag}")))
        for tag in ("tenth", "full") if "loader" in args.parts else ():
            rs = runs[tag]
            print(f"loader {tag:5s} ({sizes[tag][0]} + {sizes[tag][1]} inputs, {args.workers} workers, "
                  f"{args.steps} steps): peak RSS main {_spread([r['main_rss'] for r in rs])} MB, workers "
                  f"{_spread([r['workers_rss'] for r in rs])} MB; PSS main {_spread([r['main_pss'] for r in rs])}"
                  f" MB, workers {_spread([r['workers_pss'] for r in rs])} MB; "
                  f"{_spread([r['steps_per_s'] for r in rs])} steps/s; PSS of all processes together "
                  f"{_spread([r['total_pss'] for r in rs])} MB; per-input arrays the loaders hold (targets, "
                  f"sampled rows and weights) {rs[0]['per_input_mb']:.1f} MB")
        for key in ("main_rss", "workers_rss", "main_pss", "workers_pss", "total_pss") \
                if "loader" in args.parts else ():
            ratio = [f[key] / t[key] for f, t in zip(runs["full"], runs["tenth"])]
            print(f"loader {key}: full / tenth {_spread(ratio)} (goal <= 1.1)")
        print(f"load average {os.getloadavg()[0]:.2f} at the end")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
