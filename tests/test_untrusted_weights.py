"""Corrupt or pickled weight files: one ValueError naming the file, and nothing in them runs (issue 15, item 12)."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch

from dompre.checkpoint import load_checkpoint, read_weights, save_checkpoint


def test_corrupt_safetensors_names_the_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json header}")
    with pytest.raises(ValueError, match="model.safetensors: not a loadable weights file"):
        read_weights(bad)
    ck = save_checkpoint(timm.create_model("test_efficientnet", num_classes=2), tmp_path / "ck",
                         arch="test_efficientnet", label_names=None)
    (ck / "model.safetensors").write_bytes(bad.read_bytes())  # the checkpoint loader reads through the same
    with pytest.raises(ValueError, match="model.safetensors: not a loadable weights file.*rewrite it"):
        load_checkpoint(ck)


def test_pickled_weights_are_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "weights.pth"
    evil.write_bytes(pickle.dumps(type("P", (), {"__reduce__": lambda self: (Path.touch, (marker,))})()))
    with pytest.raises(ValueError, match="weights.pth: not a loadable weights file"):
        read_weights(evil)
    assert not marker.exists()
    ok = tmp_path / "ok.pth"
    torch.save({"state_dict": {"module.w": torch.ones(2)}}, ok)
    assert list(read_weights(ok)) == ["w"]
