"""Checkpoints and timm exports: round trips, strictness, no unpickling, and loading in a fresh process."""
import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import dompre  # noqa: F401  (registers maknet)
from dompre.export import export_timm, load_checkpoint, save_checkpoint

LABELS = ["liver", "lung", "kidney", "bone", "spleen"]


def _maknet(tmp_path, **info):
    torch.manual_seed(0)
    model = timm.create_model("maknet_tiny", num_classes=len(LABELS)).eval()
    ck = save_checkpoint(model, tmp_path / "ck", arch="maknet_tiny", label_names=LABELS,
                         info=dict(iteration=2, data="synthetic cohort, 4 patients",
                                   metrics={"auc": 0.8123, "f1": 0.25}, **info))
    return model, ck


def _no_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.load called")
    monkeypatch.setattr(torch, "load", refuse)


def test_checkpoint_round_trip_is_strict_safetensors_and_carries_info(tmp_path, monkeypatch):
    model, ck = _maknet(tmp_path)
    raw = (ck / "model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    assert raw[8:9] == b"{" and json.loads(raw[8:8 + header_len])  # a safetensors header, not a pickle
    _no_unpickling(monkeypatch)
    loaded, info = load_checkpoint(ck)
    assert info["arch"] == "maknet_tiny" and info["label_names"] == LABELS and info["iteration"] == 2
    assert not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # strict: a checkpoint with a missing weight does not load silently
    state = load_file(ck / "model.safetensors")
    state.pop("stem.conv.weight")
    save_file(state, ck / "model.safetensors")
    with pytest.raises(RuntimeError, match="stem.conv.weight"):
        load_checkpoint(ck)


def test_load_checkpoint_with_new_head_keeps_the_backbone(tmp_path):
    model, ck = _maknet(tmp_path)
    loaded, _ = load_checkpoint(ck, num_classes=3)
    assert loaded.get_classifier().out_features == 3
    torch.testing.assert_close(loaded.stem.conv.weight, model.stem.conv.weight)
    torch.testing.assert_close(loaded.spl.weight, torch.eye(3))


def test_save_checkpoint_unwraps_ddp_style_wrappers(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("maknet_tiny", num_classes=2)
    wrapper = torch.nn.Module()
    wrapper.module = model  # what DistributedDataParallel / accelerate hand back
    save_checkpoint(wrapper, tmp_path / "ck", arch="maknet_tiny", label_names=["a", "b"])
    assert set(load_file(tmp_path / "ck" / "model.safetensors")) == set(model.state_dict())


def test_save_checkpoint_rejects_bad_arguments(tmp_path):
    model = timm.create_model("maknet_tiny", num_classes=2)
    with pytest.raises(ValueError, match="2 label_names|num_classes=2"):
        save_checkpoint(model, tmp_path / "a", arch="maknet_tiny", label_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(model, tmp_path / "b", arch="maknet_tiny", label_names=None, info={"arch": "x"})
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(model, tmp_path / "c", arch="maknet_tiny", label_names=None, info={"t": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="checkpoint.json"):
        load_checkpoint(tmp_path / "missing")


def test_export_folder_has_timm_config_and_model_card(tmp_path, monkeypatch):
    _, ck = _maknet(tmp_path, hu_window=[-160, 240])
    _no_unpickling(monkeypatch)
    result = export_timm(ck, tmp_path / "out", card="demo export")
    assert result["max_abs_diff"] == 0.0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architecture"] == "maknet_tiny" and cfg["num_classes"] == 5 and cfg["label_names"] == LABELS
    pcfg = cfg["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 256, 256] and pcfg["mean"] == [0.5] * 3 and pcfg["std"] == [0.5] * 3
    assert cfg["dompre"]["hu_window"] == [-160, 240] and cfg["dompre"]["slices"] == ["z-1", "z", "z+1"]
    assert any("z-1, z, z+1" in n for n in pcfg["notes"])
    card = (tmp_path / "out" / "README.md").read_text()
    for text in ("iteration: 2", "| auc | 0.8123 |", "synthetic cohort", "## Intended use", "## Limits",
                 "demo export", "liver"):
        assert text in card, text
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not a timm export"):
        export_timm(ck, tmp_path / "junk")
    export_timm(ck, tmp_path / "out", check=False)  # an earlier export is replaced
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_export_card_shows_an_explanation_montage(tmp_path):
    _, ck = _maknet(tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    export_timm(ck, tmp_path / "out", explain_images=images)
    png = tmp_path / "out" / "explanations.png"
    from PIL import Image
    assert Image.open(png).size[0] > 100
    assert "![explanations](explanations.png)" in (tmp_path / "out" / "README.md").read_text()


def _run_fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter; it prints one JSON line."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_CHECK = """
    import json, sys, torch, timm
    {imports}
    from safetensors.torch import load_file, save_file
    out, arch = {out!r}, {arch!r}
    torch.load = None  # loading must not unpickle
    x = load_file({x!r})["x"]
    m = timm.create_model("local-dir:" + out, pretrained=True).eval()
    k = timm.create_model("local-dir:" + out, pretrained=True, num_classes=3).eval()
    f = timm.create_model("local-dir:" + out, pretrained=True, features_only=True).eval()
    # a named architecture: the weights file alone gives the backbone (the registry cfg's head size differs);
    # with the exported num_classes in the overlay it also keeps the head
    b = timm.create_model(arch, pretrained=True, num_classes=0,
                          pretrained_cfg_overlay=dict(file=out + "/model.safetensors")).eval()
    n = timm.create_model(arch, pretrained=True, num_classes=5,
                          pretrained_cfg_overlay=dict(file=out + "/model.safetensors", num_classes=5)).eval()
    with torch.no_grad():
        save_file({{"y": m(x), "yn": n(x), "fb": b.forward_features(x), "fm": m.forward_features(x)}}, {y!r})
        print(json.dumps(dict(k=list(k(x).shape), feats=len(f(x)), dompre="dompre" in sys.modules,
                              labels=list(m.pretrained_cfg.get("label_names") or []))))
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["maknet_tiny", "resnet18"])
def test_export_loads_in_a_fresh_process_with_equal_outputs(tmp_path, arch):
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=5).eval()
    ck = save_checkpoint(model, tmp_path / "ck", arch=arch, label_names=LABELS)
    export_timm(ck, tmp_path / "out", check=False)
    x = torch.randn(2, 3, 64, 64)
    save_file({"x": x}, tmp_path / "x.safetensors")
    imports = "import dompre" if arch.startswith("maknet") else ""
    res = _run_fresh(_CHECK.format(imports=imports, out=str(tmp_path / "out"), arch=arch,
                                   x=str(tmp_path / "x.safetensors"), y=str(tmp_path / "y.safetensors")))
    with torch.no_grad():
        expected = model(x)
    got = load_file(tmp_path / "y.safetensors")
    torch.testing.assert_close(got["y"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["yn"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["fb"], got["fm"], rtol=0, atol=0)
    assert res["k"] == [2, 3] and res["feats"] >= 4 and res["labels"] == LABELS
    assert res["dompre"] is arch.startswith("maknet")


def test_cli_export_writes_and_reports(tmp_path, capsys):
    from dompre.cli import main

    _, ck = _maknet(tmp_path)
    assert main(["export", str(ck), str(tmp_path / "out"), "--card-note", "from the CLI"]) == 0
    assert "exported maknet_tiny" in capsys.readouterr().out
    assert "from the CLI" in (tmp_path / "out" / "README.md").read_text()
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "out2")]) == 2
    assert "checkpoint.json" in capsys.readouterr().err
