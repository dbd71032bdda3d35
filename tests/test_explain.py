"""Explanations: IG completeness, Grad-CAM maps, exact perturbation masks, figures, input loading and the CLI."""
from __future__ import annotations

import json
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dompre.explain import (InputItem, box_mask, default_cam_layer, explain_items, explain_montage, fill, grad_cam,
                            inpaint, integrated_gradients, load_model, make_variants, occlusion, parse_inputs,
                            rank_labels, to_pixels, top_pixel_mask, wrap_model)

NAMES = ["liver", "lung", "kidney", "bone"]


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1),
                         nn.Softplus(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, len(NAMES)))


@pytest.fixture
def pm():
    return wrap_model(tiny_cnn(), "sigmoid", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def images(n: int = 2, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, (n, 3, h, w), dtype=np.uint8)


def test_ig_completeness_sums_to_logit_difference(pm):
    x = to_pixels(images(2))
    attr, delta = integrated_gradients(pm, x, [1, 3], n_steps=50)
    with torch.no_grad():
        gap = pm(x)[[0, 1], [1, 3]] - pm(torch.zeros_like(x))[:, [1, 3]].diagonal()
    sums = attr.flatten(1).sum(1)
    assert attr.shape == x.shape
    assert torch.allclose(sums, gap, rtol=1e-2, atol=1e-3), (sums, gap)
    assert delta.abs().max() < 1e-2 * max(1.0, float(gap.abs().max()))


def test_gradcam_shape_range_and_no_leftover_hooks(pm):
    x = to_pixels(images(2, 32, 48))
    assert default_cam_layer(pm.net) == "3"  # the last Conv2d of the Sequential
    maps = grad_cam(pm, x, target=2)
    assert maps.shape == (2, 32, 48)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    assert np.isclose(float(maps[0].max()), 1.0) and np.isclose(float(maps[1].max()), 1.0)  # not an all-zero map
    assert all(not m._forward_hooks and not m._backward_hooks for m in pm.modules())  # worked on a copy
    with pytest.raises(KeyError, match="nope"):
        grad_cam(pm, x, target=0, layer="nope")


def test_gradcam_default_layer_of_timm_model_is_last_feature_stage():
    import timm

    model = timm.create_model("test_efficientnet", num_classes=3)
    layer = default_cam_layer(model)
    assert layer == model.feature_info[-1]["module"]
    maps = grad_cam(wrap_model(model), to_pixels(images(1, 64, 64)), target=1)
    assert maps.shape == (1, 64, 64) and 0.0 <= float(maps.min()) <= float(maps.max()) <= 1.0


def test_occlusion_is_zero_where_the_model_does_not_look():
    class TopLeft(nn.Module):  # logit 0 = sum of the top-left 8x8 block of channel 0
        def forward(self, x):
            return x[:, :1, :8, :8].sum((1, 2, 3))[:, None].repeat(1, 2)

    pm = wrap_model(TopLeft(), mean=(0, 0, 0), std=(1, 1, 1))
    x = to_pixels(images(1, 16, 16))
    attr = occlusion(pm, x, 0, window=4, stride=4)[0].sum(0)
    assert attr.shape == (16, 16)
    assert torch.all(attr[8:, :] == 0) and torch.all(attr[:, 8:] == 0)
    assert torch.all(attr[:8, :8] > 0)


def test_fill_changes_exactly_the_mask_in_every_channel():
    img = images(1, 20, 24)[0]  # values 1..255: a black pixel can only come from the fill
    mask = box_mask((20, 24), (3.5, 2, 9, 7.2))
    assert mask.sum() == (9 - 3) * (8 - 2) and mask[2, 3] and not mask[8, 3]
    out = fill(img, mask, 0)
    assert np.array_equal(out != img, np.broadcast_to(mask, img.shape))
    assert np.array_equal(out[:, ~mask], img[:, ~mask]) and (out[:, mask] == 0).all()


def test_inpaint_touches_only_the_mask_and_reproduces_a_ramp():
    ramp = np.tile(np.arange(0, 240, 8, dtype=np.uint8), (3, 30, 1))  # harmonic: inpainting must restore it
    noisy = ramp.copy()
    mask = box_mask(ramp.shape[1:], (10, 8, 20, 18))
    noisy[:, mask] = 255
    out = inpaint(noisy, mask, iterations=400)
    assert np.array_equal(out[:, ~mask], noisy[:, ~mask])
    assert np.abs(out.astype(int) - ramp.astype(int))[:, mask].max() <= 2
    edge = inpaint(noisy, box_mask(ramp.shape[1:], (0, 0, 5, 30)))  # region on the image border
    assert np.array_equal(edge[:, :, 5:], noisy[:, :, 5:])


def test_top_pixel_mask_and_variants_change_only_their_masks():
    rng = np.random.default_rng(1)
    amap = rng.normal(size=(16, 16))
    m = top_pixel_mask(amap, 0.05)
    assert m.sum() == round(0.05 * 256) and amap[m].min() >= amap[~m].max()
    img = images(1, 16, 16)[0]
    variants = make_variants(img, amap, (2, 2, 6, 6), fractions=(0.05, 0.2))
    assert [v.name for v in variants][:3] == ["original", "inpaint ROI", "black ROI"]
    for v in variants:
        changed = (v.image != img).any(0)
        assert not changed[~v.mask].any(), v.name
    assert (variants[2].image[:, variants[2].mask] == 0).all()
    assert variants[4].mask.sum() == round(0.2 * 256) and (variants[4].image[:, variants[4].mask] == 0).all()


def test_rank_labels_marks_true_and_false_positives():
    probs = np.array([0.9, 0.8, 0.1, 0.7])
    truth = np.array([1.0, 0.0, 1.0, np.nan])
    ranked, missed = rank_labels(probs, NAMES, truth, k=3)
    assert [(r.label, r.status) for r in ranked] == [("liver", "TP"), ("lung", "FP"), ("bone", "uncertain")]
    assert missed == ["kidney"]
    assert all(r.status == "" for r in rank_labels(probs, NAMES)[0])


def _readable_png(path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        im.load()
        return im.size


@pytest.mark.parametrize("method", ["ig", "gradcam", "occlusion", "perturb"])
def test_explain_items_writes_readable_pngs(pm, tmp_path, method):
    x = images(2)
    items = [InputItem("a/0", x[0], np.array([1, 0, np.nan, 0], np.float32), (4, 4, 12, 12)),
             InputItem("b", x[1])]
    n = 2 if method == "ig" else 1  # figures dominate the time: one montage is enough
    results, montage, skipped = explain_items(pm, items[:n], NAMES, method, tmp_path, n_steps=8)
    assert not skipped and len(results) == n and (montage is not None) == (n > 1)
    for r in results:
        w, h = _readable_png(r.png)
        assert w > 200 and h > 100
    if montage:
        _readable_png(montage)
    if method in ("ig", "perturb"):
        assert all(0 <= r.ig_delta < 0.1 for r in results)  # relative completeness error of the 8-step IG
    if method == "perturb":
        table = results[0].table
        assert list(table.columns)[:3] == ["original", "inpaint ROI", "black ROI"]
        assert len(table) == 5  # 4 labels + the "new top-1" row
        _readable_png(results[0].perturb_png)
        assert results[0].table_csv.read_text().splitlines()[0].split(",")[1:4] == ["original", "inpaint ROI",
                                                                                   "black ROI"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_explain_items_unknown_label_stops(pm, tmp_path):
    with pytest.raises(KeyError, match="spleen"):
        explain_items(pm, [InputItem("a", images(1)[0])], NAMES, "ig", tmp_path, label="spleen")


def test_explain_montage_for_model_card(tmp_path):
    net = tiny_cnn()
    net.train()
    out = explain_montage(net, images(3), NAMES, tmp_path / "card" / "explain.png", method="gradcam")
    assert _readable_png(out)[0] > 200
    assert net.training  # the caller's mode is left as it was


def _export_folder(tmp_path):
    import timm
    from timm.models import save_for_hf

    model = timm.create_model("test_efficientnet", num_classes=len(NAMES)).eval()
    save_for_hf(model, tmp_path / "export", safe_serialization=True,
                model_config={"label_names": NAMES, "pretrained_cfg": {"input_size": [3, 48, 48]}})
    return model, tmp_path / "export"


def test_load_model_from_export_folder(tmp_path):
    model, folder = _export_folder(tmp_path)
    lm = load_model(folder)
    assert lm.label_names == NAMES and lm.activation == "sigmoid" and lm.source == "export"
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(lm.model(x), model(x))
    with pytest.raises(FileNotFoundError, match="checkpoint.json"):
        load_model(tmp_path)


def test_parse_inputs_images_store_items_and_bad_specs(tmp_path):
    from dompre.data.store import StoreWriter

    Image.fromarray(np.full((40, 50), 7, np.uint8)).save(tmp_path / "gray.png")
    Image.fromarray(np.zeros((40, 50), np.uint16)).save(tmp_path / "hu16.png")
    with StoreWriter(tmp_path / "store", image_size=16, label_names=["lung", "liver", "extra"]) as w:
        w.add(images(1, 16, 16)[0], meta={"bbox": (1.0, 2.0, 9.0, 12.0)}, labels=np.array([1, 0, 1]))
        w.add(images(1, 16, 16, seed=1)[0])
        w.commit_unit("u0")
    specs = [str(tmp_path / "gray.png"), str(tmp_path / "hu16.png"), f"{tmp_path / 'store'}:0,1,5",
             str(tmp_path / "missing.png")]
    items, skipped = parse_inputs(specs, NAMES, input_size=(24, 24))
    assert [i.name for i in items] == ["gray.png", "store:0", "store:1"]
    assert items[0].image.shape == (3, 24, 24) and items[0].image.dtype == np.uint8 and (items[0].image == 7).all()
    np.testing.assert_array_equal(items[1].truth, [0, 1, np.nan, np.nan])  # mapped to the model's label order
    assert items[1].box == (1.0, 2.0, 9.0, 12.0) and items[2].truth is None and items[2].box is None
    assert [s for s, _ in skipped] == [str(tmp_path / "hu16.png"), f"{tmp_path / 'store'}:5",
                                       str(tmp_path / "missing.png")]
    assert "16-bit" in skipped[0][1]


@pytest.mark.slow
def test_cli_explain_end_to_end_on_export(tmp_path, capsys):
    from dompre.cli import main

    _, folder = _export_folder(tmp_path)
    Image.fromarray(images(1, 40, 40)[0].transpose(1, 2, 0)).save(tmp_path / "x.png")
    rc = main(["explain", str(folder), str(tmp_path / "x.png"), str(tmp_path / "no.png"),
               "--method", "perturb", "--out", str(tmp_path / "out"), "--steps", "8", "--view", "rgb"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "explained 1 input(s), skipped 1" in out and "no.png" in err and "new top-1" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.png_ig.png", "x.png_perturb.csv",
                                                                    "x.png_perturb.png"]
    rc = main(["explain", str(folder), str(tmp_path / "x.png"), "--method", "gradcam", "--layer", "bogus",
               "--out", str(tmp_path / "out2")])
    assert rc == 2 and "bogus" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_explain_end_to_end_on_checkpoint(tmp_path, capsys):
    import timm

    from dompre.checkpoint import save_checkpoint
    from dompre.cli import main

    model = timm.create_model("test_efficientnet", num_classes=len(NAMES))
    save_checkpoint(model, tmp_path / "ckpt", arch="test_efficientnet", label_names=NAMES,
                           info={"input_size": [3, 32, 32]})
    Image.fromarray(images(1, 40, 40)[0].transpose(1, 2, 0)).save(tmp_path / "x.png")
    rc = main(["explain", str(tmp_path / "ckpt"), str(tmp_path / "x.png"), "--method", "occlusion",
               "--label", "kidney", "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    assert "explained 'kidney'" in capsys.readouterr().out
    assert json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())["label_names"] == NAMES


def test_parse_inputs_dicom_slice_matches_ingest_preparation(tmp_path):
    from dompre.data import prep
    from dompre.synth.dicom import write_dicom_series

    yy, xx = np.mgrid[:40, :48]
    body = ((yy - 20) / 15) ** 2 + ((xx - 24) / 18) ** 2 < 1
    hu = np.stack([np.where(body, 40.0 + 30 * k, -1000.0) for k in range(5)]).astype(np.float32)
    write_dicom_series(tmp_path / "s", hu, spacing=(2.0, 0.8, 0.8))
    items, skipped = parse_inputs([f"{tmp_path / 's'}@2", f"{tmp_path / 's'}@9"], NAMES)
    assert [i.name for i in items] == ["s@2"] and "0..4" in skipped[0][1]
    stacks, centre = prep.prepare_volume(hu, (2.0, 0.8, 0.8), prep.PrepConfig(stride=1))  # ingest, every slice
    assert centre[1] == 2
    np.testing.assert_allclose(items[0].image.astype(int), stacks[1].astype(int), atol=1)


def test_explained_dicom_input_is_the_ingested_store_item(tmp_path):
    """`dompre explain MODEL SERIES@SLICE` explains exactly the array `dompre ingest dicom` stored for that stack,
    with the preparation the model's training store recorded (window, size, crop margin of its recipe)."""
    import timm

    from dompre.checkpoint import save_checkpoint
    from dompre.data.store import store_preparation
    from dompre.data.ingest import IngestRecipe, ingest_dicom
    from dompre.data.prep import PrepConfig
    from dompre.data.store import SliceStore
    from dompre.synth.dicom import write_dicom_series
    from dompre.export import export_timm

    yy, xx = np.mgrid[:40, :48]
    body = ((yy - 20) / 15) ** 2 + ((xx - 24) / 18) ** 2 < 1
    rng = np.random.default_rng(0)
    hu = np.stack([np.where(body, rng.normal(40, 200, body.shape), -1000.0) for _ in range(9)]).astype(np.float32)
    series = tmp_path / "dicom" / "s"
    write_dicom_series(series, hu, spacing=(2.0, 0.8, 0.8), unsigned=True)  # stored uint16, intercept -1024
    recipe = IngestRecipe(prep=PrepConfig(window=(-300.0, 500.0), size=24, crop_margin=2, min_slices=6))
    ingest_dicom(tmp_path / "dicom", tmp_path / "store", recipe=recipe, progress=False)
    store = SliceStore(tmp_path / "store")
    save_checkpoint(timm.create_model("test_efficientnet", num_classes=len(NAMES)), tmp_path / "ckpt",
                    arch="test_efficientnet", label_names=NAMES,
                    info={"preparation": store_preparation(tmp_path / "store")})
    lm = load_model(tmp_path / "ckpt")
    assert lm.prep.window == (-300.0, 500.0) and lm.prep.size == 24 and lm.input_size == (24, 24)
    assert load_model(export_timm(tmp_path / "ckpt", tmp_path / "export", check=False)["out_dir"]).prep == lm.prep
    specs = [f"{series}@{int(store.item_meta(i)['z_index'])}" for i in range(len(store))]
    items, skipped = parse_inputs(specs, lm.label_names, lm.input_size, lm.prep)  # as `dompre explain` calls it
    assert not skipped and len(items) == len(store) == 3
    for i, item in enumerate(items):
        np.testing.assert_array_equal(item.image, np.asarray(store[i]))
    default, _ = parse_inputs(specs[:1], NAMES)  # ingest's default preparation is another input
    assert not np.array_equal(default[0].image, items[0].image)
