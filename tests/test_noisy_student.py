"""End-to-end Noisy Student on tiny stores (32 px): outputs, resume after a failure, multi-process launches."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dompre.data.store import StoreWriter

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _run(overrides, out, **extra):
    from dompre.noisy_student import run_recipe
    return run_recipe(None, overrides(out, **extra))


def _final(out):
    return json.loads((Path(out) / "iter1" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def reference(pretrain_overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    result = _run(pretrain_overrides, out)
    return out, result


def test_end_to_end_outputs(reference):
    out, result = reference
    assert [r["iteration"] for r in result["results"]] == [0, 1]
    for name in ("metrics.csv", "metrics.md", "metrics.png", "recipe.yaml", "iter0/checkpoint/checkpoint.json",
                 "iter1/checkpoint/model.safetensors", "iter0/pseudo/index.json", "iter1/metrics.json"):
        assert (out / name).exists(), name
    assert not (out / "iter0" / "state").exists()  # training state removed once the checkpoint is written
    assert not (out / "iter1" / "pseudo").exists()  # the last student labels nothing
    m = _final(out)
    assert set(m) >= {"thresholds", "val", "test"} and 0.0 <= m["test"]["auc"] <= 1.0
    idx = np.load(next((out / "iter0" / "pseudo").glob("topk-000000016-*.idx.npy")))
    assert idx.dtype == np.int16 and idx.shape == (16, 3)
    assert len((out / "metrics.md").read_text().strip().splitlines()) == 4  # header, rule, 2 iterations
    import yaml
    saved = yaml.safe_load((out / "recipe.yaml").read_text())  # each role's effective settings, in full
    for role in ("teacher", "student"):
        assert saved[role]["optim"] == {"opt": "lookahead_radam", "lr": 0.003, "weight_decay": 0.0001,
                                        "warmup_epochs": 0.5}
        assert saved[role]["loss"] == {"focal_gamma": 2.0, "max_label_weight": 20.0, "hard_fraction": 0.0}


@pytest.mark.parametrize("debug", [
    {"debug.fail_stage": "iter1", "debug.fail_after_steps": 2},
    {"debug.fail_stage": "iter0", "debug.fail_after_steps": 3},
    {"debug.fail_stage": "pseudo0", "debug.fail_after_chunks": 1},
])
def test_resume_after_failure_gives_same_metrics(pretrain_overrides, reference, tmp_path, debug):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected failure"):
        _run(pretrain_overrides, out, **debug)
    _run(pretrain_overrides, out)  # the same command again, without the failure
    assert _final(out) == _final(reference[0])
    from safetensors.numpy import load_file
    a, b = (load_file(Path(d) / "iter1" / "checkpoint" / "model.safetensors") for d in (out, reference[0]))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # bit-identical student


def test_augment_on_device_trains_and_resumes_exactly(pretrain_overrides, tmp_path):
    dev = {"train.augment_on": "device"}
    ref = tmp_path / "ref"
    _run(pretrain_overrides, ref, **dev)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected failure"):
        _run(pretrain_overrides, out, **dev, **{"debug.fail_stage": "iter1", "debug.fail_after_steps": 2})
    _run(pretrain_overrides, out, **dev)  # noise parameters come from the stream position, so resume is exact here too
    assert _final(out) == _final(ref) and 0.0 <= _final(ref)["test"]["auc"] <= 1.0


def test_sigkill_mid_student_then_same_command_continues(pretrain_overrides, reference, tmp_path):
    """A real kill -9 of `python dompre/noisy_student.py` once the student has saved a state, then a rerun."""
    import signal
    import time
    out, recipe = tmp_path / "run", tmp_path / "r.yaml"
    recipe.write_text("seed: 0\n")
    cmd = [sys.executable, str(ROOT / "dompre" / "noisy_student.py"), str(recipe),
           *pretrain_overrides(out, **{"student.labeled_epochs": 3})]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list((out / "iter1" / "state").glob("step-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the student saved a state; nothing was killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "iter1" / "metrics.json").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ref = tmp_path / "ref"
    _run(pretrain_overrides, ref, **{"student.labeled_epochs": 3})
    assert _final(out) == _final(ref)


def test_clear_errors(tiny_stores, pretrain_overrides, tmp_path):
    with pytest.raises(ValueError, match="has no labels"):
        _run(pretrain_overrides, tmp_path / "x", **{"data.labeled_store": str(tiny_stores / "unl")})
    with StoreWriter(tmp_path / "empty", image_size=32) as w:
        w.commit_unit("nothing")
    with pytest.raises(ValueError, match="is empty"):
        _run(pretrain_overrides, tmp_path / "y", **{"data.unlabeled_store": str(tmp_path / "empty")})
    with pytest.raises(KeyError, match="not columns"):
        _run(pretrain_overrides, tmp_path / "z", **{"data.labels": "[a, zz]"})


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, recipe, overrides, env):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *args, str(ROOT / "dompre" / "noisy_student.py"),
           str(recipe), *overrides]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _resume_copy(reference, tmp_path, name):
    out = tmp_path / name
    shutil.copytree(reference[0], out)
    for p in ["iter0/pseudo", "iter1", "metrics.csv", "metrics.md", "metrics.png"]:
        shutil.rmtree(out / p, ignore_errors=True) if (out / p).is_dir() else (out / p).unlink(missing_ok=True)
    return out


def _same_pseudo(a, b):
    files = sorted(p.name for p in (a / "iter0" / "pseudo").glob("*.npy"))
    assert files == sorted(p.name for p in (b / "iter0" / "pseudo").glob("*.npy")) and files
    for f in files:
        np.testing.assert_array_equal(np.load(a / "iter0" / "pseudo" / f), np.load(b / "iter0" / "pseudo" / f))


@pytest.mark.parametrize("layout", ["two_processes", "two_machines"])
def test_multiprocess_pseudo_labels_match_one_process(pretrain_overrides, reference, tmp_path, layout):
    """The teacher from the 1-process run labels the store again with 2 processes: identical shards."""
    out = _resume_copy(reference, tmp_path, layout)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    ov = pretrain_overrides(out)
    base = ["--mixed_precision", "no", "--dynamo_backend", "no"]
    if layout == "two_processes":
        procs = [_launch(["--multi_gpu", "--num_processes", "2", "--main_process_port", str(_free_port()), *base],
                         out / "recipe.yaml", ov, env)]
    else:
        port = str(_free_port())
        procs = [_launch(["--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(r),
                          "--main_process_ip", "127.0.0.1", "--main_process_port", port, *base], out / "recipe.yaml", ov, env)
                 for r in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)
    _same_pseudo(reference[0], out)
    assert (out / "iter1" / "metrics.json").is_file() and (out / "metrics.md").is_file()


def test_checkpoints_record_the_measured_metrics_for_the_model_card(reference):
    out, _ = reference
    for it in (0, 1):
        info = json.loads((out / f"iter{it}" / "checkpoint" / "checkpoint.json").read_text())["info"]
        metrics = json.loads((out / f"iter{it}" / "metrics.json").read_text())
        assert info["metrics"]["test"] == metrics["test"] and "thresholds" not in info["metrics"]
        assert info["preparation"] is None  # these stores were written by StoreWriter, not by `dompre ingest`


@pytest.mark.slow
def test_teacher_and_student_learn_the_separable_toy_task(pretrain_overrides, tmp_path):
    """Each label lights one quadrant: a teacher (60 epochs) and its student (30, from the teacher) must both separate
    the labels on the test rows (chance is 0.5), so a loop that stops learning fails here."""
    result = _run(pretrain_overrides, tmp_path / "run", **{"teacher.epochs": 60, "optim.lr": 0.01,
                                                          "student.labeled_epochs": 30, "student.init": "teacher",
                                                          "pseudo.unkept": "soft"})
    aucs = [r["metrics"]["test"]["auc"] for r in result["results"]]
    assert len(aucs) == 2 and min(aucs) > 0.9, aucs
