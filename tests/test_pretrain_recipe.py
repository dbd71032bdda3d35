"""The pretraining recipe's shared optim:/loss: sections and per-role overrides: what each role trains with, the
old layout refused by name, and the resolved form a run folder keeps."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dompre.recipes import RecipeError, load_recipe, recipe_to_dict, save_recipe
from dompre.train.config import LossConfig, OptimConfig, PretrainRecipe, check_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PRETRAIN = [RECIPES / "tcia.yaml", RECIPES / "demo.yaml", RECIPES / "seeds" / "virk2020_table3_pseudo_pretrain.yaml"]


def _load(path=None, *overrides, tmp_path=None):
    return load_recipe(path, PretrainRecipe, list(overrides), base_dir=tmp_path)


def test_students_take_the_shared_sections_and_their_own_overrides_never_the_teachers(tmp_path):
    r = _load(None, "teacher.optim.lr=0.5", "teacher.loss.focal_gamma=0", "student.optim.weight_decay=0.001",
              tmp_path=tmp_path)
    assert r.optim_for("teacher") == OptimConfig(lr=0.5)
    assert r.loss_for("teacher") == LossConfig(focal_gamma=0.0)
    assert r.optim_for("student") == OptimConfig(weight_decay=0.001)  # lr 0.01 and the loss from the shared ones
    assert r.loss_for("student") == LossConfig() == r.loss_for("pseudo_pretrain")
    shared = _load(None, "optim.lr=0.003", "loss.focal_gamma=0", "student.loss.hard_fraction=0.5", tmp_path=tmp_path)
    assert shared.optim_for("teacher").lr == shared.optim_for("student").lr == 0.003
    assert shared.loss_for("student") == LossConfig(focal_gamma=0.0, hard_fraction=0.5)
    assert shared.loss_for("teacher").hard_fraction == 0.0
    # pseudo_pretrain keeps its own optimizer (the paper's SGD); its loss is the shared one
    assert shared.optim_for("pseudo_pretrain") == OptimConfig(opt="sgd", lr=0.01, weight_decay=5e-4)
    assert shared.loss_for("pseudo_pretrain").focal_gamma == 0.0
    with pytest.raises(ValueError, match="role 'oracle'"):
        shared.optim_for("oracle")


@pytest.mark.parametrize("key,value,new_place", [
    ("teacher.lr", 0.003, r"teacher\.lr has moved.*optim\.lr \(both\).*teacher\.optim\.lr \(the teacher only\)"),
    ("teacher.opt", "sgd", r"teacher\.opt has moved.*optim\.opt"),
    ("teacher.focal_gamma", 0.0, r"teacher\.focal_gamma has moved.*loss\.focal_gamma.*teacher\.loss\.focal_gamma"),
    ("teacher.max_label_weight", 5.0, r"teacher\.max_label_weight has moved.*loss\.max_label_weight"),
    ("student.lr", 0.003, r"student\.lr has moved.*student\.optim\.lr.*optim\.lr"),
])
def test_old_layout_is_refused_naming_the_key_and_its_new_place(tmp_path, key, value, new_place):
    section, name = key.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({section: {name: value}}))
    with pytest.raises(RecipeError, match=new_place) as e:
        _load(path, tmp_path=tmp_path)
    assert str(e.value).startswith(str(path))
    with pytest.raises(RecipeError, match=new_place):  # a command-line override too
        _load(None, f"{key}={value}", tmp_path=tmp_path)


@pytest.mark.parametrize("path", PRETRAIN, ids=lambda p: p.name)
def test_every_pretraining_recipe_loads_and_its_run_folder_copy_keeps_each_roles_settings(path, tmp_path):
    r = _load(path, tmp_path=tmp_path)
    check_recipe(r)
    saved = save_recipe(r.resolved(), tmp_path / "run" / "recipe.yaml", header="resolved\nsecond line")
    assert saved.read_text().startswith("# resolved\n# second line\n")
    plain = yaml.safe_load(saved.read_text())
    for role in ("teacher", "student"):  # every key written out: readable without the shared sections
        assert plain[role]["optim"] == recipe_to_dict(r.optim_for(role))
        assert plain[role]["loss"] == recipe_to_dict(r.loss_for(role))
        assert None not in plain[role]["optim"].values()
    assert plain["pseudo_pretrain"]["loss"] == recipe_to_dict(r.loss_for("pseudo_pretrain"))
    again = _load(saved, tmp_path=tmp_path)
    for role in PretrainRecipe.ROLES:
        assert again.optim_for(role) == r.optim_for(role) and again.loss_for(role) == r.loss_for(role)
    assert again.resolved() == r.resolved()


def test_the_recipes_keep_their_settings():
    """The values each recipe's roles trained with before optim:/loss: were shared (teacher: held them)."""
    tcia, demo, virk = (_load(p) for p in PRETRAIN)
    for role in ("teacher", "student"):
        assert tcia.optim_for(role) == OptimConfig(opt="lookahead_radam", lr=0.01, weight_decay=1e-4)
        assert tcia.loss_for(role) == LossConfig(focal_gamma=2.0)
        assert demo.optim_for(role) == OptimConfig(lr=0.01, warmup_epochs=2.0)
        assert demo.loss_for(role) == LossConfig(focal_gamma=0.0)
        assert virk.optim_for(role) == OptimConfig(lr=0.01)
    assert virk.optim_for("pseudo_pretrain") == OptimConfig(opt="sgd", lr=0.01, weight_decay=5e-4)
    assert demo.loss_for("pseudo_pretrain") == LossConfig(focal_gamma=0.0)


def test_check_recipe_names_the_role_of_a_bad_loss_setting(tmp_path):
    with pytest.raises(ValueError, match=r"student\.loss\.hard_fraction\)=1\.5"):
        check_recipe(_load(None, "student.loss.hard_fraction=1.5", tmp_path=tmp_path))
    with pytest.raises(ValueError, match=r"teacher\.loss\.max_label_weight\)=0\.0"):
        check_recipe(_load(None, "loss.max_label_weight=0", tmp_path=tmp_path))
