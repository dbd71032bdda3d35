"""LesaNet as published: RHEM, triplet loss on lesion embeddings, box-aware augmentation (a run; the losses' closed
forms are in test_losses.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _downstream_layouts import make_deeplesion

from dompre.train.finetune import load_finetune_recipe, run_finetune

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_box_augment_moves_the_box_with_the_lesion():
    from dompre.data.downstream import BoxAugment
    img = torch.zeros(3, 64, 64, dtype=torch.uint8)
    img[:, 20:30, 24:40] = 255
    box = torch.tensor([24.0, 20.0, 40.0, 30.0])
    aug, moved = BoxAugment(translate=0.2, scale=(0.8, 1.2)), 0
    torch.manual_seed(0)
    for _ in range(10):
        out, b = aug(img, box)
        assert out.shape == img.shape and out.dtype == torch.uint8 and b.shape == (4,)
        x1, y1, x2, y2 = b.round().int().tolist()
        inside = out[0, y1 + 1:y2 - 1, x1 + 1:x2 - 1].float().mean()
        assert inside > 200 and out[0].float().sum() > 0.5 * img[0].float().sum()  # the lesion is in its box
        moved += not torch.equal(b, box)
    assert moved >= 8


def test_lesanet_recipe_with_rhem_triplet_and_box_augment_runs(tmp_path):
    dl = make_deeplesion(tmp_path / "dl")
    base = [f"data.root={dl}", f"data.labels_json={dl / 'labels.json'}", f"data.ontology={dl / 'ontology.csv'}",
            "model.arch=test_resnet", "data.image_size=32", "train.epochs=1", "train.batch_size=6",
            "train.max_steps_per_epoch=1", "data.min_val=1", "train.progress=false"]
    r = load_finetune_recipe(RECIPES / "lesanet.yaml", [*base, f"out_dir={tmp_path / 'r'}", "train.rhem=true",
                                                        "train.triplet_weight=1", "train.box_augment=true"])
    res = run_finetune(r)
    assert res["task"] == "multilabel" and np.isfinite(res["history"][0][0]["train_loss"])
    from dompre.data.downstream import BoxAugment
    from dompre.train.engine import Items
    from dompre.train.finetune import prepare_data
    ds, splits = prepare_data(r)
    items = Items(ds, transform=BoxAugment())  # the training items move image and box together
    rows = [int(i) for i in splits["train"]]
    moved = [not torch.equal(items[(i, 7 + i)]["box"], ds[i]["box"]) for i in rows]
    assert sum(moved) >= len(rows) - 1
    with pytest.raises(ValueError, match="LesaNet options"):
        load_finetune_recipe(None, ["data.kind=kvasir", f"data.root={dl}", "train.rhem=true"])
    with pytest.raises(ValueError, match="multi-label"):
        load_finetune_recipe(None, ["data.kind=deeplesion_type", f"data.root={dl}", "model.head=lesanet",
                                    "train.rhem=true"])
