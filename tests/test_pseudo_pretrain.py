"""Virk & Bathula Table 3 pipeline: pseudo-label-only pretraining stage, export, LesaNet fine-tuned from it."""
from __future__ import annotations

import json
from pathlib import Path

from _downstream_layouts import make_deeplesion

SEEDS = Path(__file__).resolve().parents[1] / "recipes" / "seeds"


def test_pseudo_label_stage_trains_on_pseudo_labels_only_exports_and_lesanet_finetunes_from_it(
        tiny_stores, pretrain_overrides, tmp_path):
    from dompre.data.store import SliceStore
    from dompre.noisy_student import run_recipe
    from dompre.train.finetune import build_model, load_finetune_recipe, run_finetune
    out = tmp_path / "run"
    over = pretrain_overrides(out, iterations=0, **{"teacher.epochs": 1, "pseudo.threshold": 0.0,
                                                    "data.ontology": "", "data.hand_labeled": "",
                                                    "train.mixed_precision": "'no'", "model.img_size": 32,
                                                    "pseudo_pretrain.enabled": True,
                                                    "pseudo_pretrain.arch": "test_resnet",
                                                    "pseudo_pretrain.epochs": 1, "pseudo_pretrain.batch_size": 8})
    res = run_recipe(SEEDS / "virk2020_table3_pseudo_pretrain.yaml", over)
    pp = res["pseudo_pretrain"]
    export = Path(pp["export"])
    assert (export / "config.json").is_file() and (out / "iter0" / "pseudo" / "index.json").is_file()
    assert json.loads((export / "config.json").read_text())["architecture"] == "test_resnet"
    unlabeled = len(SliceStore(tiny_stores / "unl"))
    assert pp["pseudo"]["used"] == unlabeled and "test" in pp["metrics"]  # every unlabeled input, no labeled one
    card = json.loads((out / "pseudo_pretrain" / "checkpoint" / "checkpoint.json").read_text())
    assert "pseudo-labels" in json.dumps(card)
    weights = out / "pseudo_pretrain" / "checkpoint" / "model.safetensors"
    stamp = (weights.stat().st_mtime_ns, (export / "model.safetensors").stat().st_mtime_ns)
    again = run_recipe(SEEDS / "virk2020_table3_pseudo_pretrain.yaml", over)  # resumes: nothing retrained
    assert again["pseudo_pretrain"]["metrics"]["test"] == pp["metrics"]["test"]
    assert (weights.stat().st_mtime_ns, (export / "model.safetensors").stat().st_mtime_ns) == stamp

    dl = make_deeplesion(tmp_path / "dl")
    ft = [f"data.root={dl}", f"data.labels_json={dl / 'labels.json'}", f"data.ontology={dl / 'ontology.csv'}",
          f"model.weights={export}", "data.image_size=32", "train.epochs=1", "train.batch_size=6",
          "train.max_steps_per_epoch=1", "data.min_val=1", "train.progress=false", f"out_dir={tmp_path / 'les'}"]
    recipe = load_finetune_recipe(SEEDS / "virk2020_table3_lesanet.yaml", [*ft, "model.arch=test_resnet"])
    assert recipe.model.init == "domain" and recipe.model.head == "lesanet" and recipe.train.lr == 0.001
    model, info = build_model(recipe, 5)
    from safetensors.torch import load_file
    sd = load_file(str(export / "model.safetensors"))
    import torch
    torch.testing.assert_close(model.backbone.conv1[0].weight, sd["conv1.0.weight"])  # backbone from the export
    les = run_finetune(recipe)
    assert les["init"]["init"] == "domain" and les["task"] == "multilabel"
