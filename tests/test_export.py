"""Checkpoints and timm exports: round trips, strictness, no unpickling, and loading in a fresh process."""
import json
import os
import shutil
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
from dompre.checkpoint import load_checkpoint, record_metrics, save_checkpoint
from dompre.data.store import run_preparation, store_preparation
from dompre.export import export_timm, is_export

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


def test_one_unwrapper_for_training_files_and_maknets_timm_loader(tmp_path):
    from dompre.checkpoint import unwrap_state_dict
    from dompre.models.maknet import checkpoint_filter_fn

    w = torch.ones(2)
    saved = {"epoch": 3, "model_state_dict": {"state_dict": {"_orig_mod.module.a": w, "b": w, "step": 7}}}
    assert list(unwrap_state_dict(saved)) == ["a", "b"]  # nested containers, compile + DDP prefixes, no scalars
    assert list(checkpoint_filter_fn(saved, None)) == ["a", "b"]
    torch.manual_seed(0)
    model = timm.create_model("maknet_tiny", num_classes=2).eval()
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 1}, tmp_path / "w.pth")
    loaded = timm.create_model("maknet_tiny", num_classes=2, pretrained=True,  # timm runs the filter
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth"), num_classes=2)).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


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


@pytest.fixture(scope="module")
def ct_store(tmp_path_factory):
    """A real `dompre ingest dicom` store of one synthetic patient, prepared with a soft-tissue window."""
    from dompre.data.ingest import ingest_dicom, load_ingest_recipe
    from dompre.synth.cohort import generate_cohort

    root = tmp_path_factory.mktemp("ct")
    generate_cohort(root / "cohort", patients=1, seed=0, layout="dicom", matrix=64, max_slices=60, quirk_rate=0)
    recipe = load_ingest_recipe(None, ("prep.window=[-160,240]", "prep.size=32", "prep.stride=2",
                                       "prep.min_slices=10"))
    ingest_dicom(root / "cohort" / "dicom", root / "store", recipe=recipe, progress=False)
    return root / "store"


def _front_matter(card: str) -> dict:
    head = card.split("---\n")[1]
    return dict(line.split(": ", 1) for line in head.strip().splitlines())


def test_card_and_config_facts_come_from_the_checkpoint_and_the_store(tmp_path, ct_store, monkeypatch):
    prep = store_preparation(ct_store)
    _, ck = _maknet(tmp_path, input_size=[3, 48, 48], preparation=prep)
    kept = record_metrics(ck, {"thresholds": [0.5] * 5, "test": {"auc": 0.8123, "f1": 0.25, "n_inputs": 12},
                               "test_per_label": {"liver": {"auc": 0.9}}})
    assert kept == {"test": {"auc": 0.8123, "f1": 0.25, "n_inputs": 12}}
    _no_unpickling(monkeypatch)
    result = export_timm(ck, tmp_path / "out", card="demo export")
    assert result["max_abs_diff"] == 0.0
    record = json.loads((ck / "checkpoint.json").read_text())
    info = record["info"]
    manifest = json.loads((ct_store / "manifest.json").read_text())
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architecture"] == record["arch"] and cfg["num_classes"] == 5 and cfg["label_names"] == LABELS
    assert cfg["model_args"] == record["model_kwargs"]
    assert {"in_chans": 3, "global_pool": "fastcatavgmax", "num_classes": 5}.items() <= cfg["model_args"].items()
    pcfg = cfg["pretrained_cfg"]
    assert pcfg["input_size"] == info["input_size"] and pcfg["mean"] == [0.5] * 3 and pcfg["std"] == [0.5] * 3
    assert pcfg["license"] == "bsd-3-clause" and "MAKNet" in pcfg["paper_name"]
    d = cfg["dompre"]
    assert d["hu_window"] == manifest["info"]["prep"]["window"] == [-160.0, 240.0]
    assert d["preparation"] == info["preparation"]
    assert d["preparation"]["stride"] == 2 == manifest["info"]["prep"]["stride"]
    assert d["preparation"]["size"] == manifest["image_size"] == 32 and d["slices"] == ["z-1", "z", "z+1"]
    assert any("[-160.0, 240.0]" in n and "resized to 48x48" in n for n in pcfg["notes"])
    card = (tmp_path / "out" / "README.md").read_text()
    front = _front_matter(card)
    assert front["license"] == "bsd-3-clause" and front["pipeline_tag"] == "image-classification"
    input_line = next(line for line in card.splitlines() if line.startswith("- Input:"))
    assert input_line.startswith("- Input: 3x48x48;") and "256" not in input_line
    assert "[-160.0, 240.0]" in input_line and "stored at 32x32" in input_line and "resized to 48x48" in input_line
    for text in ("Noisy Student iteration: 2", "| test auc | 0.8123 |", "| test f1 | 0.2500 |",
                 "| test n_inputs | 12 |", "stride=2", "source=dicom", info["data"], "## Intended use",
                 "## Limits", "demo export", ", ".join(LABELS), '"in_chans": 3'):
        assert text in card, text
    assert "none recorded" not in card and "apache" not in card
    assert f"{sum(p.numel() for p in load_checkpoint(ck)[0].parameters()):,} parameters" in card


def test_run_preparation_names_an_unlabeled_store_prepared_otherwise(ct_store, tmp_path):
    from dompre.data.ingest import ingest_dicom, load_ingest_recipe
    from dompre.data.store import StoreWriter

    ingest_dicom(ct_store.parent / "cohort" / "dicom", tmp_path / "wide", progress=False,
                 recipe=load_ingest_recipe(None, ("prep.size=32", "prep.min_slices=10")))
    assert run_preparation(ct_store, ct_store) == {"preparation": store_preparation(ct_store)}
    both = run_preparation(ct_store, tmp_path / "wide")
    assert both["preparation"]["window"] == [-160.0, 240.0]
    assert both["unlabeled_preparation"]["window"] == [-1024.0, 3071.0]
    with StoreWriter(tmp_path / "bare", image_size=32) as w:  # not written by `dompre ingest`
        w.commit_unit("u")
    assert store_preparation(tmp_path / "bare") is None


def test_plain_timm_export_records_its_constructor_and_drops_imagenet_provenance(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=2, in_chans=1, global_pool="max").eval()
    ck = save_checkpoint(model, tmp_path / "ck", arch="resnet18", label_names=["a", "b"])
    kwargs = json.loads((ck / "checkpoint.json").read_text())["model_kwargs"]
    assert {"in_chans": 1, "global_pool": "max", "num_classes": 2}.items() <= kwargs.items()
    assert export_timm(ck, tmp_path / "out")["max_abs_diff"] == 0.0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    pcfg = cfg["pretrained_cfg"]
    assert pcfg["input_size"][0] == 1 and cfg["model_args"]["in_chans"] == 1
    assert not {"paper_ids", "paper_name", "origin_url", "hf_hub_id"} & set(pcfg) and pcfg["license"] == "bsd-3-clause"
    assert "hu_window not recorded" in pcfg["notes"]
    assert cfg["dompre"]["hu_window"] is None and cfg["dompre"]["preparation"] is None
    card = (tmp_path / "out" / "README.md").read_text()
    assert "HU window: not recorded" in card and "arxiv" not in card.lower()


def test_export_replaces_only_dompre_exports_unless_overwrite(tmp_path, capsys):
    from dompre.cli import main

    _, ck = _maknet(tmp_path)
    out = tmp_path / "out"
    export_timm(ck, out, check=False)
    assert (out / ".dompre-export").is_file() and is_export(out)
    (out / "README.md").write_text("stale")
    export_timm(ck, out, check=False)  # an earlier export is replaced
    assert sorted(p.name for p in out.iterdir()) == [".dompre-export", "README.md", "config.json",
                                                      "model.safetensors"]
    assert (out / "README.md").read_text() != "stale"
    # a user's folder that merely holds a config.json is not an export: refused, nothing deleted
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"dompre": {}}')
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a dompre export.*--overwrite"):
        export_timm(ck, mine, check=False)
    assert (mine / "notes.txt").read_text() == "keep me"
    assert main(["export", str(ck), str(mine)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (mine / "notes.txt").is_file()
    assert main(["export", str(ck), str(mine), "--overwrite"]) == 0
    assert not (mine / "notes.txt").exists() and is_export(mine)
    # an export written before the marker (only export files, config.json with a dompre block) is replaced
    (mine / ".dompre-export").unlink()
    assert is_export(mine)
    (mine / "extra.txt").write_text("x")
    assert not is_export(mine)
    with pytest.raises(ValueError, match="not a dompre export"):
        export_timm(ck, mine, check=False)


def test_export_card_shows_the_montage_it_is_given(tmp_path):
    _, ck = _maknet(tmp_path)
    png = b"\x89PNG\r\n\x1a\n" + b"a montage made by the caller"
    export_timm(ck, tmp_path / "out", montage=png, check=False)
    assert (tmp_path / "out" / "explanations.png").read_bytes() == png
    assert "![explanations](explanations.png)" in (tmp_path / "out" / "README.md").read_text()
    export_timm(ck, tmp_path / "hub", montage=png, check=False, hub_repo="me/model")  # the Hub layout has none
    assert not (tmp_path / "hub" / "explanations.png").exists()
    assert "## Explanations" not in (tmp_path / "hub" / "README.md").read_text()
    with pytest.raises(ValueError, match="not PNG bytes"):
        export_timm(ck, tmp_path / "bad", montage=b"GIF89a")


def test_cli_export_explain_puts_the_montage_of_its_inputs_in_the_card(tmp_path, capsys):
    from PIL import Image

    from dompre.cli import main

    _, ck = _maknet(tmp_path, input_size=[3, 32, 32])
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"x{i}.png")
    inputs = [str(tmp_path / "x0.png"), str(tmp_path / "x1.png"), str(tmp_path / "nope.png")]
    assert main(["export", str(ck), str(tmp_path / "out"), "--explain", *inputs]) == 0
    err = capsys.readouterr().err
    assert "skipped explanation input" in err and "nope.png" in err
    assert Image.open(tmp_path / "out" / "explanations.png").size[0] > 100
    assert "![explanations](explanations.png)" in (tmp_path / "out" / "README.md").read_text()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")  # refused before any explaining
    assert main(["export", str(ck), str(tmp_path / "taken"), "--explain", *inputs]) == 2
    assert "--overwrite" in capsys.readouterr().err


def _run_fresh(code: str, **env: str) -> dict:
    """Run ``code`` in a new interpreter; it prints one JSON line."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_CHECK = """
    import json, sys, torch, timm
    {imports}
    from safetensors.torch import load_file, save_file
    out, arch, kw = {out!r}, {arch!r}, {kwargs!r}
    torch.load = None  # loading must not unpickle
    x = load_file({x!r})["x"]
    m = timm.create_model("local-dir:" + out, pretrained=True).eval()
    k = timm.create_model("local-dir:" + out, pretrained=True, num_classes=3).eval()
    f = timm.create_model("local-dir:" + out, pretrained=True, features_only=True).eval()
    # a named architecture (with the card's constructor arguments): the weights file alone gives the backbone
    # (the registry cfg's head size differs); with the exported num_classes in the overlay it keeps the head
    b = timm.create_model(arch, pretrained=True, num_classes=0,
                          pretrained_cfg_overlay=dict(file=out + "/model.safetensors"), **kw).eval()
    n = timm.create_model(arch, pretrained=True, num_classes=5,
                          pretrained_cfg_overlay=dict(file=out + "/model.safetensors", num_classes=5), **kw).eval()
    with torch.no_grad():
        save_file({{"y": m(x), "yn": n(x), "fb": b.forward_features(x), "fm": m.forward_features(x)}}, {y!r})
        print(json.dumps(dict(k=list(k(x).shape), feats=len(f(x)), dompre="dompre" in sys.modules,
                              labels=list(m.pretrained_cfg.get("label_names") or []),
                              input_size=list(m.pretrained_cfg["input_size"]), in_chans=m.in_chans)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch,kwargs", [("maknet_tiny", {}), ("resnet18", {"in_chans": 1, "global_pool": "max"})])
def test_export_loads_in_a_fresh_process_with_equal_outputs(tmp_path, ct_store, arch, kwargs):
    """MAKNet with `import dompre`; a plain timm architecture (1 channel, max pooling) without it."""
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=5, **kwargs).eval()
    c = kwargs.get("in_chans", 3)
    ck = save_checkpoint(model, tmp_path / "ck", arch=arch, label_names=LABELS,
                         info=dict(input_size=[c, 48, 48], preparation=store_preparation(ct_store)))
    export_timm(ck, tmp_path / "out", check=False)
    x = torch.randn(2, c, 64, 64)
    save_file({"x": x}, tmp_path / "x.safetensors")
    imports = "import dompre" if arch.startswith("maknet") else ""
    res = _run_fresh(_CHECK.format(imports=imports, out=str(tmp_path / "out"), arch=arch, kwargs=kwargs,
                                   x=str(tmp_path / "x.safetensors"), y=str(tmp_path / "y.safetensors")))
    with torch.no_grad():
        expected = model(x)
    got = load_file(tmp_path / "y.safetensors")
    torch.testing.assert_close(got["y"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["yn"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["fb"], got["fm"], rtol=0, atol=0)
    assert res["k"] == [2, 3] and res["feats"] >= 4 and res["labels"] == LABELS
    assert res["dompre"] is arch.startswith("maknet")
    record = json.loads((ck / "checkpoint.json").read_text())
    assert res["input_size"] == record["info"]["input_size"] and res["in_chans"] == record["model_kwargs"]["in_chans"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"- Input: {c}x48x48;" in card and ("import dompre" in card) is arch.startswith("maknet")


@pytest.mark.slow
def test_hub_layout_is_push_to_hf_hubs_folder_and_loads_from_an_offline_hub_cache(tmp_path, monkeypatch):
    from timm.models import save_for_hf

    model, ck = _maknet(tmp_path)
    repo = "dompre-test/maknet-tiny-ct"
    export_timm(ck, tmp_path / "hub", hub_repo=repo, card="hub export")
    # push_to_hf_hub(..., safe_serialization=True) uploads save_for_hf's files plus README.md
    save_for_hf(model, str(tmp_path / "timm"), safe_serialization=True)
    want = sorted([p.name for p in (tmp_path / "timm").iterdir()] + ["README.md"])
    assert sorted(p.name for p in (tmp_path / "hub").iterdir() if not p.name.startswith(".")) == want
    card = (tmp_path / "hub" / "README.md").read_text()
    assert f'timm.create_model("hf-hub:{repo}", pretrained=True)' in card and "local-dir" not in card
    # a local Hugging Face cache holding that folder as the repo's main revision
    rev = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hf-cache"
    shutil.copytree(tmp_path / "hub", cache / f"models--{repo.replace('/', '--')}" / "snapshots" / rev,
                    ignore=shutil.ignore_patterns(".*"))
    (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text(rev)
    x = torch.randn(2, 3, 64, 64)
    save_file({"x": x}, tmp_path / "x.safetensors")
    res = _run_fresh(f"""
        import json, torch, timm, dompre
        from safetensors.torch import load_file, save_file
        torch.load = None
        m = timm.create_model("hf-hub:{repo}", pretrained=True).eval()
        with torch.no_grad():
            y = m(load_file({str(tmp_path / "x.safetensors")!r})["x"])
            save_file({{"y": y}}, {str(tmp_path / "y.safetensors")!r})
        print(json.dumps(dict(labels=list(m.pretrained_cfg.get("label_names") or []))))
    """, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    with torch.no_grad():
        torch.testing.assert_close(load_file(tmp_path / "y.safetensors")["y"], model(x), rtol=1e-5, atol=1e-5)
    assert res["labels"] == LABELS


def test_cli_export_writes_and_reports(tmp_path, capsys):
    from dompre.cli import main

    _, ck = _maknet(tmp_path)
    assert main(["export", str(ck), str(tmp_path / "out"), "--card-note", "from the CLI"]) == 0
    assert "exported maknet_tiny" in capsys.readouterr().out
    assert "from the CLI" in (tmp_path / "out" / "README.md").read_text()
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "out2")]) == 2
    assert "checkpoint.json" in capsys.readouterr().err


def test_cli_hub_layout_names_the_repo_and_rejects_a_bad_one(tmp_path, capsys):
    from dompre.cli import main

    _, ck = _maknet(tmp_path)
    assert main(["export", str(ck), str(tmp_path / "hub"), "--hub-layout", "me/ct-model"]) == 0
    assert "hf-hub:me/ct-model" in capsys.readouterr().out
    assert 'timm.create_model("hf-hub:me/ct-model", pretrained=True)' in (tmp_path / "hub" / "README.md").read_text()
    assert main(["export", str(ck), str(tmp_path / "hub2"), "--hub-layout", "no-owner"]) == 2
    assert "OWNER/NAME" in capsys.readouterr().err and not (tmp_path / "hub2").exists()
