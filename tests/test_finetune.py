"""`dompre finetune` / `dompre study` end to end on tiny layouts with a tiny timm model (CPU, seconds)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from _downstream_layouts import make_chestxray14, make_deeplesion, make_kvasir, make_pneumonia

from dompre.train.finetune import build_model, freeze_layers, layer_list, load_finetune_recipe, run_finetune

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = ["model.arch=test_resnet", "data.image_size=32", "train.epochs=1", "train.batch_size=8",
        "train.max_steps_per_epoch=1", "train.eval_batch_size=16", "data.min_val=1"]


@pytest.fixture(scope="module")
def kvasir(tmp_path_factory):
    return make_kvasir(tmp_path_factory.mktemp("kv"), per_class=4)


def _recipe(name, root, out, *extra):
    path = RECIPES / f"{name}.yaml" if name else None
    kind = [] if name else ["data.kind=kvasir"]
    return load_finetune_recipe(path, [*kind, f"data.root={root}", f"out_dir={out}", *TINY, *extra])


def _n(module):
    return sum(p.numel() for p in module.parameters(recurse=False))


@pytest.mark.parametrize("percent", [0, 10, 50, 75, 100])
def test_freeze_leaves_exactly_the_intended_parameters_trainable(percent):
    model = timm.create_model("test_resnet", num_classes=3)
    layers = layer_list(model)
    info = freeze_layers(model, percent)
    k = math.floor(len(layers) * percent / 100)
    assert info["n_frozen"] == k and info["n_layers"] == len(layers) > 10
    total = sum(p.numel() for p in model.parameters())
    expected = total - sum(_n(m) for _, m in layers[:k])
    assert info["trainable_params"] == expected == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all(p.requires_grad for p in model.get_classifier().parameters())
    if percent == 100:
        assert expected == sum(p.numel() for p in model.get_classifier().parameters())


def test_lesanet_freeze_covers_the_backbone_only():
    from dompre.models.lesanet import LesaNet
    net = LesaNet(4, "test_resnet", fc_dim=8)
    info = freeze_layers(net, 100)
    head = sum(p.numel() for m in (net.fcs, net.classifier, net.spl) for p in m.parameters())
    assert info["trainable_params"] == head
    assert not any(p.requires_grad for p in net.backbone.parameters())


def test_kvasir_finetune_writes_metrics_plots_models(kvasir, tmp_path):
    recipe = _recipe("kvasir", kvasir, tmp_path / "run", "model.n_models=2", "train.class_weights=true",
                     "data.val_fraction=0.25", "data.test_fraction=0.25")
    res = run_finetune(recipe)
    out = tmp_path / "run"
    for name in ("recipe.yaml", "metrics.json", "per_label.csv", "predictions.npz", "roc.png", "confusion.png",
                 "learning_curves.png", "model_0.safetensors", "model_1.safetensors"):
        assert (out / name).is_file(), name
    # 4 images a class: 8 test images (a quarter); val needs >= 8 to hold each class, so it takes 8 of 24
    assert res["n"] == {"train": 16, "val": 8, "test": 8} and res["fps"] > 0
    assert {"mcc", "accuracy", "f1", "precision", "recall", "specificity", "auc"} <= set(res["test"])
    assert np.asarray(res["test"]["confusion_matrix"]).sum() == 8 and len(res["history"]) == 2
    pred = np.load(out / "predictions.npz")
    np.testing.assert_allclose(pred["scores"].sum(1), 1, atol=1e-5)  # averaged softmax of the 2 models
    assert json.loads((out / "metrics.json").read_text())["n_models"] == 2
    assert load_finetune_recipe(out / "recipe.yaml") == recipe  # the resolved recipe reloads


def test_chestxray14_pneumonia_lesanet_recipes_run(tmp_path):
    cxr = run_finetune(_recipe("chestxray14", make_chestxray14(tmp_path / "cxr"), tmp_path / "r1",
                               "data.channels=1", "data.val_fraction=0.3"))
    assert cxr["task"] == "multilabel" and cxr["n"]["test"] == 4 and {"auc", "f1"} <= set(cxr["test"])
    pn = run_finetune(_recipe("pneumonia", make_pneumonia(tmp_path / "pn"), tmp_path / "r2"))
    assert pn["n"]["test"] == 6 and pn["skipped"] == 0
    dl = make_deeplesion(tmp_path / "dl")
    les = run_finetune(_recipe("lesanet", dl, tmp_path / "r3", f"data.labels_json={dl / 'labels.json'}",
                               f"data.ontology={dl / 'ontology.csv'}"))
    assert les["task"] == "multilabel" and les["n"] == {"train": 6, "val": 3, "test": 3}
    table = pd.read_csv(tmp_path / "r3" / "per_label.csv")
    assert table["label"].tolist() == ["chest", "abdomen", "lung", "liver", "nodule"]


def test_feature_extraction_logreg_and_svm(kvasir, tmp_path):
    res = run_finetune(_recipe(None, kvasir, tmp_path / "f", "train.strategy=features"))
    assert res["feature_dim"] > 0 and res["test"]["accuracy"] == 1.0  # one colour per class: separable
    svm = run_finetune(_recipe("chestxray14", make_chestxray14(tmp_path / "cxr"), tmp_path / "s",
                               "train.strategy=features", "train.classifier=linear_svm"))
    assert svm["strategy"] == "features" and not (tmp_path / "s" / "model_0.safetensors").exists()


def test_init_from_weights_file_and_domain_export(kvasir, tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(1)
    src = timm.create_model("test_resnet", num_classes=5)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    recipe = _recipe(None, kvasir, tmp_path, "model.init=file", f"model.weights={tmp_path / 'w.safetensors'}")
    model, info = build_model(recipe, 8)
    torch.testing.assert_close(model.conv1[0].weight, src.conv1[0].weight)
    assert model.get_classifier().out_features == 8 and info["loader"] == "timm pretrained_cfg_overlay"
    other = {"module." + k: v for k, v in src.state_dict().items()} | {"aux.weight": torch.zeros(2)}
    other["module.conv1.0.weight"] = torch.zeros(1, 1, 1, 1)  # a backbone tensor timm cannot load
    torch.save({"state_dict": other}, tmp_path / "w.pth")
    model, info = build_model(_recipe(None, kvasir, tmp_path, "model.init=file",
                                      f"model.weights={tmp_path / 'w.pth'}"), 8)
    assert info["loader"] == "non-strict state dict" and info["shape_mismatch"] == 3  # conv1, fc weight, bias
    assert info["unexpected"] == 1 and info["loaded"] == len(src.state_dict()) - 3
    torch.testing.assert_close(model.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    export = tmp_path / "export"
    from dompre.checkpoint import save_checkpoint
    from dompre.export import export_timm
    save_checkpoint(src, tmp_path / "ckpt", arch="test_resnet", label_names=list("abcde"))
    export_timm(tmp_path / "ckpt", export)
    model, info = build_model(_recipe(None, kvasir, tmp_path, "model.init=domain", f"model.weights={export}"), 8)
    torch.testing.assert_close(model.conv1[0].weight, src.conv1[0].weight)
    assert info["arch"] == "test_resnet" and model.get_classifier().out_features == 8
    with pytest.raises(ValueError, match="model.weights"):
        _recipe(None, kvasir, tmp_path, "model.init=domain")


def test_study_grid_table_plot_and_significance(kvasir, tmp_path):
    from safetensors.torch import save_file

    from dompre.train.study import compare_cells, run_study
    save_file(timm.create_model("test_resnet").state_dict(), str(tmp_path / "w.safetensors"))
    recipe = _recipe(None, kvasir, tmp_path / "runs", "data.val_fraction=0.25", "data.test_fraction=0.25")
    res = run_study(recipe, inits=("random", "file"), freezes=(0, 100), seeds=1,
                    weights=str(tmp_path / "w.safetensors"), out_dir=tmp_path / "study")
    study = tmp_path / "study"
    for name in ("runs.csv", "summary.csv", "summary.md", "comparisons.csv", "study.png"):
        assert (study / name).is_file(), name
    assert len(res["runs"]) == 4 and len(res["summary"]) == 4 and res["metric"] == "mcc"
    assert not any(c["significant"] for c in res["comparisons"])  # one seed a cell: no spread, no claim
    assert len(res["comparisons"]) == 4  # 2 init pairs + 2 freeze pairs; the 2 diagonal pairs are not compared
    assert "freeze 100%" in res["markdown"] and "Welch" in res["markdown"]
    again = run_study(recipe, inits=("random", "file"), freezes=(0, 100), seeds=1,
                      weights=str(tmp_path / "w.safetensors"), out_dir=study)  # resumes from metrics.json
    assert pd.DataFrame(again["summary"]).equals(pd.DataFrame(res["summary"]))
    first = study / "random_finetune_f0_s0" / "metrics.json"
    stamp = first.stat().st_mtime_ns
    run_study(recipe, inits=("random",), freezes=(0,), seeds=1, out_dir=study)
    assert first.stat().st_mtime_ns == stamp  # same recipe: reused, not retrained
    changed = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, epochs=recipe.train.epochs + 1))
    run_study(changed, inits=("random",), freezes=(0,), seeds=1, out_dir=study)
    assert first.stat().st_mtime_ns != stamp  # a changed recipe is rerun, never silently reused
    runs = pd.DataFrame({"init": ["random"] * 6 + ["domain"] * 6, "strategy": "finetune",
                         "freeze": [0.0] * 3 + [50.0] * 3 + [0.0] * 3 + [50.0] * 3,
                         "mcc": [0.10, 0.11, 0.09, 0.1, 0.2, 0.0, 0.50, 0.52, 0.48, 0.9, 0.9, 0.9]})
    cmp = compare_cells(runs, "mcc").set_index(["a", "b"])
    assert cmp.loc[("domain/finetune/0.0", "random/finetune/0.0"), "significant"]
    assert not cmp.loc[("random/finetune/0.0", "random/finetune/50.0"), "significant"]  # within the spread
    assert len(cmp) == 4


def test_cli_finetune_and_bad_option(kvasir, tmp_path, capsys):
    from dompre.cli import main
    args = ["finetune", str(RECIPES / "kvasir.yaml"), f"data.root={kvasir}", f"out_dir={tmp_path}", *TINY]
    assert main(args) == 0
    assert "test mcc" in capsys.readouterr().out
    assert main(args + ["train.freeze=150"]) == 2
    assert "train.freeze=150" in capsys.readouterr().err


def _finetune_cmd(root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "dompre", "finetune", str(RECIPES / "kvasir.yaml"), f"data.root={root}",
            f"out_dir={out}", "model.arch=resnet18", "model.init=random", "data.image_size=64", "train.epochs=3",
            "train.batch_size=8", "train.eval_batch_size=16", "data.min_val=1", "train.checkpoint_every=2",
            "train.progress=false", "model.drop_rate=0.3"]


@pytest.mark.slow
def test_kill_9_then_the_same_command_ends_with_the_metrics_of_an_uninterrupted_run(tmp_path):
    """A real SIGKILL mid-epoch, then the same command: the run resumes from its latest state (model, optimizer,
    dropout RNG, data position, validation history and best weights) and writes the same metrics."""
    root = make_kvasir(tmp_path / "kv", per_class=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run(_finetune_cmd(root, tmp_path / "ref"), env=env, check=True, capture_output=True)
    run = tmp_path / "run"
    proc = subprocess.Popen(_finetune_cmd(root, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        done = [json.loads(p.read_text())["global_step"] for p in (run / "state").glob("model_0/step-*/position.json")]
        if done and max(done) >= 5:  # past the first epoch (4 steps), mid-way through the second
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = max(done)
            break
        time.sleep(0.02)
    proc.wait()
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (run / "metrics.json").exists() and (run / "state").is_dir()
    subprocess.run(_finetune_cmd(root, run), env=env, check=True, capture_output=True)
    ref, got = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ref", "run"))
    assert got["history"] == ref["history"] and got["test"] == ref["test"]
    assert not (run / "state").exists()  # the resume state goes once the results are written
    with pytest.raises(subprocess.CalledProcessError) as e:  # an interrupted run resumes only under its own recipe
        (run / "state").mkdir()
        subprocess.run([*_finetune_cmd(root, run), "train.lr=0.5"], env=env, check=True, capture_output=True)
    assert e.value.returncode == 2 and b"other settings for ['train.lr']" in e.value.stderr
