"""Fixtures shared by several test files.

Plain helper modules of this folder (``_downstream_layouts``, ``_dicom_files``) import by name: pyproject's
``[tool.pytest.ini_options] pythonpath = ["tests"]`` puts the folder on ``sys.path``, so no test edits it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

TINY_LABELS = ["a", "b", "c"]


def _tiny_image(rng, labels) -> np.ndarray:
    """Noise (0-60) with one bright 16 x 16 quadrant per positive label: a separable toy task."""
    img = rng.integers(0, 60, (3, 32, 32)).astype(np.uint8)
    for j, on in enumerate(labels):
        if on == 1:
            y, x = divmod(j, 2)
            img[:, y * 16:(y + 1) * 16, x * 16:(x + 1) * 16] += 150
    return img


def _write_tiny_store(path: Path, n: int, rng, splits=None, labeled: bool = True) -> None:
    from dompre.data.store import StoreWriter
    lab = (rng.random((n, 3)) < 0.5).astype(np.float32)
    with StoreWriter(path, image_size=32, label_names=TINY_LABELS if labeled else None, shard_size=16) as w:
        for i in range(n):
            meta = {"split": splits[i] if splits else "", "lesion_idx": i if labeled else -1}
            w.add(_tiny_image(rng, lab[i]), meta=meta, labels=lab[i] if labeled else None)
            w.commit_unit(f"u{i}")


@pytest.fixture(scope="session")
def tiny_stores(tmp_path_factory) -> Path:
    """A folder with two 32 px SliceStores for pretraining runs (read-only for the tests): ``lab``, 36 inputs
    labeled over a, b, c (12 train, 12 val, 12 test) and ``unl``, 48 unlabeled inputs of the same task."""
    root = tmp_path_factory.mktemp("tiny_stores")
    rng = np.random.default_rng(0)
    _write_tiny_store(root / "lab", 36, rng, splits=["train"] * 12 + ["val"] * 12 + ["test"] * 12)
    _write_tiny_store(root / "unl", 48, rng, labeled=False)
    return root


@pytest.fixture(scope="session")
def pretrain_overrides(tiny_stores):
    """``make(out, **extra)``: the ``key=value`` overrides of a tiny run (maknet_tiny, 32 px, a 2-epoch teacher and
    one 1-epoch student) on :func:`tiny_stores` writing to ``out``; ``extra`` keys replace or add settings."""
    def make(out, **extra) -> list[str]:
        o = {"output_dir": str(out), "iterations": 1, "data.labeled_store": str(tiny_stores / "lab"),
             "data.unlabeled_store": str(tiny_stores / "unl"), "data.label_class": "all", "model.name": "maknet_tiny",
             "model.img_size": 32, "model.drop_path_rate": 0.0, "teacher.epochs": 2, "teacher.batch_size": 4,
             "optim.lr": 0.003, "pseudo.batch_size": 8, "pseudo.chunk_size": 16, "student.labeled_epochs": 1,
             "student.labeled_batch": 4, "student.pseudo_batch": 4,
             "train.num_workers": 0, "train.checkpoint_every": 1, "train.progress": False, "eval.batch_size": 16}
        o.update(extra)
        return [f"{k}={v}" for k, v in o.items()]
    return make
