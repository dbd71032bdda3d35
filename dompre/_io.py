"""Atomic file writes shared by every stage: a killed job never leaves a half-written file under its name.

:func:`atomic_open` is the one mechanism: it writes a hidden temporary file beside the target
(``.<name>.<random>.tmp``, with the permissions ``open()`` would give), and on success flushes, fsyncs and
renames it over the target; on any failure (or :meth:`AtomicFile.abort`) the temporary is removed and the target
is untouched. Writers that stream (store shards, CSV rows, DICOM files, ``np.savez``, parquet) write into its
file object; :func:`write_atomic` is the one-shot form for bytes or text already in memory.

``fsync=False`` skips the fsync: readers and a killed process still see the whole file or none, and only a crash
of the machine before the kernel writes the data back may leave the new name empty. It is for many small files
that are cheap to regenerate (the synthetic cohort's slices, where an fsync each doubled the wall time).
"""
from __future__ import annotations

import io
import os
import secrets
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class AtomicFile:
    """A file that appears under ``path`` only when :meth:`commit` runs (on leaving a ``with`` block cleanly).

    Usable as a context manager, or held open across calls (a store's growing shard) and finished with
    :meth:`commit` or :meth:`abort`. ``file`` is the open temporary (binary, or text with ``newline=""``).
    """

    def __init__(self, path: str | os.PathLike, mode: str = "wb", *, fsync: bool = True, **open_kwargs) -> None:
        if mode not in ("wb", "w", "w+b"):
            raise ValueError(f"atomic_open mode {mode!r}: use 'wb', 'w+b' or 'w'")
        self.path = Path(path)
        self.fsync = fsync
        fd, self.tmp = _create_temporary(self.path)
        if mode == "w":
            open_kwargs.setdefault("newline", "")
            open_kwargs.setdefault("encoding", "utf-8")
        try:
            self.file: IO = os.fdopen(fd, mode, **open_kwargs)
        except BaseException:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)
            raise
        self.done = False

    def commit(self) -> Path:
        """Flush, fsync (unless ``fsync=False``) and rename the temporary over ``path``."""
        if self.done:
            raise RuntimeError(f"{self.path}: atomic write already finished")
        try:
            self.file.flush()
            if self.fsync:
                os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self.done = True
        return self.path

    def abort(self) -> None:
        """Close and remove the temporary; ``path`` keeps whatever it held before."""
        self.done = True
        try:
            self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> IO:
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        elif not self.done:
            self.abort()


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new ``.<name>.<random>.tmp`` beside ``path``, opened read-write. Its mode is 0o666 less the umask, as
    ``open()`` gives (``tempfile.mkstemp``'s 0o600 would hide cohorts and checkpoints from other users)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def atomic_open(path: str | os.PathLike, mode: str = "wb", *, fsync: bool = True, **open_kwargs) -> AtomicFile:
    """``with atomic_open(path) as f: ...``: ``f`` is a temporary beside ``path``, renamed over it on success."""
    return AtomicFile(path, mode, fsync=fsync, **open_kwargs)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically (:func:`atomic_open`)."""
    if not isinstance(data, (bytes, bytearray, memoryview, str)):
        raise TypeError(f"write_atomic takes bytes or str, not {type(data).__name__}")
    with atomic_open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def save_figure(fig: Figure, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """Render a matplotlib figure to PNG, write it atomically, and close the figure."""
    import matplotlib.pyplot as plt  # lazy: matplotlib costs ~0.3 s to import and most jobs plot nothing

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())
