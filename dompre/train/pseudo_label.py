"""Pseudo-labels: the selection rule, compact storage, and the resumable labeling pass over an unlabeled store.

Rule (seed paper): per input, keep a label when its probability is > ``threshold`` and it is among the ``top_k``
most probable labels; then, walking the kept labels from the most to the least confident, drop a label that is
exclusive (ontology) with a label already kept, so of an exclusive pair the more confident one stays.

Storage, per iteration folder: the un-noised teacher's top-k per input, as ``.npy`` shards covering global input
ranges ``[start, end)`` of the store, ``topk-<start>-<end>.idx.npy`` (int16 label indices, most confident first)
and ``.prob.npy`` (float16 probabilities), written atomically; ``index.json`` marks the stage done. The rule is
applied when reading (:class:`PseudoLabels`), so threshold/top_k/soft can be changed without relabeling.
Reading holds no per-input array: the shards stay on disk, the parent's passes load them one at a time and a
loader worker reads an input's top-k with two positioned reads (see :class:`PseudoLabels`).
Shards are aligned to ``chunk_size`` in global positions and every rank labels one contiguous run of shards, so
the stored result is the same for any number of processes, and a rerun skips shards already on disk
(exactly-once: a shard is either complete under its final name or absent).
"""
from __future__ import annotations

import bisect
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from accelerate.utils import tqdm

from dompre._io import atomic_open, write_atomic
from dompre.data.store import OpenFiles
from dompre.errors import UserError
from dompre.train.engine import Items, outputs

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the rule
def exclusive_matrix(pairs: Sequence[tuple[int, int]], num_labels: int) -> np.ndarray:
    """Symmetric (L, L) bool matrix of exclusive label pairs."""
    m = np.zeros((num_labels, num_labels), dtype=bool)
    for i, j in pairs:
        m[i, j] = m[j, i] = True
    return m


def topk(probs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k labels of ``probs`` (N, L), most confident first: (int16 indices, float16 probabilities)."""
    k = min(k, probs.shape[1])
    val, idx = torch.topk(probs.float(), k, dim=1, sorted=True)
    return idx.cpu().numpy().astype(np.int16), val.cpu().numpy().astype(np.float16)


def select_labels(idx: np.ndarray, prob: np.ndarray, threshold: float | np.ndarray, top_k: int,
                  exclusive: np.ndarray | None = None) -> np.ndarray:
    """The pseudo-label rule on stored top-k rows.

    Args:
        idx: (N, K) label indices, most confident first (K >= top_k, or fewer labels exist).
        prob: (N, K) their probabilities.
        threshold: keep labels with probability strictly above it (a float, or one value per label).
        top_k: only the first ``top_k`` columns can be kept.
        exclusive: (L, L) bool exclusivity matrix, or None.

    Returns:
        (N, K) bool, True where the label is kept.
    """
    idx = np.asarray(idx).astype(np.int64)
    prob = np.asarray(prob, dtype=np.float32)
    thr = np.asarray(threshold, dtype=np.float32)
    keep = prob > (thr[idx] if thr.ndim else thr)
    keep[:, top_k:] = False
    if exclusive is None or not exclusive.any():
        return keep
    out = np.zeros_like(keep)
    if len(idx) == 1:  # one input (a loader worker's target): the same walk over its few candidate labels
        cols = np.flatnonzero(keep[0])
        clashes = exclusive[np.ix_(idx[0, cols], idx[0, cols])].tolist()  # [earlier][later]
        chosen: list[int] = []
        for a in range(len(cols)):
            if not any(clashes[b][a] for b in chosen):
                chosen.append(a)
        out[0, cols[chosen]] = True
        return out
    done: list[int] = []  # earlier columns where some input kept a label (only those can clash)
    for p in np.flatnonzero(keep.any(0)):  # a column no input may keep stays False
        out[:, p] = keep[:, p]
        if done:  # drop label p where it is exclusive with a label kept before it
            out[:, p] &= ~(out[:, done] & exclusive[idx[:, done], idx[:, p:p + 1]]).any(1)
        if out[:, p].any():
            done.append(p)
    return out


def dense_targets(idx: np.ndarray, prob: np.ndarray, kept: np.ndarray, num_labels: int,
                  soft: bool = False) -> np.ndarray:
    """(N, L) float32 targets: 1 for kept labels (``soft``: the teacher's probability), 0 elsewhere."""
    n = len(idx)
    out = np.zeros((n, num_labels), dtype=np.float32)
    rows = np.repeat(np.arange(n), idx.shape[1]).reshape(idx.shape)
    values = np.asarray(prob, dtype=np.float32) if soft else np.ones(idx.shape, dtype=np.float32)
    out[rows[kept], idx[kept].astype(np.int64)] = values[kept]
    return out


def balance_weights(idx: np.ndarray, kept: np.ndarray, num_labels: int,
                    counts: np.ndarray | None = None) -> np.ndarray:
    """Per-input sampling weights that even out pseudo-label counts (Noisy Student's class balancing).

    ``idx`` (N, K) are the inputs' top-k label indices and ``kept`` (N, K) which of them are kept. An input's
    weight is the mean over its kept labels of ``median_count / count(label)``, clipped to [0.1, 10]; inputs
    with no kept label get weight 1. Vectorised: a few passes over the (N, K) arrays, no loop over inputs.
    ``counts`` (L,): the kept-label counts of the whole set when ``idx``/``kept`` are one part of it (an input's
    weight depends on its own row and the counts only, so parts give the same weights as the whole).
    """
    idx = np.asarray(idx).astype(np.int64, copy=False)
    kept = np.asarray(kept, dtype=bool)
    if counts is None:
        counts = np.bincount(idx[kept], minlength=num_labels)
    counts = np.asarray(counts).astype(np.float64)
    ref = np.median(counts[counts > 0]) if (counts > 0).any() else 1.0
    ratio = np.divide(ref, counts[idx], out=np.zeros(idx.shape), where=kept)
    n_kept = kept.sum(1)
    w = np.divide(ratio.sum(1), n_kept, out=np.ones(len(idx)), where=n_kept > 0)
    return np.clip(w, 0.1, 10.0)


# --------------------------------------------------------------------------- storage
def _chunk_name(start: int, end: int) -> str:
    return f"topk-{start:09d}-{end:09d}"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_open(path) as f:
        np.save(f, array)


def chunk_ranges(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """Global ``[start, end)`` ranges of the stored shards of a store with ``n`` inputs."""
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def rank_chunks(n: int, chunk_size: int, rank: int, world: int) -> list[tuple[int, int]]:
    """The contiguous run of shards that ``rank`` of ``world`` labels."""
    chunks = chunk_ranges(n, chunk_size)
    parts = np.array_split(np.arange(len(chunks)), world)
    return [chunks[i] for i in parts[rank]]


def chunk_done(folder: Path, start: int, end: int) -> bool:
    """True when both arrays of the shard are on disk under their final names."""
    base = folder / _chunk_name(start, end)
    return base.with_suffix(".idx.npy").exists() and base.with_suffix(".prob.npy").exists()


def write_chunk(folder: Path, start: int, end: int, idx: np.ndarray, prob: np.ndarray) -> None:
    """Atomically store one shard (indices first, probabilities last: the latter marks it complete)."""
    if len(idx) != end - start:
        raise ValueError(f"shard {start}-{end} got {len(idx)} rows")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / _chunk_name(start, end)
    _save_npy(base.with_suffix(".idx.npy"), idx.astype(np.int16))
    _save_npy(base.with_suffix(".prob.npy"), prob.astype(np.float16))


class PseudoLabels:
    """Reads one iteration's pseudo-labels and applies the rule, holding no per-input array.

    The shards stay on disk. The parent's passes over every input (which keep a label, label counts, balancing
    weights) load them one at a time (:meth:`chunks`); a loader worker reads one input's top-k with two
    positioned reads (:meth:`row`), so no process holds, and no forked worker inherits, arrays that grow with
    the store (each worker opens its own files; descriptors are never pickled). The shards' headers are checked
    when the folder is opened.

    Attributes:
        label_names: the labels the indices refer to.
        stored_k: labels stored per input (K, the labeling pass's top_k).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{index} is missing: pseudo-labeling of {self.folder} did not finish; "
                                    "rerun the pretraining command to complete it")
        self.info = json.loads(index.read_text())
        self.label_names: list[str] = list(self.info["label_names"])
        self._n = int(self.info["num_inputs"])
        self._ranges = chunk_ranges(self._n, int(self.info["chunk_size"]))
        self._starts = [s for s, _ in self._ranges]
        # per shard: (file, header bytes) of its .idx.npy and .prob.npy
        self._files: list[tuple[tuple[Path, int], tuple[Path, int]]] = []
        k = None
        for s, e in self._ranges:
            base = self.folder / _chunk_name(s, e)
            pair = []
            for suffix, dtype in ((".idx.npy", np.int16), (".prob.npy", np.float16)):
                f = base.with_suffix(suffix)
                header, shape = _npy_layout(f, dtype)
                if k is None:
                    k = shape[1] if len(shape) == 2 else -1
                if shape != (e - s, k):
                    raise UserError(f"{f}: holds {shape} where ({e - s}, {k}) was expected (the top-k of inputs "
                                    f"{s}-{e}); the pseudo-labels are damaged: delete {self.folder} and rerun the "
                                    "pretraining command to label again")
                pair.append((f, header))
            self._files.append((pair[0], pair[1]))
        self.stored_k = 1 if k is None else int(k)  # no shards: an empty store, (0, 1) as the arrays always were
        self._fds = OpenFiles(self._shard_file)  # (shard, 0 idx | 1 prob) -> descriptor

    def __len__(self) -> int:
        return self._n

    def chunks(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """``(start, end, idx, prob)`` of each stored shard in order, one loaded at a time."""
        for (s, e), ((fi, _), (fp, _)) in zip(self._ranges, self._files):
            yield s, e, np.load(fi), np.load(fp)

    @property
    def idx(self) -> np.ndarray:
        """(N, K) int16 top-k label indices of every input, loaded on each access (for small sets and tests;
        training reads shards and rows)."""
        parts = [c[2] for c in self.chunks()]
        return np.concatenate(parts) if parts else np.zeros((0, self.stored_k), np.int16)

    @property
    def prob(self) -> np.ndarray:
        """(N, K) float16 probabilities of every input, loaded on each access (as :attr:`idx`)."""
        parts = [c[3] for c in self.chunks()]
        return np.concatenate(parts) if parts else np.zeros((0, self.stored_k), np.float16)

    def _shard_file(self, key: tuple[int, int]) -> tuple[Path, None]:
        return self._files[key[0]][key[1]][0], None  # the header and size were checked on opening

    def _read(self, shard: int, which: int, local: int, out: np.ndarray) -> None:
        f, header = self._files[shard][which]
        if os.preadv(self._fds.fd((shard, which)), [out], header + local * out.nbytes) != out.nbytes:
            raise UserError(f"{f} is truncated; delete {self.folder} and rerun the pretraining command to label "
                            "again")

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Input ``i``'s stored top-k: (K,) int16 label indices and (K,) float16 probabilities."""
        i = int(i)
        if not 0 <= i < self._n:
            raise IndexError(f"input {i} out of range for pseudo-labels of {self._n} inputs")
        shard = bisect.bisect_right(self._starts, i) - 1
        idx, prob = np.empty(self.stored_k, np.int16), np.empty(self.stored_k, np.float16)
        local = i - self._starts[shard]
        self._read(shard, 0, local, idx)
        self._read(shard, 1, local, prob)
        return idx, prob

    def kept(self, threshold: float | np.ndarray, top_k: int, exclusive: np.ndarray | None) -> np.ndarray:
        """(N, K) bool mask of labels kept by the rule (of every input: for small sets and tests)."""
        parts = [select_labels(i, p, threshold, top_k, exclusive) for _, _, i, p in self.chunks()]
        return np.concatenate(parts) if parts else np.zeros((0, self.stored_k), bool)

    def close(self) -> None:
        """Close the open shard files (they reopen on the next read)."""
        self._fds.close()


def _npy_layout(f: Path, dtype) -> tuple[int, tuple[int, ...]]:
    """(header bytes, shape) of the C-ordered ``dtype`` array in .npy file ``f``, its size checked."""
    if not f.is_file():
        raise FileNotFoundError(f"{f} is missing: the pseudo-labels of {f.parent} are incomplete; delete the "
                                "folder and rerun the pretraining command to label again")
    with open(f, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, got = read(fh)
        except ValueError as e:
            raise UserError(f"{f}: not a .npy file ({e}); delete {f.parent} and rerun the pretraining command to "
                            "label again") from None
        header = fh.tell()
    size = header + int(np.prod(shape)) * np.dtype(dtype).itemsize
    if got != np.dtype(dtype) or fortran or f.stat().st_size != size:
        raise UserError(f"{f}: expected a C-ordered {np.dtype(dtype)} array of {shape} ({size} bytes), found "
                        f"{got}{' Fortran-ordered' if fortran else ''} in {f.stat().st_size} bytes; delete "
                        f"{f.parent} and rerun the pretraining command to label again")
    return header, tuple(shape)


# --------------------------------------------------------------------------- labeling pass
@torch.no_grad()
def label_store(accelerator, model: torch.nn.Module, store, folder: str | Path, *, label_names: Sequence[str],
                prepare_input, top_k: int, batch_size: int, chunk_size: int, num_workers: int = 0,
                fail_after_chunks: int = -1, progress: bool = True) -> Path:
    """Pseudo-label every input of ``store`` with the un-noised ``model``; resumable and exactly-once.

    Args:
        accelerator: the run's ``accelerate.Accelerator`` (rank, world size, barrier, autocast).
        model: the teacher (put in eval mode here; not wrapped for DDP, no gradients).
        store: a SliceStore (``len``, ``images(idx)``).
        folder: where the shards and ``index.json`` go.
        label_names: the model's labels (stored in ``index.json``).
        prepare_input: ``uint8 (B,3,H,W) tensor on device -> float model input``.
        top_k: labels stored per input (the rule's top-k is applied on reading, so store at least that many).
        batch_size, chunk_size: forward batch and shard size (chunk_size a multiple of batch_size).
        fail_after_chunks: testing hook: raise RuntimeError after writing this many shards.

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(store)
    if n == 0:
        raise UserError(f"the unlabeled store {getattr(store, 'path', store)} is empty; ingest series into it first")
    if (folder / "index.json").is_file():
        return folder
    mine = [c for c in rank_chunks(n, chunk_size, accelerator.process_index, accelerator.num_processes)
            if not chunk_done(folder, *c)]
    batches = [(b, min(b + batch_size, e)) for s, e in mine for b in range(s, e, batch_size)]
    loader = torch.utils.data.DataLoader(Items(store), batch_sampler=[range(*b) for b in batches],
                                         num_workers=num_workers, pin_memory=torch.cuda.is_available())
    pending: dict[tuple[int, int], list] = {c: [] for c in mine}
    chunk_of = {b: c for c in mine for b in [(x, min(x + batch_size, c[1])) for x in range(c[0], c[1], batch_size)]}
    written = 0
    bar = tqdm(total=sum(e - s for s, e in mine), desc="pseudo-label", unit="img",
               disable=not progress, main_process_only=True)
    for b, (_, logits) in zip(batches, outputs(accelerator, model, loader, prepare_input)):
        c = chunk_of[b]
        pending[c].append(topk(torch.sigmoid(logits), top_k))
        bar.update(b[1] - b[0])
        if b[1] == c[1]:
            parts = pending.pop(c)
            write_chunk(folder, c[0], c[1], np.concatenate([p[0] for p in parts]),
                        np.concatenate([p[1] for p in parts]))
            written += 1
            if fail_after_chunks >= 0 and written >= fail_after_chunks:
                raise RuntimeError(f"debug.fail_after_chunks={fail_after_chunks} reached (injected failure)")
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        missing = [c for c in chunk_ranges(n, chunk_size) if not chunk_done(folder, *c)]
        if missing:
            raise RuntimeError(f"{folder}: {len(missing)} pseudo-label shards missing after labeling "
                               f"(first {missing[0]}); rerun to complete")
        info = {"num_inputs": n, "chunk_size": chunk_size, "top_k": top_k, "label_names": list(label_names),
                "store": str(getattr(store, "path", ""))}
        write_atomic(folder / "index.json", json.dumps(info, indent=1))
    accelerator.wait_for_everyone()
    return folder
