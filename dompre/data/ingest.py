"""The DICOM ingest job: a folder tree of CT series -> a SliceStore of 3-slice inputs, parallel and resumable.

Each series is one work unit of the store (:class:`dompre.data.store.StoreWriter`), keyed by its
SeriesInstanceUID: a rerun of the same command skips the series already committed, redoes the ones a
killed run left unfinished, and never duplicates an input. Bad input is skipped with its reason and the run
goes on; ``STORE_DIR/report.json`` lists every series (``ok`` / ``skipped`` + reason) and every unusable
file. Bad configuration (missing input, unwritable store, bad option) raises at once.
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import re
import signal
import threading
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from dompre.data.dicom import SeriesError, SeriesInfo, group_headers, list_files, read_series, scan_file
from dompre.data.prep import PrepConfig, prepare_volume
from dompre.data.store import StoreWriter, write_report
from dompre.errors import UserError
from dompre.recipes import load_recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestRecipe:
    """``dompre ingest dicom --recipe R``: how series become inputs and how the store is sharded."""
    prep: PrepConfig = field(default_factory=PrepConfig)  # window, crop, size, stride, slice interval, min slices
    shard_size: int = 1024                                  # inputs per shard file (~200 MB at 256x256)

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise UserError(f"shard_size = {self.shard_size!r} must be >= 1")


def load_ingest_recipe(path: str | Path | None = None, overrides: tuple[str, ...] = ()) -> IngestRecipe:
    """Read an ingest recipe (YAML with ``prep:`` and ``shard_size``); None gives the defaults."""
    return load_recipe(path, IngestRecipe, overrides)


class _Buffers:
    """Grow-only scratch arrays reused from series to series in one process. A fresh volume-sized array per
    series costs a page fault per 4 KiB on first touch (on VMs that hand free memory back to the host,
    about 1 ms per MB, as much as the decoding); reused, the same memory stays mapped."""

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, name: str) -> Callable[..., np.ndarray]:
        def alloc(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            buf = self._bufs.get(name)
            if buf is None or buf.nbytes < nbytes:
                buf = self._bufs[name] = np.empty(nbytes, np.uint8)
            return buf[:nbytes].view(dtype).reshape(shape)
        return alloc

    def clear(self) -> None:
        self._bufs.clear()


_BUFFERS = _Buffers()


def process_series(info: SeriesInfo, cfg: PrepConfig, root: str) -> dict[str, Any]:
    """Read and prepare one series; returns a result dict (status ok with stacks and metas, or skipped + reason)."""
    res: dict[str, Any] = {"series_uid": info.series_uid, "patient": info.patient, "study_uid": info.study_uid,
                           "folder": _rel(os.path.dirname(info.files[0]), root), "n_files": info.n_files,
                           "status": "skipped", "reason": "", "notes": [], "n_slices": 0, "n_inputs": 0}
    try:
        if info.modality != "CT":
            raise SeriesError(f"modality {info.modality or 'missing'}, not CT")
        vol = read_series(info, alloc=_BUFFERS.get("stored"))  # HU are never made: windowing rescales
        res["notes"] = vol.meta["notes"]
        res["dropped"] = [{"file": _rel(f, root), "reason": why} for f, why in vol.meta["dropped"]]
        n = vol.stored.shape[0]
        res["n_slices"] = n
        if n < cfg.min_slices:
            raise SeriesError(f"too short: {n} slices < min_slices {cfg.min_slices}")
        z = np.asarray(vol.meta["z"])
        boxes: list = []
        stacks, zi = prepare_volume(vol.stored, vol.spacing, cfg, z=z, window=vol.meta["window"],
                                    rescale=(vol.slope, vol.intercept), alloc=_BUFFERS.get("body"), boxes=boxes)
    except SeriesError as e:
        res["reason"] = str(e)
        return res
    except Exception as e:  # noqa: BLE001 - one broken series must never stop the batch
        log.warning("series %s failed: %r", info.series_uid, e)
        res["reason"] = f"error: {type(e).__name__}: {e}"
        return res
    win = vol.meta["window"] if (cfg.window_source == "series" and vol.meta["window"]) else cfg.window
    dz = cfg.slice_interval if cfg.slice_interval is not None else vol.spacing[0]
    files = vol.meta["files"]
    metas = [{"source": "dicom", "series_uid": info.series_uid, "patient": info.patient,
              "study_uid": info.study_uid, "z": float(np.interp(k, np.arange(n), z)), "z_index": float(k),
              "spacing": [float(dz), vol.spacing[1], vol.spacing[2]], "window": [float(win[0]), float(win[1])],
              "file": _rel(files[int(round(k))], root), "body_box": [int(v) for v in box]}
             for k, box in zip(zi, boxes)]
    res.update(status="ok", stacks=stacks, metas=metas, n_inputs=len(metas))
    return res


def _rel(path: str | Path, root: str) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return str(path)


def _scan_one(path: Path) -> tuple[Path, Any, str]:
    try:
        return (path, *scan_file(path))
    except MemoryError:  # sizes are checked before allocating, so only a machine out of memory gets here
        return path, None, "out of memory while reading its header"


def _scan_chunk(paths: list[Path]) -> list[tuple[Path, Any, str]]:
    return [_scan_one(p) for p in paths]


def _exit_with_parent(parent: int) -> None:
    """End this worker when the ingest process dies, even by ``kill -9`` (which runs no cleanup in it):
    Linux sends the worker SIGKILL (PR_SET_PDEATHSIG); elsewhere a thread watches the parent's pid."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)
        threading.Thread(target=watch, daemon=True, name="dompre-parent-watch").start()
    if os.getppid() != parent:  # it died before the signal was set up
        os._exit(1)


def worker_init(parent: int) -> None:
    """Initializer of ingest pool workers: end with the parent (:func:`_exit_with_parent`), one torch thread."""
    _exit_with_parent(parent)
    torch.set_num_threads(1)


def check_workers(workers: int) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"workers = {workers!r} must be an integer >= 1")


def worker_pool(workers: int) -> ProcessPoolExecutor | None:
    """The ingest jobs' process pool (None for ``workers == 1``): workers end with this process and use one torch
    thread each (:func:`worker_init`)."""
    check_workers(workers)
    return ProcessPoolExecutor(workers, initializer=worker_init, initargs=(os.getpid(),)) if workers > 1 else None


def _check_store_dir(store_dir: Path) -> None:
    try:
        store_dir.mkdir(parents=True, exist_ok=True)
        probe = store_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"store folder {store_dir} is not writable ({e.strerror}); choose a writable "
                              f"STORE_DIR") from None


def _scan(files: list[Path], pool: ProcessPoolExecutor | None, workers: int, progress: bool):
    step = max(16, min(256, -(-len(files) // (4 * workers))))  # >= 4 chunks a worker, so they end together
    chunks = [files[i:i + step] for i in range(0, len(files), step)]
    results = pool.map(_scan_chunk, chunks) if pool else map(_scan_chunk, chunks)
    good, bad = [], []
    with tqdm(total=len(files), desc="scan headers", unit="file", disable=not progress, leave=False) as bar:
        for chunk in results:
            for path, header, reason in chunk:
                (good.append((path, header)) if header else bad.append((path, reason)))
            bar.update(len(chunk))
    return group_headers(good), bad


def _results(todo: list[SeriesInfo], cfg: PrepConfig, root: str, pool: ProcessPoolExecutor | None,
             workers: int) -> Iterator[dict]:
    """Process series longest first (so no worker is left with a long series at the end), at most 2 per worker
    in flight so memory stays bounded, and yield them in that fixed order: the store's item order then does
    not depend on the number of workers or on which finished first."""
    order = sorted(todo, key=lambda s: (-s.n_files, s.series_uid))
    if pool is None:
        for info in order:
            yield process_series(info, cfg, root)
        return
    running: deque = deque()
    for info in order:
        running.append(pool.submit(process_series, info, cfg, root))
        if len(running) >= 2 * workers:
            yield running.popleft().result()
    while running:
        yield running.popleft().result()


def _reason_kind(reason: str) -> str:
    return re.split(r"[:(]", reason, maxsplit=1)[0].strip() or reason


def ingest_dicom(input_dir: str | Path, store_dir: str | Path, *, workers: int = 1,
                 recipe: IngestRecipe | None = None, progress: bool = True) -> dict[str, Any]:
    """Ingest every CT series under ``input_dir`` into the SliceStore ``store_dir`` (resuming it).

    Args:
        input_dir: root of a DICOM tree (any folder layout).
        store_dir: store folder; created, or continued when it holds a store made with the same recipe.
        workers: processes (1 = in this process).
        recipe: preparation settings (default :class:`IngestRecipe()`).
        progress: show tqdm bars for series and slices.

    Returns:
        The summary written into ``report.json`` (counts of ok/skipped series, inputs, reasons, report path).

    Raises:
        FileNotFoundError: ``input_dir`` is missing. PermissionError: ``store_dir`` is not writable.
        ValueError: bad option, or the store was made with other settings.
    """
    check_workers(workers)
    recipe = recipe or IngestRecipe()
    input_dir, store_dir = Path(input_dir), Path(store_dir)
    files = list_files(input_dir)
    if not files:
        raise UserError(f"input folder {input_dir} holds no files (hidden ones aside); pass the root of the "
                         f"DICOM download")
    _check_store_dir(store_dir)
    info = {"source": "dicom", "prep": dataclasses.asdict(recipe.prep)}
    root = str(input_dir)
    pool = worker_pool(workers)
    try:
        series, bad = _scan(files, pool, workers, progress)
        with StoreWriter(store_dir, image_size=recipe.prep.size, shard_size=recipe.shard_size, info=info) as w:
            todo = [s for s in series if not w.is_done(s.series_uid)]
            resumed = len(series) - len(todo)
            bar_series = tqdm(total=len(series), initial=resumed, desc="series", unit="series",
                              disable=not progress, position=0)
            bar_slices = tqdm(total=sum(s.n_files for s in todo), desc="slices", unit="slice",
                              disable=not progress, position=1, leave=False)
            with bar_series, bar_slices:
                for res in _results(todo, recipe.prep, root, pool, workers):
                    stacks, metas = res.pop("stacks", None), res.pop("metas", None)
                    if stacks is not None:
                        for image, meta in zip(stacks, metas):
                            w.add(image, meta=meta)
                    w.commit_unit(res.pop("series_uid"), info=res)
                    bar_series.update(1)
                    bar_slices.update(res["n_files"])
            units = w.units
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        _BUFFERS.clear()
    return _write_report(store_dir, input_dir, series, bad, units, recipe, resumed)


def _write_report(store_dir: Path, input_dir: Path, series: list[SeriesInfo], bad: list[tuple[Path, str]],
                  units: dict[str, dict], recipe: IngestRecipe, resumed: int) -> dict[str, Any]:
    rows = [{"series_uid": s.series_uid, **units.get(s.series_uid, {"status": "missing"})} for s in series]
    files = [{"file": _rel(p, str(input_dir)), "status": "skipped", "reason": r} for p, r in bad]
    dropped = [{"file": d["file"], "status": "dropped", "reason": d["reason"], "series_uid": r["series_uid"]}
               for r in rows for d in r.get("dropped", [])]
    skipped = [r for r in rows if r["status"] != "ok"]
    summary = {"series_ok": len(rows) - len(skipped), "series_skipped": len(skipped),
               "files_skipped": len(files), "files_dropped": len(dropped),
               "inputs": sum(r.get("n_inputs", 0) for r in rows),
               "slices": sum(r.get("n_slices", 0) for r in rows if r["status"] == "ok"),
               "resumed_series": resumed,
               "skip_reasons": dict(Counter(_reason_kind(r.get("reason", "")) for r in skipped + files))}
    report = {"input": str(input_dir.resolve()), "store": str(store_dir.resolve()),
              "recipe": dataclasses.asdict(recipe), "summary": summary, "series": rows, "files": files + dropped}
    return write_report(store_dir, report, summary)
