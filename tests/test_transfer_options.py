"""Transfer options of the source papers: meanvar / imagenet inits, small_cnn, convergence, t-SNE, auc_micro
(Kierzynka), freeze_until (Boit), head L1/L2 (Hicks), chosen-layer / multi-scale / PCA / VLAD features,
vgg19_sepconv and CLAHE (Dang). Tiny inputs, CPU, seconds each."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from _downstream_layouts import make_kvasir

from dompre.train.finetune import build_model, freeze_layers, layer_list, load_finetune_recipe, run_finetune

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.arch=test_resnet", "data.image_size=32", "train.epochs=1", "train.batch_size=8",
        "train.max_steps_per_epoch=1", "train.eval_batch_size=16", "data.min_val=1", "train.progress=false"]


@pytest.fixture(scope="module")
def kvasir(tmp_path_factory):
    return make_kvasir(tmp_path_factory.mktemp("kv"), per_class=4)


def _recipe(root, out, *extra):
    return load_finetune_recipe(None, ["data.kind=kvasir", f"data.root={root}", f"out_dir={out}", *TINY, *extra])


def _weights(path: Path, arch: str = "test_resnet", seed: int = 1) -> Path:
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    save_file(timm.create_model(arch, num_classes=5).state_dict(), str(path))
    return path


# ------------------------------------------------------------------------------------------- Kierzynka
def test_meanvar_keeps_each_layers_mean_and_std_but_not_its_weights(kvasir, tmp_path):
    w = _weights(tmp_path / "w.safetensors")
    src, _ = build_model(_recipe(kvasir, tmp_path, "model.init=file", f"model.weights={w}"), 8)
    mv, info = build_model(_recipe(kvasir, tmp_path, "model.init=meanvar", f"model.weights={w}"), 8)
    assert info["init"] == "meanvar" and info["source"] == "file" and info["redrawn_tensors"] > 10
    checked = 0
    for (name, a), (_, b) in zip(layer_list(src), layer_list(mv)):
        for pa, pb in zip(a.parameters(recurse=False), b.parameters(recurse=False)):
            if pa.numel() < 200:
                continue
            checked += 1
            sa = float(pa.detach().std())
            assert abs(float(pb.detach().mean()) - float(pa.detach().mean())) < 0.25 * sa, name
            assert abs(float(pb.detach().std()) / sa - 1) < 0.15, name
            corr = np.corrcoef(pa.detach().ravel().numpy(), pb.detach().ravel().numpy())[0, 1]
            assert abs(corr) < 0.3, name  # features destroyed: unrelated to the pretrained values
    assert checked >= 8


_IMAGENET_SCRIPT = """
import json, os, sys, timm, torch
from safetensors.torch import save_file
from dompre.train.finetune import build_model, load_finetune_recipe
hub, root, out = sys.argv[1:4]
torch.manual_seed(3)
src = timm.create_model('test_resnet')
repo = f'{hub}/hub/models--timm--test_resnet.r160_in1k'
os.makedirs(f'{repo}/snapshots/abc123'), os.makedirs(f'{repo}/refs')
open(f'{repo}/refs/main', 'w').write('abc123')
save_file(src.state_dict(), f'{repo}/snapshots/abc123/model.safetensors')
r = load_finetune_recipe(None, ['data.kind=kvasir', f'data.root={root}', f'out_dir={out}', 'model.arch=test_resnet',
                                'model.init=imagenet'])
model, info = build_model(r, 8)
print(json.dumps({'same': bool(torch.equal(model.conv1[0].weight, src.conv1[0].weight)), 'weights': info['weights']}))
"""


def test_imagenet_init_loads_cached_timm_weights_in_a_fresh_offline_process(kvasir, tmp_path):
    import json
    import os
    import subprocess
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "th"),
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([sys.executable, "-c", _IMAGENET_SCRIPT, str(tmp_path / "hf"), str(kvasir), str(tmp_path)],
                        env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    res = json.loads(ok.stdout.strip().splitlines()[-1])
    assert res["same"] and res["weights"].startswith("cache:")  # timm pretrained=True read the cached weights


def test_imagenet_init_offline_fails_at_once_with_one_line(kvasir, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from dompre.cli import main
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    rc = main(["finetune", str(ROOT / "recipes" / "kvasir.yaml"), f"data.root={kvasir}", f"out_dir={tmp_path / 'r'}",
               "model.arch=test_resnet", "model.init=imagenet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert "init=file" in err[0] and "pretrained=True" in err[0] and "test_resnet" in err[0]
    assert not (tmp_path / "r" / "metrics.json").exists()
    rc = main(["study", str(ROOT / "recipes" / "kvasir.yaml"), f"data.root={kvasir}", "model.arch=test_resnet",
               "--init", "random,imagenet", "--tsne", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "init=file" in err[0]
    assert not (tmp_path / "s").exists()  # stopped before the random cells ran, not at the first ImageNet cell


def _online_but_empty(monkeypatch, tmp_path):
    """Not offline, nothing cached; every hub call is replaced by the test (no test touches the network)."""
    import huggingface_hub.constants
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))


def test_imagenet_init_with_an_unreachable_hub_fails_after_one_request_with_one_line(kvasir, tmp_path, monkeypatch,
                                                                                     capsys):
    import huggingface_hub

    from dompre.cli import main
    _online_but_empty(monkeypatch, tmp_path)
    calls = []

    def unreachable(url, timeout=None, **kw):
        calls.append((url, timeout))
        raise ConnectionRefusedError(111, "Connection refused")

    def no_download(*a, **kw):
        raise AssertionError("hf_hub_download called although the metadata request failed")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    rc = main(["finetune", str(ROOT / "recipes" / "kvasir.yaml"), f"data.root={kvasir}", f"out_dir={tmp_path / 'r'}",
               "model.arch=test_resnet", "model.init=imagenet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert "downloading them failed" in err[0] and "Connection refused" in err[0] and "init=file" in err[0]
    assert len(calls) == 1 and calls[0][1] == 10.0  # one request of huggingface_hub's own, no retries
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_imagenet_weights_missing_from_the_cache_are_downloaded_as_timm_would(tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.errors

    from dompre.train.transfer import check_imagenet_weights
    _online_but_empty(monkeypatch, tmp_path)
    asked, fetched = [], []

    def metadata(url, timeout=None, **kw):
        asked.append(url.rsplit("/", 1)[-1])
        if url.endswith("model.safetensors"):  # this repository has only the .bin file
            err = huggingface_hub.errors.RemoteEntryNotFoundError.__new__(
                huggingface_hub.errors.RemoteEntryNotFoundError)
            Exception.__init__(err, "404 model.safetensors")
            raise err
        return object()

    def download(repo, name, revision=None, **kw):
        fetched.append((repo, name, revision))
        path = tmp_path / "dl" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"weights")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", metadata)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    hub_id = timm.models.get_pretrained_cfg("resnet18").hf_hub_id
    got = check_imagenet_weights("resnet18")
    assert got == f"download:{tmp_path / 'dl' / 'pytorch_model.bin'}"
    assert asked == ["model.safetensors", "pytorch_model.bin"]  # timm's order: the safetensors alternative first
    assert fetched == [(hub_id, "pytorch_model.bin", None)]


def test_small_cnn_is_four_7x7_blocks_registered_in_timm():
    import dompre  # noqa: F401
    model = timm.create_model("small_cnn", num_classes=3, in_chans=1)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.kernel_size == (7, 7) for c in convs) and convs[0].in_channels == 1
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 3)
    feats = timm.create_model("small_cnn", features_only=True)(torch.zeros(1, 3, 32, 32))
    assert [f.shape[1] for f in feats] == [32, 64, 128, 256] and feats[-1].shape[-1] == 2


def test_convergence_and_speedup_closed_form():
    from dompre.train.study import convergence_table
    from dompre.train.transfer import convergence
    hist = [{"val_loss": 1.0, "val_score": 0.2}, {"val_loss": 0.5, "val_score": 0.6},
            {"val_loss": 0.7, "val_score": 0.6}, {"val_loss": 0.4, "val_score": 0.1}]
    assert convergence(hist) == {"best_epoch": 2, "best_val_score": 0.6, "best_loss_epoch": 4, "epochs": 4}
    runs = pd.DataFrame({"init": ["random"] * 2 + ["domain"] * 2, "strategy": "finetune", "freeze": 0.0,
                         "best_epoch": [8.0, 12.0, 4.0, 6.0]})
    conv = convergence_table(runs, "random").set_index("init")
    assert conv.loc["domain", "mean_best_epoch"] == 5 and conv.loc["domain", "speedup_vs_random"] == 2.0
    assert conv.loc["random", "speedup_vs_random"] == 1.0


def test_auc_micro_closed_form():
    from dompre.train.metrics import auc_micro
    labels = np.array([[1, 0], [0, 1], [1, np.nan]], float)
    scores = np.array([[0.9, 0.3], [0.2, 0.8], [0.4, 0.99]])
    # certain elements: positives 0.9, 0.8, 0.4; negatives 0.3, 0.2 -> 5 of 6 pairs ordered (0.4 > 0.3, 0.2 ✓)
    assert auc_micro(scores, labels) == pytest.approx(6 / 6)
    scores[0, 1] = 0.5  # negative 0.5 now beats the positive 0.4
    assert auc_micro(scores, labels) == pytest.approx(5 / 6)
    assert np.isnan(auc_micro(np.ones((2, 1)), np.ones((2, 1))))


# ------------------------------------------------------------------------------------------- Boit, Hicks
def test_freeze_until_counts_trainable_parameters_exactly():
    model = timm.create_model("test_resnet", num_classes=3)
    total = sum(p.numel() for p in model.parameters())
    info = freeze_layers(model, 0, until="layer1")
    below = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in ("conv1", "bn1", "layer1"))
    assert info["trainable_params"] == total - below == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert not model.layer1[0].conv1.weight.requires_grad and model.layer2[0].conv1.weight.requires_grad
    one = timm.create_model("test_resnet", num_classes=3)
    info = freeze_layers(one, 0, until="conv1.0")  # a single conv: exactly its weight
    assert total - info["trainable_params"] == one.conv1[0].weight.numel()
    with pytest.raises(KeyError, match="valid names include.*layer1"):
        freeze_layers(timm.create_model("test_resnet", num_classes=3), 0, until="layer9")
    with pytest.raises(KeyError, match="freeze_until='fc'"):
        freeze_layers(timm.create_model("test_resnet", num_classes=3), 0, until="fc")


def test_head_penalty_closed_form_and_it_shrinks_the_classifier(kvasir, tmp_path):
    from safetensors.torch import load_file

    from dompre.train.transfer import head_penalty
    head = torch.nn.Linear(2, 1)
    with torch.no_grad():
        head.weight[:] = torch.tensor([[1.0, -2.0]])
        head.bias[:] = 3.0
    assert float(head_penalty(head, 0.5, 0.0).detach()) == pytest.approx(3.0)
    assert float(head_penalty(head, 0.0, 0.1).detach()) == pytest.approx(1.4)
    assert head_penalty(head, 0, 0) is None
    norms = {}
    for name, extra in (("plain", []), ("l1", ["train.head_l1=10"]), ("l2", ["train.head_l2=10"])):
        run_finetune(_recipe(kvasir, tmp_path / name, "train.lr=0.01", "train.epochs=2", "train.max_steps_per_epoch=2",
                             "train.weight_decay=0", "train.sched=none", "train.freeze=100", *extra))
        norms[name] = float(load_file(str(tmp_path / name / "model_0.safetensors"))["fc.weight"].abs().sum())
    assert norms["l1"] < 0.8 * norms["plain"] and norms["l2"] < 0.8 * norms["plain"]


# ------------------------------------------------------------------------------------------- Dang
def test_features_from_layer_pool_and_scales(kvasir, tmp_path):
    from dompre.data.downstream import Kvasir
    from dompre.data.prep import InputPrep
    from dompre.train.engine import Items, batch_loader
    from dompre.train.features import extract, resolve_layer
    model = timm.create_model("test_resnet", num_classes=8).eval()
    ds = Kvasir(kvasir, image_size=32)
    dl = batch_loader(Items(ds), range(6), 4)
    prep = InputPrep(None, [0, 0, 0], [1, 1, 1], scale=1.0)
    assert resolve_layer(model, "1") is resolve_layer(model, model.feature_info[1]["module"])
    avg, y, _ = extract(model, dl, prep, layer="layer2")
    mx, _, _ = extract(model, dl, prep, layer="layer2", pool="max")
    two, _, _ = extract(model, dl, prep, layer="layer2", scales=(32, 48))
    assert avg.shape == mx.shape == (6, 48) and y.shape == (6, 8)  # test_resnet layer2: 48 channels
    assert (mx >= avg - 1e-6).all() and not np.allclose(mx, avg)
    assert two.shape == (6, 2 * avg.shape[1]) and np.allclose(two[:, :avg.shape[1]], avg, atol=1e-5)
    with pytest.raises(KeyError, match="feature stages"):
        extract(model, dl, prep, layer="17")


def test_vlad_of_a_hand_made_set_equals_the_closed_form():
    from dompre.train.features import vlad
    centres = np.array([[0.0, 0.0], [10.0, 0.0]])
    desc = [np.array([[1.0, 1.0], [-1.0, 2.0], [9.0, 0.0], [12.0, 1.0]]), np.array([[0.0, 0.0]])]
    v = vlad(desc, centres)
    raw = np.array([0.0, 3.0, 1.0, 1.0])  # centre 0: (1,1)+(-1,2); centre 1: (-1,0)+(2,1)
    np.testing.assert_allclose(v[0], raw / np.linalg.norm(raw))
    np.testing.assert_array_equal(v[1], 0)  # a descriptor on its centre: zero residual stays zero


def test_feature_strategy_pca_and_vlad_end_to_end(kvasir, tmp_path):
    base = ["train.strategy=features", "train.feature_layer=layer2", "data.val_fraction=0.25",
            "data.test_fraction=0.25"]
    pca = run_finetune(_recipe(kvasir, tmp_path / "p", *base, "train.feature_encoding=pca", "train.pca_dim=5",
                               "train.feature_pool=max"))
    assert pca["feature_dim"] == 5
    vl = run_finetune(_recipe(kvasir, tmp_path / "v", *base, "train.feature_encoding=vlad", "train.vlad_k=3",
                              "train.feature_scales=[32, 40]"))
    assert vl["feature_dim"] == 3 * 48  # k centres x layer2's 48 channels
    assert 0 <= vl["test"]["accuracy"] <= 1


def test_vgg19_sepconv_takes_vgg19_weights_in_blocks_1_to_3(kvasir, tmp_path):
    from safetensors.torch import save_file
    import dompre  # noqa: F401
    model = timm.create_model("vgg19_sepconv", num_classes=3)
    convs = [m for m in model.features[19:].modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 16 and all(c.groups == c.in_channels for c in convs[::2])  # depthwise + pointwise
    assert model.drop.p == 0.5 and model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    torch.manual_seed(0)
    vgg = {k: torch.randn_like(v) for k, v in model.state_dict().items() if k.startswith("features.")
           and int(k.split(".")[1]) < 19}  # timm vgg19's 'features' names of blocks 1-3
    vgg["pre_logits.fc1.weight"] = torch.zeros(4096, 512, 7, 7)[:1]  # a vgg19 tensor the model does not have
    save_file(vgg, str(tmp_path / "vgg19.safetensors"))
    r = _recipe(kvasir, tmp_path, "model.arch=vgg19_sepconv", "model.init=file",
                f"model.weights={tmp_path / 'vgg19.safetensors'}", "train.freeze_until=features.18")
    net, info = build_model(r, 3)
    assert torch.equal(net.features[16].weight, vgg["features.16.weight"]), info
    assert torch.equal(net.features[0].bias, vgg["features.0.bias"])
    f = freeze_layers(net, 0, until="features.18")
    assert f["n_frozen"] == 8 and all(n.startswith("features.") and int(n.split(".")[1]) < 19 for n in f["frozen"])


def test_clahe_option_equalises_the_images(kvasir, tmp_path):
    from dompre.data.downstream import Clahe, Kvasir
    flat = torch.from_numpy(np.tile(np.linspace(100, 140, 32, dtype=np.uint8), (3, 32, 1)))
    for color in (False, True):
        out = Clahe(2.0, 4, color=color)(flat)
        assert out.dtype == torch.uint8 and out.shape == flat.shape
        assert float(out.float().std()) > 1.2 * float(flat.float().std())  # contrast stretched
    plain = Kvasir(kvasir, image_size=32)
    eq = Kvasir(kvasir, image_size=32, transform=Clahe(2.0, 8, color=True))
    assert torch.equal(eq[3]["image"], Clahe(2.0, 8, color=True)(plain[3]["image"]))
    from dompre.train.finetune import prepare_data
    ds, _ = prepare_data(_recipe(kvasir, tmp_path / "c", "data.clahe=true", "data.clahe_tiles=4"))
    assert torch.equal(ds[3]["image"], Clahe(2.0, 4, color=True)(plain[3]["image"]))  # the recipe switch applies it
    assert not torch.equal(ds[3]["image"], plain[3]["image"])


def test_imagenet_weights_failing_inside_timm_become_one_line(kvasir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    import dompre.train.finetune as ft
    import dompre.train.transfer as tr
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # timm's own hub call then fails at once, without the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    for mod in (ft, tr):  # as if the check had seen the file, which then went missing before timm read it
        monkeypatch.setattr(mod, "check_imagenet_weights", lambda arch, timeout=10.0: "cache:gone")
    r = _recipe(kvasir, tmp_path, "model.init=imagenet")
    with pytest.raises(FileNotFoundError) as err:
        build_model(r, 8)
    msg = str(err.value)
    assert "\n" not in msg and "loading them failed" in msg and "init=file" in msg and "test_resnet" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__
