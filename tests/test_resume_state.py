"""Resume states run nothing from the run folder: no pickled object is loaded (issue 15, item 8)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from timm.scheduler import CosineLRScheduler

from dompre.train.engine import Position, StreamSampler, fit, make_loader


class _Rows(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, item):
        row, _ = item
        return torch.full((4,), row / 16.0)


def _fit(state_dir: Path, fail_after: int = -1) -> dict:
    torch.manual_seed(0)
    acc = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sampler = StreamSampler(np.arange(16), per_epoch=8, seed=0, stage=0)
    loader = make_loader(_Rows(), sampler, batch_size=2, num_workers=0, seed=0)
    model, opt, loader = acc.prepare(model, opt, loader)
    sched = CosineLRScheduler(opt, t_initial=8, t_in_epochs=False)

    def step(x):
        return {"loss": model(x).pow(2).mean()}
    fit(acc, model=model, optimizer=opt, scheduler=sched, loaders=[loader], samplers=[sampler], step_fn=step,
        epochs=2, steps_per_epoch=4, state_dir=state_dir, position=Position(), stage="t", checkpoint_every=3,
        log_every=100, progress=False, fail_after_steps=fail_after)
    return {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()}


def _payload(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when it is loaded: code from the run folder."""
    return pickle.dumps(type("P", (), {"__reduce__": lambda self: (Path.touch, (marker,))})())


def test_resume_reads_json_position_and_refuses_planted_pickles(tmp_path):
    ref = _fit(tmp_path / "ref")
    with pytest.raises(RuntimeError, match="injected failure"):
        _fit(tmp_path / "run", fail_after=5)
    (state,) = (tmp_path / "run").glob("step-*")
    names = {p.name for p in state.iterdir()}
    assert "position.json" in names and not any(n.startswith("custom_checkpoint") for n in names)
    planted = state / "custom_checkpoint_0.pkl"
    marker = tmp_path / "ran"
    planted.write_bytes(_payload(marker))
    with pytest.raises(ValueError, match="custom_checkpoint_0.pkl.*not loaded"):
        _fit(tmp_path / "run")
    assert not marker.exists()
    planted.unlink()
    saved = (state / "position.json").read_text()
    (state / "position.json").write_text('{"epoch": "x"}')
    with pytest.raises(ValueError, match="must be integers"):
        _fit(tmp_path / "run")
    (state / "position.json").write_text(saved)
    out = _fit(tmp_path / "run")
    assert out.keys() == ref.keys() and all(torch.equal(out[k], ref[k]) for k in ref)  # exact resume


def test_torch_files_of_a_state_load_with_weights_only(tmp_path):
    """optimizer.bin replaced by a pickle that runs code: the load refuses it (weights_only=True)."""
    with pytest.raises(RuntimeError, match="injected failure"):
        _fit(tmp_path / "run", fail_after=5)
    (state,) = (tmp_path / "run").glob("step-*")
    marker = tmp_path / "ran"
    (state / "optimizer.bin").write_bytes(_payload(marker))
    with pytest.raises(Exception, match="Weights only load failed|weights_only"):
        _fit(tmp_path / "run")
    assert not marker.exists()
