"""SliceStore: a sharded on-disk store of uint8 (3, H, W) inputs with metadata, labels and exactly-once resume.

Layout of a store folder::

    manifest.json                 version, image_size, label_names, shards [{name, n}], units {key: info}
    shards/shard-000000.npy       uint8 (n, 3, H, W), read with np.load(mmap_mode="r"): no decoding
    shards/shard-000000.jsonl     one JSON metadata object per item
    shards/shard-000000.labels.npy  float32 (n, L), NaN = unknown (only when the store has label_names)

Writing is organised in *work units* (one DICOM series, one DeepLesion lesion batch, ...)::

    with StoreWriter(path, label_names=None) as w:
        for uid in units:
            if w.is_done(uid):
                continue                       # committed by an earlier run
            for image, meta in items_of(uid):
                w.add(image, meta=meta)
            w.commit_unit(uid, info={"status": "ok"})

A shard always holds whole units. It is written to a temporary name, fsynced and renamed, and only then
is the manifest (itself written atomically) updated to list the shard and its units. The manifest is the
only truth: a killed run leaves at most an unlisted shard or ``*.tmp`` file, which readers never see and
the next writer overwrites, and its uncommitted units are simply done again. Units with no items (a
skipped series) are recorded with their info in the manifest too, so a rerun does not redo them.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from dompre._io import write_atomic

MANIFEST = "manifest.json"
MAX_OPEN_SHARDS = 8  # shard maps a reader keeps open (LRU)
REPORT = "report.json"  # an ingest job's list of every unit with its status and skip reason
VERSION = 1
META_DEFAULTS: dict[str, Any] = {"source": "", "series_uid": "", "patient": "", "z": float("nan"),
                                 "spacing": (), "window": (), "split": "", "lesion_idx": -1, "bbox": ()}
_HEADER_LEN = 128  # fixed .npy header length so the shape can be written after streaming the items


def _npy_header(shape: tuple[int, ...]) -> bytes:
    d = "{'descr': '|u1', 'fortran_order': False, 'shape': %r, }" % (tuple(shape),)
    body = d.ljust(_HEADER_LEN - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


def _fsync_replace(tmp: Path, dst: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


def write_report(store_dir: str | Path, report: dict, summary: dict) -> dict:
    """Write an ingest job's ``report.json`` into the store atomically; return ``summary`` plus its path."""
    path = Path(store_dir) / REPORT
    write_atomic(path, json.dumps(report, indent=1).encode())
    return {**summary, "report": str(path)}


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (tuple, list, np.ndarray)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def read_manifest(path: str | Path) -> dict:
    """The manifest of the store at ``path`` (``FileNotFoundError`` naming the folder when absent)."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise FileNotFoundError(f"{path} is not a SliceStore (no {MANIFEST}); run `dompre ingest` to create one")
    return json.loads(f.read_text())


class StoreWriter:
    """Append inputs to a SliceStore in work units, resuming an existing store.

    Args:
        path: store folder (created).
        image_size: H = W of every item.
        label_names: label columns; items then carry ``labels`` (L,) with NaN = unknown.
        shard_size: a shard is written once this many items of committed units are waiting.
        info: JSON-able description of how the store is made (e.g. the recipe); a resumed store must
            match it, so a rerun with other settings cannot mix two kinds of input.
    """

    def __init__(self, path: str | Path, *, image_size: int = 256, label_names: Sequence[str] | None = None,
                 shard_size: int = 1024, info: dict | None = None):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.path = Path(path)
        self.image_size = int(image_size)
        self.label_names = list(label_names) if label_names is not None else None
        self.shard_size = int(shard_size)
        (self.path / "shards").mkdir(parents=True, exist_ok=True)
        for stale in (self.path / "shards").glob("*.tmp"):
            stale.unlink()
        want = {"version": VERSION, "image_size": self.image_size, "label_names": self.label_names,
                "info": json.loads(json.dumps(_jsonable(info or {})))}
        if (self.path / MANIFEST).is_file():
            self.manifest = read_manifest(self.path)
            for key, value in want.items():
                if self.manifest.get(key) != value:
                    raise ValueError(f"{self.path} was written with {key}={self.manifest.get(key)!r}, this run has "
                                     f"{value!r}; use a new STORE_DIR or the original settings")
        else:
            self.manifest = {**want, "shards": [], "units": {}}
        self._pending: dict[str, dict] = {}   # committed units waiting for the next shard
        self._open_unit: list[tuple[np.ndarray, dict, np.ndarray | None]] = []
        self._stream = None
        self._count = 0
        self._metas: list[dict] = []
        self._labels: list[np.ndarray] = []

    # ------------------------------------------------------------------ units
    def is_done(self, key: str) -> bool:
        """True when unit ``key`` is committed in the manifest (or waiting in this writer)."""
        return key in self.manifest["units"] or key in self._pending

    def unit_info(self, key: str) -> dict | None:
        """The info recorded with a committed unit."""
        return self.manifest["units"].get(key, self._pending.get(key))

    @property
    def units(self) -> dict[str, dict]:
        """All committed units with their info (written and pending)."""
        return {**self.manifest["units"], **self._pending}

    def add(self, image: np.ndarray, *, meta: dict | None = None, labels: np.ndarray | None = None) -> None:
        """Add one item (uint8 (3, H, W)) to the current unit; it becomes visible when its unit commits."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.shape != (3, self.image_size, self.image_size):
            raise ValueError(f"StoreWriter.add: expected uint8 (3, {self.image_size}, {self.image_size}), got "
                             f"{image.dtype} {image.shape}")
        lab = None
        if self.label_names is not None:
            lab = np.full(len(self.label_names), np.nan, np.float32) if labels is None else \
                np.asarray(labels, np.float32)
            if lab.shape != (len(self.label_names),):
                raise ValueError(f"labels must have shape ({len(self.label_names)},), got {lab.shape}")
        elif labels is not None:
            raise ValueError("this store has no label_names; pass label_names to StoreWriter to store labels")
        self._open_unit.append((image, {**META_DEFAULTS, **(meta or {})}, lab))

    def commit_unit(self, key: str, info: dict | None = None) -> None:
        """Close unit ``key``: its items (possibly none) go to the shard being written, all together."""
        if self.is_done(key):
            raise KeyError(f"unit {key!r} is already committed in {self.path}")
        for image, meta, lab in self._open_unit:
            self._append(image, meta, lab)
        self._pending[key] = {**_jsonable(info or {}), "n": len(self._open_unit)}
        self._open_unit = []
        if self._count >= self.shard_size:
            self.flush()

    def discard_unit(self) -> None:
        """Drop the items added since the last commit."""
        self._open_unit = []

    # ------------------------------------------------------------------ shards
    def _shard_name(self) -> str:
        return f"shard-{len(self.manifest['shards']):06d}"

    def _append(self, image: np.ndarray, meta: dict, lab: np.ndarray | None) -> None:
        if self._stream is None:
            tmp = self.path / "shards" / f"{self._shard_name()}.npy.tmp"
            self._stream = open(tmp, "wb")
            self._stream.write(b"\0" * _HEADER_LEN)
        self._stream.write(np.ascontiguousarray(image).tobytes())
        self._metas.append(_jsonable(meta))
        if lab is not None:
            self._labels.append(lab)
        self._count += 1

    def flush(self) -> None:
        """Write the waiting items as one shard and record it and its units in the manifest."""
        if not self._pending:
            return
        shards = self.path / "shards"
        name = self._shard_name()
        if self._count:
            f = self._stream
            f.seek(0)
            f.write(_npy_header((self._count, 3, self.image_size, self.image_size)))
            f.flush()
            os.fsync(f.fileno())
            f.close()
            self._stream = None
            os.replace(shards / f"{name}.npy.tmp", shards / f"{name}.npy")
            write_atomic(shards / f"{name}.jsonl",
                          "".join(json.dumps(m) + "\n" for m in self._metas).encode())
            if self.label_names is not None:
                tmp = shards / f"{name}.labels.npy.tmp"
                with open(tmp, "wb") as fh:
                    np.save(fh, np.stack(self._labels).astype(np.float32))
                _fsync_replace(tmp, shards / f"{name}.labels.npy")
            self.manifest["shards"].append({"name": name, "n": self._count})
        self.manifest["units"].update(self._pending)
        write_atomic(self.path / MANIFEST, json.dumps(self.manifest).encode())
        self._pending, self._metas, self._labels, self._count = {}, [], [], 0

    def close(self) -> None:
        """Flush committed units; items of an uncommitted unit are dropped."""
        self._open_unit = []
        self.flush()
        if not (self.path / MANIFEST).is_file():
            write_atomic(self.path / MANIFEST, json.dumps(self.manifest).encode())

    def abort(self) -> None:
        """Drop everything not yet written (used when the job fails; a rerun redoes those units)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._pending, self._open_unit, self._metas, self._labels, self._count = {}, [], [], [], 0

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        self._open_unit = []  # the job failed: keep the units it finished, drop the unfinished one
        try:
            self.flush()
        except OSError:
            self.abort()


class SliceStore:
    """Read a store written by :class:`StoreWriter`: random access by memory map, no decoding.

    Memory held: the metadata table, the label matrix (if any) and the shard offsets; image shards are
    memory-mapped lazily on first access.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        m = read_manifest(self.path)
        self.image_size = int(m["image_size"])
        self.label_names: list[str] | None = m.get("label_names")
        self.info: dict = m.get("info", {})
        self.units: dict[str, dict] = m.get("units", {})
        self._names = [s["name"] for s in m["shards"]]
        sizes = np.array([s["n"] for s in m["shards"]], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)])
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()  # LRU of open shard maps
        self._meta: pd.DataFrame | None = None
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _shard(self, k: int) -> np.ndarray:
        """Shard ``k`` memory-mapped; only the ``MAX_OPEN_SHARDS`` most recent stay mapped, so the pages a
        long pass has read are unmapped behind it and resident memory does not grow with the store."""
        arr = self._maps.get(k)
        if arr is None:
            arr = np.load(self.path / "shards" / f"{self._names[k]}.npy", mmap_mode="r")
            if arr.shape[0] != self._offsets[k + 1] - self._offsets[k]:
                raise ValueError(f"{self.path}: shard {self._names[k]} holds {arr.shape[0]} items, manifest says "
                                 f"{self._offsets[k + 1] - self._offsets[k]}; the store is damaged")
            self._maps[k] = arr
            while len(self._maps) > MAX_OPEN_SHARDS:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(k)
        return arr

    def _locate(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for a store of {n} items")
        idx = np.where(idx < 0, idx + n, idx)
        shard = np.searchsorted(self._offsets, idx, side="right") - 1
        return shard, idx - self._offsets[shard]

    def __getitem__(self, i: int) -> np.ndarray:
        """Item ``i`` as uint8 (3, H, W) (a copy, safe to keep)."""
        shard, local = self._locate(np.asarray([int(i)]))
        return np.array(self._shard(int(shard[0]))[int(local[0])])

    def images(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        """Batched gather: uint8 (n, 3, H, W) for indices ``idx``, reading each shard once in sorted order."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((idx.size, 3, self.image_size, self.image_size), np.uint8)
        shard, local = self._locate(idx)
        for k in np.unique(shard):
            sel = np.flatnonzero(shard == k)
            order = sel[np.argsort(local[sel], kind="stable")]
            out[order] = self._shard(int(k))[local[order]]
        return out

    @property
    def meta(self) -> pd.DataFrame:
        """One row per item: source, series_uid, patient, z, spacing, window, split, lesion_idx, bbox, ..."""
        if self._meta is None:
            rows: list[dict] = []
            for name in self._names:
                with open(self.path / "shards" / f"{name}.jsonl") as f:
                    rows.extend(json.loads(line) for line in f)
            df = pd.DataFrame(rows, columns=None if rows else list(META_DEFAULTS))
            for col in ("spacing", "window", "bbox"):
                if col in df:
                    df[col] = df[col].map(lambda v: tuple(v) if isinstance(v, list) else v)
            self._meta = df
        return self._meta

    @property
    def labels(self) -> np.ndarray | None:
        """float32 (N, L) with NaN = unknown, or None for an unlabeled store."""
        if self.label_names is None:
            return None
        if self._labels is None:
            parts = [np.load(self.path / "shards" / f"{n}.labels.npy") for n in self._names]
            self._labels = np.concatenate(parts) if parts else np.empty((0, len(self.label_names)), np.float32)
        return self._labels

    def dataset(self, indices: Iterable[int] | None = None, transform: Callable | None = None):
        """A torch Dataset over ``indices`` (default all) yielding {"image", "label", "index"}."""
        return SliceDataset(self, indices, transform)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = OrderedDict()  # memory maps are reopened in each DataLoader worker, never pickled
        return state


class SliceDataset(torch.utils.data.Dataset):
    """torch Dataset view of a :class:`SliceStore`: ``{"image": uint8 (3, H, W), "label": float32 (L,), "index"}``.

    Unlabeled stores give an all-NaN label of length 0. ``transform`` is applied to the image tensor.
    """

    def __init__(self, store: SliceStore, indices: Iterable[int] | None = None, transform: Callable | None = None):
        self.store = store
        self.indices = np.arange(len(store)) if indices is None else np.asarray(list(indices), dtype=np.int64)
        self.transform = transform
        labels = store.labels
        self._labels = labels
        self._width = 0 if labels is None else labels.shape[1]

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int) -> dict:
        idx = int(self.indices[i])
        image = torch.from_numpy(self.store[idx])
        if self.transform is not None:
            image = self.transform(image)
        label = (torch.full((self._width,), float("nan")) if self._labels is None
                 else torch.from_numpy(self._labels[idx].copy()))
        return {"image": image, "label": label, "index": idx}
