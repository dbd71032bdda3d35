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


# ------------------------------------------------------------------------- relational labels and RHEM
def _tiny(dl: Path) -> list[str]:
    return [f"data.root={dl}", f"data.labels_json={dl / 'labels.json'}", f"data.ontology={dl / 'ontology.csv'}",
            "model.arch=test_resnet", "data.image_size=32", "train.epochs=1", "train.batch_size=6",
            "train.max_steps_per_epoch=1", "data.min_val=1", "train.progress=false"]


def test_apply_label_relations_closed_form(tmp_path):
    from dompre.data.deeplesion import apply_label_relations, load_ontology
    from dompre.train.pseudo_label import exclusive_matrix
    dl = make_deeplesion(tmp_path / "dl")
    names = ["chest", "abdomen", "lung", "liver", "nodule"]  # lung in chest, liver in abdomen, chest | abdomen
    on = load_ontology(dl / "ontology.csv")
    ex = exclusive_matrix(on.exclusive_pairs(names), 5)
    n = np.nan
    y = np.array([[1, n, 1, 0, 0],    # abdomen uncertain but exclusive with chest (and lung): a certain negative
                  [0, 1, 0, 0, n],    # nodule uncertain, exclusive with nothing: stays uncertain
                  [0, 0, n, 0, 0],    # lung uncertain: its parent chest becomes uncertain too
                  [0, 1, n, 0, 0],    # lung uncertain spreads to chest, but both are exclusive with abdomen: 0
                  [1, 1, 0, 0, 0]],   # contradictory positives stay positive
                 np.float32)
    want = np.array([[1, 0, 1, 0, 0],
                     [0, 1, 0, 0, n],
                     [n, 0, n, 0, 0],
                     [0, 1, 0, 0, 0],
                     [1, 1, 0, 0, 0]], np.float32)
    got = apply_label_relations(y, ex, on.parent_indices(names))
    np.testing.assert_array_equal(got, want)
    assert np.isnan(y[0, 1])  # the input is not modified


def test_exclusive_labels_of_a_positive_become_zero_targets_with_the_ontology(tmp_path):
    import json

    from dompre.train.finetune import prepare_data
    dl = make_deeplesion(tmp_path / "dl")
    labels = json.loads((dl / "labels.json").read_text())
    labels["train_uncertain_labels"][0] = [0]  # lesion 0 (abdomen, liver) uncertain chest: exclusive with abdomen
    labels["train_uncertain_labels"][1] = [4]  # lesion 1 (chest, lung) uncertain nodule: no relation, stays NaN
    (dl / "labels.json").write_text(json.dumps(labels))
    with_ontology, _ = prepare_data(load_finetune_recipe(RECIPES / "lesanet.yaml", _tiny(dl)))
    without, _ = prepare_data(load_finetune_recipe(RECIPES / "lesanet.yaml", [*_tiny(dl), "data.ontology=null"]))
    row = {int(v): i for i, v in enumerate(with_ontology.meta["lesion_idx"])}
    assert np.isnan(without.labels[row[0], 0]) and with_ontology.labels[row[0], 0] == 0.0
    assert np.isnan(without.labels[row[1], 4]) and np.isnan(with_ontology.labels[row[1], 4])
    assert (with_ontology.labels == 1).sum() == (without.labels == 1).sum()  # positives untouched


def test_published_lesanet_recipe_adds_rhem_on_the_classifier_logits(tmp_path):
    from dompre.train.engine import InputPrep, Items, batch_loader
    from dompre.train.finetune import (EpochProgress, FinetuneTask, _exclusive, _loss_fn, build_model,
                                       prepare_data)
    from dompre.train.losses import RelationalHardExampleMining
    dl = make_deeplesion(tmp_path / "dl")
    r = load_finetune_recipe(RECIPES / "seeds" / "yan2019_lesanet_published.yaml",
                             [*_tiny(dl), "model.init=random", f"out_dir={tmp_path / 'r'}"])
    t = r.train
    assert t.rhem and t.rhem_weight == 1 and t.rhem_samples == 10000 and t.rhem_power == 2  # LesaNet's config.yml
    ds, splits = prepare_data(r)
    torch.manual_seed(0)
    model, _ = build_model(r, len(ds.label_names))
    with torch.no_grad():  # score propagation away from identity, so its input and output logits differ
        model.spl.weight.add_(0.3 * torch.randn_like(model.spl.weight))
    from dompre.data.deeplesion import load_ontology
    ex = _exclusive(load_ontology(r.data.ontology), ds.label_names)
    assert ex.any()
    rhem = RelationalHardExampleMining(ex, t.rhem_samples, t.rhem_power)
    prep = InputPrep.for_model(model, None, channels=3)
    task = FinetuneTask(model, prep, _loss_fn(ds.task, ds.labels[splits["train"]], t.class_weights), t,
                        EpochProgress(), rhem)
    batch = next(iter(batch_loader(Items(ds), splits["train"], 6)))
    torch.manual_seed(1)
    out = task(batch)
    assert out["rhem_loss"] > 0
    assert out["loss"].item() == pytest.approx((out["task_loss"] + t.rhem_weight * out["rhem_loss"]
                                                + t.triplet_weight * out["triplet_loss"]).item(), rel=1e-6)
    parts = model(prep(batch["image"]), batch["box"], parts=True)
    torch.manual_seed(1)
    assert rhem(parts["class_logits"], batch["target"]).item() == pytest.approx(out["rhem_loss"].item(), rel=1e-6)
    torch.manual_seed(1)
    assert rhem(parts["logits"], batch["target"]).item() != pytest.approx(out["rhem_loss"].item(), rel=1e-3)
    res = run_finetune(r)  # and the whole recipe runs on the tiny layout
    assert np.isfinite(res["history"][0][0]["train_loss"]) and res["task"] == "multilabel"


def test_rhem_needs_the_ontology(tmp_path):
    from dompre.errors import UserError
    dl = make_deeplesion(tmp_path / "dl")
    with pytest.raises(UserError, match="data.ontology"):
        load_finetune_recipe(RECIPES / "lesanet.yaml", [*_tiny(dl), "data.ontology=null", "train.rhem=true"])
    with pytest.raises(UserError, match="rhem_samples"):
        load_finetune_recipe(RECIPES / "lesanet.yaml", [*_tiny(dl), "train.rhem=true", "train.rhem_samples=0"])
