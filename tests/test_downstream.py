"""Downstream dataset readers on tiny copies of the real layouts, splits, and the LesaNet head."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _downstream_layouts import CXR_FINDINGS, TERMS, make_chestxray14, make_deeplesion, make_kvasir, make_pneumonia

from dompre.data.downstream import (
    ChestXray14, DeepLesion, Kvasir, PediatricPneumonia, make_splits, read_chestxray14_csv,
)


def _disjoint_cover(splits, n):
    allidx = np.concatenate([splits["train"], splits["val"], splits["test"]])
    assert len(allidx) == len(set(allidx.tolist())) == n


def test_kvasir_v2_and_medico_layouts(tmp_path):
    ds = Kvasir(make_kvasir(tmp_path / "kv"), image_size=24)
    assert ds.variant == "kvasir-v2" and len(ds) == 32 and ds.task == "multiclass"
    assert ds.labels.shape == (32, 8) and (ds.labels.sum(1) == 1).all()
    item = ds[5]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 24, 24)
    assert ds.label_names[int(item["label"].argmax())] in ds.meta["path"].iat[5]
    splits = make_splits(ds, val_fraction=0.25, test_fraction=0.25, seed=0)
    _disjoint_cover(splits, 32)
    for part in ("train", "val", "test"):  # stratified: every class on every side
        assert set(ds.targets[splits[part]]) == set(range(8))
    medico = Kvasir(make_kvasir(tmp_path / "medico", per_class=2, medico=True) / "kvasir-dataset-v2")
    assert medico.variant == "medico2018" and len(medico.label_names) == 16


def test_kfold_partitions_every_sample_once(tmp_path):
    ds = Kvasir(make_kvasir(tmp_path / "kv"), image_size=16)
    tests = [make_splits(ds, folds=4, fold=f, val_fraction=0.25)["test"] for f in range(4)]
    assert sorted(np.concatenate(tests).tolist()) == list(range(len(ds)))
    for f in range(4):
        s = make_splits(ds, folds=4, fold=f, val_fraction=0.25)
        _disjoint_cover(s, len(ds))
    with pytest.raises(ValueError, match="fold=4"):
        make_splits(ds, folds=4, fold=4)


def test_chestxray14_csv_headers_split_and_missing_images(tmp_path):
    root = make_chestxray14(tmp_path / "cxr")
    table = read_chestxray14_csv(root / "Data_Entry_2017.csv")
    assert {"width", "height", "spacing_x", "spacing_y"} <= set(table.columns)
    assert table["age"].iat[0] == 50 and table["width"].iat[0] == 1024
    ds = ChestXray14(root, image_size=16, channels=1)
    assert len(ds) == len(CXR_FINDINGS) and ds.skipped == [("00000007_000.png", "image file not found under images*/")]
    card = ds.label_names.index("Cardiomegaly")
    expected = np.array(["Cardiomegaly" in f for f in CXR_FINDINGS], np.float32)
    np.testing.assert_array_equal(ds.labels[:, card], expected)
    assert ds.labels[1].sum() == 0 and ds[0]["image"].shape == (1, 16, 16)
    assert (ds.meta["split"].to_numpy() == ["train"] * 8 + ["test"] * 4).all()
    splits = make_splits(ds, val_fraction=0.3, min_val=1)
    assert splits["test"].tolist() == [8, 9, 10, 11]
    three = ChestXray14(root, image_size=16)  # grayscale repeated to 3 equal channels
    img = three[0]["image"]
    assert img.shape == (3, 16, 16) and torch.equal(img[0], img[2])


def test_chestxray14_without_lists_splits_by_patient(tmp_path):
    ds = ChestXray14(make_chestxray14(tmp_path / "cxr", official=False, missing=0), image_size=16)
    s = make_splits(ds, val_fraction=0.25, test_fraction=0.25, seed=1)
    _disjoint_cover(s, len(ds))
    groups = {k: set(ds.meta["group"].to_numpy()[v]) for k, v in s.items()}
    assert not (groups["train"] & groups["test"]) and not (groups["train"] & groups["val"])


def test_pneumonia_keeps_official_split_and_refills_tiny_val(tmp_path):
    ds = PediatricPneumonia(make_pneumonia(tmp_path / "pn"), image_size=16)
    assert len(ds) == 20 and ds.label_names == ["NORMAL", "PNEUMONIA"]
    s = make_splits(ds, val_fraction=0.34, min_val=4)
    assert set(ds.meta["split"].to_numpy()[s["test"]]) == {"test"} and len(s["test"]) == 6
    assert len(s["val"]) >= 4 and set(ds.targets[s["val"]]) == {0, 1}  # carved from train + official val
    kept = make_splits(ds, min_val=1)
    assert set(ds.meta["split"].to_numpy()[kept["val"]]) == {"val"}


def test_deeplesion_patch_box_window_and_labels(tmp_path):
    root = make_deeplesion(tmp_path / "dl", n=8)
    ds = DeepLesion(root, target="type", image_size=20, context=5.0)
    assert len(ds) == 8 and ds.label_names[0] == "bone" and ds.targets.tolist() == [0, 1, 2, 3] * 2
    item = ds[0]
    # box (19, 19, 29, 29) 0-based, 1 mm pixels, context 5 mm: crop (14, 14, 34, 34) -> 20 px; box -> 5..15
    np.testing.assert_allclose(item["box"].numpy(), [5, 5, 15, 15], atol=1e-5)
    img = item["image"].numpy()
    # slices 2, 3, 4 (2 mm apart at 2 mm spacing) hold -1024, 0 and 3071 HU -> window [-1024, 3071]
    assert img[0, 0, 0] == 0 and img[1, 0, 0] == int(1024 / 4095 * 255) and img[2, 0, 0] == 255
    lesa = DeepLesion(root, target="lesanet", labels_json=root / "labels.json", image_size=20)
    assert lesa.task == "multilabel" and lesa.label_names == TERMS
    np.testing.assert_array_equal(lesa.labels[0], [0, 1, 0, 1, np.nan])
    np.testing.assert_array_equal(lesa.labels[1], [1, 0, 1, 0, 0])
    assert lesa.meta["split"].tolist() == ["train"] * 4 + ["val"] * 2 + ["test"] * 2
    sub = DeepLesion(root, target="lesanet", labels_json=root / "labels.json", terms=["lung", "chest"])
    assert sub.labels[1].tolist() == [1, 1]


def test_missing_root_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Kvasir(tmp_path / "nowhere")


def test_lesanet_head_shapes_spl_identity_and_box_sensitivity():
    from dompre.models.lesanet import LesaNet
    torch.manual_seed(0)
    net = LesaNet(4, "test_resnet", fc_dim=8).eval()
    x = torch.randn(2, 3, 32, 32)
    boxes = torch.tensor([[4.0, 4.0, 12.0, 12.0], [10.0, 8.0, 30.0, 28.0]])
    out = net(x, boxes)
    assert out.shape == (2, 4) and net.forward_features(x, boxes).shape == (2, 5 * 8)
    with torch.no_grad():
        torch.testing.assert_close(out, net.classifier(net.forward_features(x, boxes)))  # SPL starts as identity
    moved = net(x, boxes + 10)
    assert not torch.allclose(out, moved)  # the box stages see the box
