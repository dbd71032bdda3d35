"""Every recipe in recipes/seeds/ (one per source-paper experiment) runs end to end on a tiny generated copy of
its dataset's real layout (tiny sizes and, where the paper's network is large, a tiny timm stand-in)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import yaml

from _downstream_layouts import make_chestxray14, make_deeplesion, make_kvasir, make_pneumonia

SEEDS = Path(__file__).resolve().parents[1] / "recipes" / "seeds"
FINETUNE = sorted(p.name for p in SEEDS.glob("*.yaml") if "data" in yaml.safe_load(p.read_text())
                  and "kind" in yaml.safe_load(p.read_text())["data"])
TINY = ["data.image_size=32", "train.epochs=1", "train.batch_size=8", "train.max_steps_per_epoch=1",
        "train.eval_batch_size=16", "data.min_val=1", "train.progress=false", "data.val_fraction=0.25",
        "data.test_fraction=0.25"]
HEAVY = {"vgg16": [], "vgg16_bn": [], "vgg19": ["train.feature_layer=layer3", "train.feature_scales=[32, 40]",
                                                 "train.vlad_k=4"],
         "densenet169": ["model.n_models=2"], "resnet50": [],
         "densenet121": ["train.freeze_until=layer2"]}  # stand-in test_resnet (+ its layer names)


def test_seed_recipes_cover_the_five_papers_with_headers():
    names = sorted(p.name for p in SEEDS.glob("*.yaml"))
    assert len(names) >= 5
    for paper in ("virk2020", "hicks2018", "boit", "dang2019", "kierzynka2019"):
        assert any(n.startswith(paper) for n in names), paper
    for n in names:
        head = [line for line in (SEEDS / n).read_text().splitlines() if line.startswith("#")]
        text = " ".join(head)
        assert head and "able" in text and "Compare with" in text and "dompre " in text, n


def _layout(kind: str, root: Path) -> list[str]:
    if kind == "kvasir":
        return [f"data.root={make_kvasir(root, per_class=4, medico=True)}"]
    if kind == "pneumonia":
        return [f"data.root={make_pneumonia(root)}"]
    if kind == "chestxray14":
        return [f"data.root={make_chestxray14(root)}", "data.val_fraction=0.3"]
    dl = make_deeplesion(root)
    return [f"data.root={dl}", f"data.labels_json={dl / 'labels.json'}", f"data.ontology={dl / 'ontology.csv'}",
            "train.batch_size=6"]


def _fake_imagenet_cache(arch: str, hub: Path) -> None:
    """Put random weights of ``arch`` where timm's ``pretrained=True`` finds its ImageNet weights offline (the
    Hugging Face cache layout), so ``model.init=imagenet`` runs for real without a download."""
    from safetensors.torch import save_file
    repo = hub / ("models--" + timm.models.get_pretrained_cfg(arch).hf_hub_id.replace("/", "--"))
    (repo / "snapshots" / "0").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("0")
    save_file(timm.create_model(arch).state_dict(), str(repo / "snapshots" / "0" / "model.safetensors"))


@pytest.mark.parametrize("name", FINETUNE)
def test_seed_recipe_runs_end_to_end(name, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from dompre.train.finetune import load_finetune_recipe
    from dompre.train.study import run_study
    raw = yaml.safe_load((SEEDS / name).read_text())
    arch, init = raw["model"]["arch"], raw["model"].get("init", "random")
    over = [*TINY, *_layout(raw["data"]["kind"], tmp_path / "data"), f"out_dir={tmp_path / 'runs'}"]
    if arch in HEAVY:
        over += ["model.arch=test_resnet", *HEAVY[arch]]
    inits = (init,)
    if name.startswith("kierzynka2019_init"):
        inits = ("imagenet", "meanvar")  # the header's study (random runs in every other recipe's test)
    elif name.startswith("virk2020"):
        inits = ("imagenet", "domain")
    if "domain" in inits:  # a dompre/timm export of the stand-in backbone
        from timm.models import save_for_hf
        save_for_hf(timm.create_model("test_resnet", num_classes=3), tmp_path / "export", safe_serialization=True)
        over.append(f"model.weights={tmp_path / 'export'}")
    if "imagenet" in inits or init == "meanvar":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        _fake_imagenet_cache("test_resnet" if arch in HEAVY else arch, tmp_path / "hub")
    recipe = load_finetune_recipe(SEEDS / name, over)
    tsne = name.startswith("kierzynka2019_init")
    res = run_study(recipe, inits=inits, freezes=(0, 100) if tsne else (0,), seeds=1, out_dir=tmp_path / "study",
                    metric="auc_micro" if tsne else None, tsne=tsne)
    assert len(res["runs"]) == len(inits) * (2 if tsne else 1)
    assert (tmp_path / "study" / "summary.md").is_file() and all(r["fps"] > 0 for r in res["runs"])
    for r in res["runs"]:
        info = __import__("json").loads((Path(r["run_dir"]) / "metrics.json").read_text())["init"]
        assert info["init"] == r["init"]
        if r["init"] == "imagenet":
            assert info["weights"].startswith("cache:")  # timm pretrained=True read the (stand-in) ImageNet file
    if tsne:  # Kierzynka: t-SNE per freeze level, convergence speed-up, auc_micro
        assert (tmp_path / "study" / "tsne.png").stat().st_size > 1000 and len(res["convergence"]) == 4
        assert res["metric"] == "auc_micro" and all(0 <= r["auc_micro"] <= 1 for r in res["runs"])
        assert all(r["best_epoch"] == 1 for r in res["runs"]) and "Convergence" in res["markdown"]
        assert all(c["speedup_vs_imagenet"] == 1.0 for c in res["convergence"])  # 1 epoch: best at epoch 1
        m = __import__("json").loads((tmp_path / "study" / "meanvar_finetune_f100_s0" / "metrics.json").read_text())
        assert m["init"]["source"] == "imagenet" and m["init"]["redrawn_tensors"] > 10
        with np.load(tmp_path / "study" / "meanvar_finetune_f100_s0" / "features.npz") as f:
            assert f["features"].shape[0] == m["n"]["test"] == f["labels"].shape[0]


def test_seed_recipe_module_names_exist_in_the_papers_networks():
    from dompre.train.finetune import freeze_layers
    import dompre  # noqa: F401
    for name in ("boit_chestxray14_densenet121.yaml", "dang2019_vgg19_sepconv.yaml"):
        raw = yaml.safe_load((SEEDS / name).read_text())
        info = freeze_layers(timm.create_model(raw["model"]["arch"], num_classes=2), 0,
                             until=raw["train"]["freeze_until"])
        assert 0 < info["n_frozen"] < info["n_layers"], name
