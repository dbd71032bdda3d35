"""Every recipe in recipes/seeds/ (one per source-paper experiment) runs end to end on a tiny generated copy of
its dataset's real layout (tiny sizes and, where the paper's network is large, a tiny timm stand-in)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _downstream_layouts import make_chestxray14, make_deeplesion, make_kvasir, make_pneumonia  # noqa: E402

SEEDS = Path(__file__).resolve().parents[1] / "recipes" / "seeds"
FINETUNE = sorted(p.name for p in SEEDS.glob("*.yaml") if "data" in yaml.safe_load(p.read_text())
                  and "kind" in yaml.safe_load(p.read_text())["data"])
TINY = ["data.image_size=32", "train.epochs=1", "train.batch_size=8", "train.max_steps_per_epoch=1",
        "train.eval_batch_size=16", "data.min_val=1", "train.progress=false", "data.val_fraction=0.25",
        "data.test_fraction=0.25"]
HEAVY = {"vgg16": [], "vgg16_bn": [], "vgg19": ["train.feature_layer=layer3", "train.feature_scales=[32, 40]",
                                                 "train.vlad_k=4"],
         "densenet169": ["model.n_models=2"], "resnet50": []}  # stand-in test_resnet (+ its layer names)


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


@pytest.mark.parametrize("name", FINETUNE)
def test_seed_recipe_runs_end_to_end(name, tmp_path):
    from dompre.train.finetune import load_finetune_recipe
    from dompre.train.study import run_study
    raw = yaml.safe_load((SEEDS / name).read_text())
    arch, init = raw["model"]["arch"], raw["model"].get("init", "random")
    over = [*TINY, *_layout(raw["data"]["kind"], tmp_path / "data"), f"out_dir={tmp_path / 'runs'}"]
    if arch in HEAVY:
        over += ["model.arch=test_resnet", *HEAVY[arch]]
    inits, weights = ("random",), None
    if init == "domain":  # a dompre/timm export of the stand-in backbone
        from timm.models import save_for_hf
        save_for_hf(timm.create_model("test_resnet", num_classes=3), tmp_path / "export", safe_serialization=True)
        over.append(f"model.weights={tmp_path / 'export'}")
        inits = ("random", "domain")
    elif init in ("imagenet", "meanvar") or name.startswith("kierzynka2019_init"):
        from safetensors.torch import save_file  # offline stand-in for ImageNet weights: a weights file
        save_file(timm.create_model("test_resnet" if arch in HEAVY else arch).state_dict(),
                  str(tmp_path / "w.safetensors"))
        over += ["model.init=random", f"model.weights={tmp_path / 'w.safetensors'}"]
        inits = ("random", "meanvar") if name.startswith("kierzynka2019_init") else ("random",)
    recipe = load_finetune_recipe(SEEDS / name, over)
    tsne = name.startswith("kierzynka2019_init")
    res = run_study(recipe, inits=inits, freezes=(0, 100) if tsne else (0,), seeds=1, out_dir=tmp_path / "study",
                    metric="auc_micro" if tsne else None, weights=weights, tsne=tsne)
    assert len(res["runs"]) == len(inits) * (2 if tsne and recipe.train.strategy != "features" else 1)
    assert (tmp_path / "study" / "summary.md").is_file() and all(r["fps"] > 0 for r in res["runs"])
    if tsne:
        assert (tmp_path / "study" / "tsne.png").is_file()
