"""SliceStore: a sharded on-disk store of uint8 (3, H, W) inputs with metadata, labels and exactly-once resume.

Layout of a store folder (version 2)::

    manifest.json                   version, image_size, label_names, info, generation g, shards [{name, n}]
    log-<g>.jsonl                   commits since the manifest was last compacted, one line each:
                                    ``{"shard": {name, n} | null}`` TAB ``{unit key: info}``
    units-<g>.jsonl                 the units compacted into the manifest's generation, one ``[key, info]`` a line
    shards/shard-000000.npy         uint8 (n, 3, H, W) after a fixed 128-byte .npy header; read with ``os.preadv``
    shards/shard-000000.meta.parquet  the items' metadata, one column per key (read column by column)
    shards/shard-000000.labels.npy  float32 (n, L), NaN = unknown (only when the store has label_names)

Writing is organised in *work units* (one DICOM series, one DeepLesion lesion batch, ...)::

    with StoreWriter(path, label_names=None) as w:
        for uid in units:
            if w.is_done(uid):
                continue                       # committed by an earlier run
            for image, meta in items_of(uid):
                w.add(image, meta=meta)
            w.commit_unit(uid, info={"status": "ok"})

A shard always holds whole units. Its files are written to temporary names, fsynced and renamed; only then is
one line naming the shard and its units appended to the log and fsynced. A commit therefore costs the new units
only. The manifest plus the complete lines of its log are the only truth: a killed run leaves at most an unlisted
shard, a ``*.tmp`` file or a torn last log line (no newline), which readers never see and the next writer
overwrites or cuts off, and its uncommitted units are simply done again. Units with no items (a skipped series)
are logged with their info too, so a rerun does not redo them. Closing the writer compacts the log into a new
generation (units file, then manifest, each written atomically; the old generation's files are removed after).

Stores of version 1 (every unit in ``manifest.json``, metadata in ``shards/*.jsonl``) are read as they are; a
writer resuming one upgrades its manifest to version 2 in place (its shards and their metadata stay as written).
"""
from __future__ import annotations

import bisect
import json
import os
import re
import resource
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from dompre._io import atomic_open, write_atomic
from dompre.errors import UserError

MANIFEST = "manifest.json"
REPORT = "report.json"  # an ingest job's list of every unit with its status and skip reason
VERSION = 2
META_DEFAULTS: dict[str, Any] = {"source": "", "series_uid": "", "patient": "", "z": float("nan"),
                                 "spacing": (), "window": (), "split": "", "lesion_idx": -1, "bbox": ()}
_HEADER_LEN = 128  # fixed .npy header length so the shape can be written after streaming the items
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a shard name is a plain file stem inside shards/
_JSON_COLUMNS = b"dompre.json_columns"  # parquet metadata key: columns stored as JSON text (mixed types)


def _max_open_files() -> int:
    """Shard files a reader keeps open: a quarter of this process's descriptor limit (64 to 8192)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 8192 if soft == resource.RLIM_INFINITY else max(64, min(8192, soft // 4))


class OpenFiles:
    """An LRU of read-only file descriptors for positioned reads: ``fd(key)`` opens ``opener(key)`` on first use
    (the path, and an optional check of the open descriptor), at most a quarter of this process's descriptor limit
    stay open (the least recently used are closed), and none is ever pickled: a DataLoader worker opens its own.
    The one descriptor cache of the store's shards and the pseudo-label shards."""

    def __init__(self, opener: Callable[[Any], tuple[Path, Callable[[int], None] | None]]) -> None:
        self.opener = opener
        self.fds: OrderedDict[Any, int] = OrderedDict()
        self.max_open = _max_open_files()

    def fd(self, key: Any) -> int:
        fd = self.fds.get(key)
        if fd is not None:
            if len(self.fds) >= self.max_open:  # order matters only once files are being closed
                self.fds.move_to_end(key)
            return fd
        path, check = self.opener(key)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        if check is not None:
            try:
                check(fd)
            except BaseException:
                os.close(fd)
                raise
        self.fds[key] = fd
        while len(self.fds) > self.max_open:
            os.close(self.fds.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        """Close every open descriptor (files reopen on the next read)."""
        fds, self.fds = self.fds, OrderedDict()
        for fd in fds.values():
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):
            pass

    def __getstate__(self) -> dict:
        return {"opener": self.opener, "fds": OrderedDict(), "max_open": self.max_open}


def _npy_header(shape: tuple[int, ...]) -> bytes:
    d = "{'descr': '|u1', 'fortran_order': False, 'shape': %r, }" % (tuple(shape),)
    body = d.ljust(_HEADER_LEN - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


def write_report(store_dir: str | Path, report: dict, summary: dict) -> dict:
    """Write an ingest job's ``report.json`` into the store atomically; return ``summary`` plus its path."""
    path = Path(store_dir) / REPORT
    write_atomic(path, json.dumps(report, indent=1).encode())
    return {**summary, "report": str(path)}


def _jsonable(v: Any, sequence: type = list) -> Any:
    """``v`` with numpy scalars, arrays and paths made plain; sequences become ``sequence`` (list or tuple)."""
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (tuple, list, np.ndarray)):
        return sequence(_jsonable(x, sequence) for x in v)
    if isinstance(v, Path):
        return str(v)
    return v


def read_manifest(path: str | Path) -> dict:
    """The manifest of the store at ``path`` (``FileNotFoundError`` naming the folder when absent)."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise FileNotFoundError(f"{path} is not a SliceStore (no {MANIFEST}); run `dompre ingest` to create one")
    m = json.loads(f.read_text())
    if int(m.get("version", 1)) > VERSION:
        raise UserError(f"{f}: store version {m['version']} was written by a newer dompre (this one reads up to "
                         f"{VERSION}); upgrade dompre")
    return m


def _check_shard(path: Path, entry: dict) -> dict:
    """A manifest or log shard entry, refused when its name could reach a file outside ``path/shards``."""
    name = entry.get("name") if isinstance(entry, dict) else None
    root = (path / "shards").resolve()
    if not isinstance(name, str) or not _NAME.match(name) or (root / name).resolve().parent != root:
        raise UserError(f"{path / MANIFEST}: shard name {name!r} is not a file of {root}; a store lists only "
                         "its own shards/ files, so this manifest is damaged or not from dompre: rebuild the store")
    return entry


def _log_lines(f: Path) -> tuple[list[bytes], int]:
    """The complete lines of log ``f`` (none when absent) and the byte length they span (torn tail excluded)."""
    try:
        data = f.read_bytes()
    except FileNotFoundError:
        return [], 0
    end = data.rfind(b"\n") + 1
    return data[:end].splitlines(), end


def _read_state(path: Path, with_units: bool) -> tuple[dict, list[dict], dict | None]:
    """(manifest, every committed shard entry, units or None) of a store, from its manifest and log."""
    for _ in range(5):
        m = read_manifest(path)
        if "generation" not in m:  # version 1: everything in the manifest
            shards = [_check_shard(path, s) for s in m["shards"]]
            return m, shards, (m.get("units", {}) if with_units else None)
        gen = int(m["generation"])
        lines, _ = _log_lines(path / f"log-{gen}.jsonl")
        units = _units_file(path / f"units-{gen}.jsonl") if with_units else None
        if int(read_manifest(path)["generation"]) != gen:
            continue  # a writer compacted the log while we read it: read the new generation
        shards = [_check_shard(path, s) for s in m["shards"]]
        for line in lines:
            head, _, body = line.partition(b"\t")
            entry = json.loads(head)
            if entry.get("shard") is not None:
                shards.append(_check_shard(path, entry["shard"]))
            if units is not None:
                units.update(json.loads(body))
        return m, shards, units
    raise RuntimeError(f"{path}: the store kept changing while it was opened; open it again")


def _units_file(f: Path) -> dict:
    if not f.is_file():
        return {}
    return dict(json.loads(line) for line in f.read_bytes().splitlines() if line)


def _meta_table(columns: dict[str, list]):
    """Per-shard metadata (key -> one value per item, None where an item lacks the key) as an Arrow table;
    mixed-type columns are kept as JSON text."""
    import pyarrow as pa

    arrays, as_json = {}, []
    for k, values in columns.items():
        try:
            arrays[k] = pa.array(values)
            if pa.types.is_struct(arrays[k].type):  # dicts: Arrow would add the keys other rows have
                raise pa.ArrowTypeError
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            arrays[k] = pa.array([json.dumps(v) for v in values])
            as_json.append(k)
    return pa.table(arrays).replace_schema_metadata({_JSON_COLUMNS: json.dumps(as_json).encode()})


def _arrow_values(column, is_json: bool) -> list | np.ndarray:
    """One Arrow column as values: lists become tuples, JSON text is decoded, scalars stay numpy."""
    import pyarrow as pa

    if is_json:
        return [_tuples(json.loads(v)) for v in column.to_pylist()]
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return [_tuples(v) for v in column.to_pylist()]
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or column.null_count:
        return column.to_pylist()
    return column.to_numpy()


_PLAIN = frozenset({str, int, float, bool, type(None)})


def _frozen(v: Any) -> Any:
    """``_jsonable(v, tuple)``, with the common cases (a scalar, a list of scalars) taken without recursion.

    Item metadata waits in a writer for its shard as tuples: a tuple of scalars is not tracked by the garbage
    collector, so a shard's worth of waiting items adds nothing that full collections (a pause proportional to
    every object of the process: 0.27 s with pandas and pyarrow loaded) are triggered by or must walk.
    """
    t = type(v)
    if t in _PLAIN:
        return v
    if t is list or t is tuple:
        out = tuple(v)
        if set(map(type, out)) <= _PLAIN:
            return out
    return _jsonable(v, tuple)


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


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
            raise UserError(f"shard_size must be >= 1, got {shard_size}")
        self.path = Path(path)
        self.image_size = int(image_size)
        self.label_names = list(label_names) if label_names is not None else None
        self.shard_size = int(shard_size)
        (self.path / "shards").mkdir(parents=True, exist_ok=True)
        for stale in (self.path / "shards").glob("*.tmp"):
            stale.unlink()
        self._head = {"version": VERSION, "image_size": self.image_size, "label_names": self.label_names,
                      "info": json.loads(json.dumps(_jsonable(info or {})))}
        self._shards: list[dict] = []
        self._units: dict[str, dict] = {}
        self._gen = 0
        self._log = None
        if (self.path / MANIFEST).is_file():
            m, self._shards, units = _read_state(self.path, with_units=True)
            for key, value in self._head.items():
                if key != "version" and m.get(key) != value:
                    raise UserError(f"{self.path} was written with {key}={m.get(key)!r}, this run has "
                                     f"{value!r}; use a new STORE_DIR or the original settings")
            self._units = units or {}
            if "generation" in m:
                self._gen = int(m["generation"])
                self._cut_torn_log()
                self._drop_old_generations()
            else:
                self._compact()  # version 1: move its units out of the manifest (same shards, same units)
        self._pending: dict[str, dict] = {}   # committed units waiting for the next shard
        self._open_unit: list[tuple[np.ndarray, dict, np.ndarray | None]] = []
        self._stream = None
        self._count = 0
        self._meta_columns: dict[str, list] = {}  # the waiting items' metadata, key -> one value per item
        self._labels: list[np.ndarray] = []

    # ------------------------------------------------------------------ units
    def is_done(self, key: str) -> bool:
        """True when unit ``key`` is committed in the store (or waiting in this writer)."""
        return key in self._units or key in self._pending

    def unit_info(self, key: str) -> dict | None:
        """The info recorded with a committed unit."""
        return self._units.get(key, self._pending.get(key))

    @property
    def units(self) -> dict[str, dict]:
        """All committed units with their info (written and pending)."""
        return {**self._units, **self._pending}

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
        return f"shard-{len(self._shards):06d}"

    def _append(self, image: np.ndarray, meta: dict, lab: np.ndarray | None) -> None:
        if self._stream is None:  # the shard grows in a temporary that appears whole when the shard is written
            self._stream = atomic_open(self.path / "shards" / f"{self._shard_name()}.npy", "w+b")
            self._stream.file.write(b"\0" * _HEADER_LEN)
        self._stream.file.write(np.ascontiguousarray(image).tobytes())
        columns = self._meta_columns
        for k, v in meta.items():
            if k not in columns:  # a key earlier items lack: None for them
                columns[k] = [None] * self._count
            columns[k].append(_frozen(v))
        if len(columns) > len(meta):  # keys this item lacks
            for column in columns.values():
                if len(column) == self._count:
                    column.append(None)
        if lab is not None:
            self._labels.append(lab)
        self._count += 1

    def _write_shard(self) -> dict:
        """Write the waiting items as shard files (fsynced, renamed); return the shard's entry."""
        import pyarrow.parquet as pq

        shards = self.path / "shards"
        name = self._shard_name()
        stream, self._stream = self._stream, None
        stream.file.seek(0)
        stream.file.write(_npy_header((self._count, 3, self.image_size, self.image_size)))
        stream.commit()
        with atomic_open(shards / f"{name}.meta.parquet") as fh:
            pq.write_table(_meta_table(self._meta_columns), fh)
        if self.label_names is not None:
            with atomic_open(shards / f"{name}.labels.npy") as fh:
                np.save(fh, np.stack(self._labels).astype(np.float32))
        return {"name": name, "n": self._count, "meta": "parquet"}

    def flush(self) -> None:
        """Write the waiting items as one shard and append it and its units to the log (one fsynced line)."""
        if not self._pending:
            return
        if not (self.path / MANIFEST).is_file():
            self._write_manifest()
        shard = self._write_shard() if self._count else None
        if self._log is None:
            self._log = open(self.path / f"log-{self._gen}.jsonl", "ab")
        self._log.write(json.dumps({"shard": shard}).encode() + b"\t" + json.dumps(self._pending).encode() + b"\n")
        self._log.flush()
        os.fsync(self._log.fileno())
        if shard is not None:
            self._shards.append(shard)
        self._units.update(self._pending)
        self._pending, self._meta_columns, self._labels, self._count = {}, {}, [], 0

    def _write_manifest(self) -> None:
        write_atomic(self.path / MANIFEST, json.dumps({**self._head, "generation": self._gen,
                                                       "shards": self._shards}).encode())

    def _cut_torn_log(self) -> None:
        """Cut a torn last line (a commit killed while being written) off the log before appending to it."""
        log = self.path / f"log-{self._gen}.jsonl"
        _, end = _log_lines(log)
        if log.is_file() and log.stat().st_size != end:
            os.truncate(log, end)

    def _drop_old_generations(self) -> None:
        """Remove log and units files of earlier generations (left when a compaction was killed)."""
        for f in self.path.glob("*-*.jsonl"):
            m = re.fullmatch(r"(log|units)-(\d+)\.jsonl", f.name)
            if m and int(m.group(2)) != self._gen:
                f.unlink(missing_ok=True)

    def _compact(self) -> None:
        """Fold the log into generation g + 1: units file, then manifest (the switch), then drop the old files."""
        if self._log is not None:
            self._log.close()
            self._log = None
        old = self._gen
        self._gen += 1
        write_atomic(self.path / f"units-{self._gen}.jsonl",
                     b"".join(json.dumps([k, v]).encode() + b"\n" for k, v in self._units.items()))
        self._write_manifest()
        for stale in (f"log-{old}.jsonl", f"units-{old}.jsonl"):
            (self.path / stale).unlink(missing_ok=True)

    def close(self) -> None:
        """Flush committed units and compact the log; items of an uncommitted unit are dropped."""
        self._open_unit = []
        self.flush()
        if not (self.path / MANIFEST).is_file():
            self._write_manifest()
        elif self._log is not None or (self.path / f"log-{self._gen}.jsonl").is_file():
            self._compact()

    def abort(self) -> None:
        """Drop everything not yet written (used when the job fails; a rerun redoes those units)."""
        if self._stream is not None:
            self._stream.abort()
            self._stream = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self._pending, self._open_unit, self._meta_columns, self._labels, self._count = {}, [], {}, [], 0

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        self._open_unit = []  # the job failed: keep the units it finished, drop the unfinished one
        try:
            self.close()
        except OSError:
            self.abort()


class SliceStore:
    """Read a store written by :class:`StoreWriter`: random access by positioned reads, no decoding.

    Memory held: the shard offsets, a bounded set of open shard files (one descriptor each, no maps: an item is
    read with ``os.preadv`` at its known byte offset), and what was asked for: metadata columns (:meth:`columns`,
    :attr:`meta`), the label matrix (:attr:`labels`) and the units (:attr:`units`) are read on first use and
    never pickled, so a DataLoader worker receives only the offsets.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        m, shards, _ = _read_state(self.path, with_units=False)
        self.image_size = int(m["image_size"])
        self.label_names: list[str] | None = m.get("label_names")
        self.info: dict = m.get("info", {})
        self._names = [s["name"] for s in shards]
        self._formats = [s.get("meta", "jsonl") for s in shards]
        sizes = np.array([s["n"] for s in shards], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)])
        self._starts: list[int] = self._offsets[:-1].tolist()  # for bisect in single reads
        self._item_bytes = 3 * self.image_size * self.image_size
        self._files = OpenFiles(self._shard_file)  # shard k -> descriptor
        self._cache: dict[str, Any] = {}  # columns, labels and units read so far (dropped when pickled)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    # ------------------------------------------------------------------ images
    def _shard_file(self, k: int) -> tuple[Path, Callable[[int], None]]:
        """Shard ``k``'s .npy and the check of its header and size, for :class:`OpenFiles`."""
        f = self.path / "shards" / f"{self._names[k]}.npy"
        n = int(self._offsets[k + 1] - self._offsets[k])

        def check(fd: int) -> None:
            want = _npy_header((n, 3, self.image_size, self.image_size))
            if os.pread(fd, _HEADER_LEN, 0) != want or os.fstat(fd).st_size != _HEADER_LEN + n * self._item_bytes:
                raise UserError(f"{f}: not a shard of {n} uint8 (3, {self.image_size}, {self.image_size}) items "
                                f"as {self.path / MANIFEST} says; the store is damaged: rebuild it")
        return f, check

    def _read(self, k: int, local: int, out: np.ndarray) -> None:
        """Fill ``out`` (contiguous, ``m`` items) with items ``local .. local + m`` of shard ``k``."""
        got = os.preadv(self._files.fd(k), [out], _HEADER_LEN + local * self._item_bytes)
        if got != out.nbytes:
            raise UserError(f"{self.path}/shards/{self._names[k]}.npy is truncated; rebuild the store")

    def _locate(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for a store of {n} items")
        idx = np.where(idx < 0, idx + n, idx)
        shard = np.searchsorted(self._offsets, idx, side="right") - 1
        return shard, idx - self._offsets[shard]

    def __getitem__(self, i: int) -> np.ndarray:
        """Item ``i`` as uint8 (3, H, W) (a copy, safe to keep)."""
        i = int(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a store of {n} items")
        i += n if i < 0 else 0
        k = bisect.bisect_right(self._starts, i) - 1
        out = np.empty((3, self.image_size, self.image_size), np.uint8)
        self._read(k, i - self._starts[k], out)
        return out

    def images(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        """Batched gather: uint8 (n, 3, H, W) for indices ``idx``; runs of consecutive items are read at once."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((idx.size, 3, self.image_size, self.image_size), np.uint8)
        if not idx.size:
            return out
        shard, local = self._locate(idx)
        order = np.lexsort((local, shard))
        s, loc = shard[order], local[order]
        breaks = np.flatnonzero((np.diff(s) != 0) | (np.diff(loc) != 1)) + 1
        buf = np.empty_like(out)
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, idx.size]):
            self._read(int(s[a]), int(loc[a]), buf[a:b])
        out[order] = buf
        return out

    def close(self) -> None:
        """Close the open shard files (they reopen on the next read)."""
        self._files.close()

    # ------------------------------------------------------------------ metadata
    def _meta_file(self, k: int) -> Path:
        ext = "meta.parquet" if self._formats[k] == "parquet" else "jsonl"
        return self.path / "shards" / f"{self._names[k]}.{ext}"

    def _shard_columns(self, k: int, columns: Sequence[str] | None,
                       row: int | None = None) -> dict[str, list | np.ndarray]:
        """Metadata columns of shard ``k`` (all when ``columns`` is None; absent ones are left out), of every
        item or of item ``row`` alone."""
        f = self._meta_file(k)
        if self._formats[k] != "parquet":  # version 1: one JSON object a line
            lines = f.read_bytes().splitlines()
            rows = [json.loads(line) for line in (lines if row is None else lines[row:row + 1]) if line]
            keys = list(dict.fromkeys(c for r in rows for c in r)) if columns is None else columns
            return {c: [_tuples(r.get(c)) for r in rows] for c in keys if any(c in r for r in rows)}
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        table = pf.read(columns=names if columns is None else [c for c in columns if c in names])
        as_json = set(json.loads((table.schema.metadata or {}).get(_JSON_COLUMNS, b"[]")))
        if row is not None:
            table = table.slice(row, 1)
        return {c: _arrow_values(table.column(c), c in as_json) for c in table.column_names}

    def column_names(self) -> list[str]:
        """Every metadata column of the store (read from the shards' schemas, not their rows)."""
        import pyarrow.parquet as pq

        if "names" not in self._cache:
            names = dict.fromkeys(META_DEFAULTS)
            for k in range(len(self._names)):
                if self._formats[k] == "parquet":
                    names.update(dict.fromkeys(pq.read_schema(self._meta_file(k)).names))
                else:
                    names.update(dict.fromkeys(self._shard_columns(k, None)))
            self._cache["names"] = list(names)
        return list(self._cache["names"])

    def columns(self, names: Sequence[str]) -> pd.DataFrame:
        """Metadata columns ``names`` for every item, reading only those columns (each cached once read).

        A column a shard lacks is filled with its ``META_DEFAULTS`` value (or None).
        """
        names = list(names)
        todo = [c for c in names if f"col:{c}" not in self._cache]
        if todo:
            parts: dict[str, list] = {c: [] for c in todo}
            for k in range(len(self._names)):
                got = self._shard_columns(k, todo)
                n = int(self._offsets[k + 1] - self._offsets[k])
                for c in todo:
                    parts[c].append(got[c] if c in got else [META_DEFAULTS.get(c)] * n)
            for c in todo:
                values = [v for p in parts[c] for v in p] if any(isinstance(p, list) for p in parts[c]) \
                    else (np.concatenate(parts[c]) if parts[c] else [])
                self._cache[f"col:{c}"] = pd.Series(values, dtype=object if not len(values) else None, name=c)
        return pd.DataFrame({c: self._cache[f"col:{c}"] for c in names})

    def item_meta(self, i: int) -> dict:
        """Metadata of item ``i`` alone, read from its shard's metadata file (not the store's table)."""
        shard, local = self._locate(np.asarray([int(i)]))
        got = self._shard_columns(int(shard[0]), None, int(local[0]))
        return {c: (v[0].item() if isinstance(v, np.ndarray) else v[0]) for c, v in got.items()}

    @property
    def meta(self) -> pd.DataFrame:
        """The whole metadata table, one row per item: source, series_uid, patient, z, spacing, window, split,
        lesion_idx, bbox, ... (prefer :meth:`columns` or :meth:`item_meta`, which read only what they need)."""
        return self.columns(self.column_names())

    @property
    def labels(self) -> np.ndarray | None:
        """float32 (N, L) with NaN = unknown, or None for an unlabeled store."""
        if self.label_names is None:
            return None
        if "labels" not in self._cache:
            self._cache["labels"] = self.label_columns(range(len(self.label_names)))
        return self._cache["labels"]

    def _labels_file(self, k: int) -> Path:
        return self.path / "shards" / f"{self._names[k]}.labels.npy"

    def label_columns(self, cols: Sequence[int]) -> np.ndarray:
        """float32 (N, len(cols)): the label columns ``cols``, read shard by shard; the whole (N, L) matrix is
        neither built nor kept (a run training on a subset of a store's labels holds only that subset)."""
        if self.label_names is None:
            raise UserError(f"{self.path} has no labels")
        cols = list(cols)
        if "labels" in self._cache:
            return self._cache["labels"][:, cols]
        parts = [np.load(self._labels_file(k), mmap_mode="r")[:, cols] for k in range(len(self._names))]
        return np.concatenate(parts) if parts else np.empty((0, len(cols)), np.float32)

    def item_labels(self, i: int) -> np.ndarray | None:
        """float32 (L,) labels of item ``i`` alone (NaN = unknown), read from its shard; None when unlabeled."""
        if self.label_names is None:
            return None
        shard, local = self._locate(np.asarray([int(i)]))
        return np.array(np.load(self._labels_file(int(shard[0])), mmap_mode="r")[int(local[0])])

    @property
    def units(self) -> dict[str, dict]:
        """Every committed unit with its info (read on first use; it can be large)."""
        if "units" not in self._cache:
            self._cache["units"] = _read_state(self.path, with_units=True)[2]
        return self._cache["units"]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state


# ------------------------------------------------------------------ how a store's inputs were made
SLICES = ("z-1", "z", "z+1")  # the three input channels


def store_preparation(store_dir: str | os.PathLike) -> dict[str, Any] | None:
    """How the inputs of a SliceStore were made, from its manifest: HU window, size, slice convention, stride.

    Returns the ingest recipe's ``prep`` section plus ``source``, ``slices`` (the three channels),
    ``neighbours`` / ``interval_mm`` (DeepLesion stores) and ``store`` (the folder), for ``info['preparation']``;
    None for a store whose manifest records no preparation (not written by ``dompre ingest``).
    """
    manifest = read_manifest(store_dir)
    desc = manifest.get("info") or {}
    prep = desc.get("prep")
    if not isinstance(prep, dict) or "window" not in prep:
        return None
    out = dict(prep, source=desc.get("source"), slices=list(SLICES), store=str(store_dir),
               image_size=manifest.get("image_size"))
    for key in ("neighbours", "interval_mm"):
        if key in desc:
            out[key] = desc[key]
    return out


def run_preparation(labeled_store: str | os.PathLike, unlabeled_store: str | os.PathLike) -> dict[str, Any]:
    """``info`` entries for a model trained on two stores: ``preparation`` (the labeled store's, which the metrics
    are measured on) and, when the unlabeled store was made otherwise, ``unlabeled_preparation``."""
    labeled, unlabeled = store_preparation(labeled_store), store_preparation(unlabeled_store)
    out: dict[str, Any] = {"preparation": labeled}
    same = ("window", "window_source", "size", "crop", "keep_aspect", "stride", "slice_interval", "neighbours")
    if unlabeled != labeled and (labeled is None or unlabeled is None
                                 or any(labeled.get(k) != unlabeled.get(k) for k in same)):
        out["unlabeled_preparation"] = unlabeled
    return out
