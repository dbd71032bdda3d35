"""LesaNet as published: RHEM, triplet loss on lesion embeddings, box-aware augmentation (closed forms and a run)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _downstream_layouts import make_deeplesion  # noqa: E402

from dompre.models.lesanet import label_triplet_loss, weighted_bce  # noqa: E402
from dompre.train.finetune import load_finetune_recipe, run_finetune  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_rhem_averages_only_the_hardest_lesion_label_pairs():
    logits = torch.tensor([[2.0, -1.0, 0.0], [-3.0, 1.0, 4.0]])
    labels = torch.tensor([[1.0, 1.0, float("nan")], [0.0, 0.0, 0.0]])
    elem = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.nan_to_num(labels), reduction="none")
    known = elem[~torch.isnan(labels)]  # 5 certain pairs
    top = known.sort(descending=True).values[:math.ceil(0.4 * 5)]
    assert float(weighted_bce(logits, labels, hard_fraction=0.4)) == pytest.approx(float(top.mean()))
    assert float(weighted_bce(logits, labels, hard_fraction=1.0)) == pytest.approx(float(weighted_bce(logits, labels)))
    assert float(weighted_bce(logits, labels, hard_fraction=0.4)) > float(weighted_bce(logits, labels))


def test_triplet_loss_closed_form():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # already unit length
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # sim(0,1) = 1 > sim(0,2) = 0 and sim(1,0) = 1 > sim(1,2) = 0: triplets (0,1,2), (1,0,2); nothing else
    d01, d02, d12 = math.sqrt(2), 0.0, math.sqrt(2)
    expected = (max(0, d01 - d02 + 0.1) + max(0, d01 - d12 + 0.1)) / 2
    assert float(label_triplet_loss(emb, labels, 0.1)) == pytest.approx(expected, abs=1e-5)
    same = torch.ones(3, 2)
    assert float(label_triplet_loss(emb, same, 0.1)) == 0.0  # equal label sets: no triplet


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
