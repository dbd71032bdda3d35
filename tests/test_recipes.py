"""Recipes: YAML -> frozen dataclasses, with errors that name the file, the key, the value and the fix."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from dompre.recipes import PATH, PATH_MUST_EXIST, RecipeError, load_recipe, parse_overrides, save_recipe


@dataclass(frozen=True)
class Train:
    epochs: int = 15
    lr: float = 0.01
    opt: Literal["lookahead_radam", "sgd"] = "lookahead_radam"
    window: tuple[float, float] = (-1024.0, 3071.0)
    amp: bool = False


@dataclass(frozen=True)
class Data:
    store: str = field(default="store", metadata=PATH)
    labels: str | None = field(default=None, metadata=PATH_MUST_EXIST)
    classes: tuple[str, ...] = ("bodypart",)


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    data: Data = Data()
    train: Train = Train()


def _write(tmp_path, data) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_defaults_types_and_frozen(tmp_path):
    r = load_recipe(_write(tmp_path, {"train": {"epochs": 3, "lr": 1}, "data": {"classes": ["a", "b"]}}), Recipe)
    assert r.train.epochs == 3 and r.train.lr == 1.0 and isinstance(r.train.lr, float)
    assert r.data.classes == ("a", "b") and r.train.window == (-1024.0, 3071.0)
    assert r.data.store == str((tmp_path / "store").resolve())  # relative to the recipe's folder
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.train.epochs = 5  # type: ignore[misc]


def test_unknown_key_names_file_key_and_valid_keys(tmp_path):
    path = _write(tmp_path, {"train": {"epochz": 3}})
    with pytest.raises(RecipeError) as e:
        load_recipe(path, Recipe)
    msg = str(e.value)
    assert path in msg and "train.epochz" in msg and "epochs" in msg and "lr" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key 'trian'.*valid keys: seed, data, train"):
        load_recipe(_write(tmp_path, {"trian": {}}), Recipe)


@pytest.mark.parametrize("section,key,value,expect", [
    ("train", "epochs", "ten", r"train\.epochs: 'ten' is not an int"),
    ("train", "epochs", 2.5, r"train\.epochs: 2\.5 is not an int"),
    ("train", "amp", "yes", r"train\.amp: 'yes' is not a bool"),
    ("train", "lr", True, r"train\.lr: True is not a float"),
    ("train", "opt", "adam", r"train\.opt: 'adam' is not valid; choose one of 'lookahead_radam', 'sgd'"),
    ("train", "window", [1, 2, 3], r"train\.window: \[1, 2, 3\] must have 2 items"),
    ("data", "classes", "bodypart", r"data\.classes: 'bodypart' is not list of str"),
])
def test_wrong_types_are_named(tmp_path, section, key, value, expect):
    path = _write(tmp_path, {section: {key: value}})
    with pytest.raises(RecipeError, match=expect) as e:
        load_recipe(path, Recipe)
    assert str(e.value).startswith(path)


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(RecipeError, match=r"data\.labels: path 'nope.json' does not exist"):
        load_recipe(_write(tmp_path, {"data": {"labels": "nope.json"}}), Recipe)
    (tmp_path / "labels.json").write_text("{}")
    r = load_recipe(_write(tmp_path, {"data": {"labels": "labels.json"}}), Recipe)
    assert r.data.labels == str((tmp_path / "labels.json").resolve())
    # empty means "not set": it must not resolve to the recipe's folder and pass the existence check
    assert load_recipe(_write(tmp_path, {"data": {"labels": ""}}), Recipe).data.labels == ""


def test_missing_recipe_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe .*missing.yaml does not exist"):
        load_recipe(tmp_path / "missing.yaml", Recipe)


def test_overrides(tmp_path):
    path = _write(tmp_path, {"train": {"epochs": 3}})
    r = load_recipe(path, Recipe, ["train.epochs=7", "train.opt=sgd", "seed=3", "train.window=[0, 80]"])
    assert (r.train.epochs, r.train.opt, r.seed, r.train.window) == (7, "sgd", 3, (0.0, 80.0))
    with pytest.raises(RecipeError, match="train.epoch"):
        load_recipe(path, Recipe, ["train.epoch=7"])
    with pytest.raises(RecipeError, match="must look like section.key=value"):
        parse_overrides(["train.epochs"])
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_save_roundtrip(tmp_path):
    r = load_recipe(None, Recipe, ["train.epochs=2"], base_dir=tmp_path)
    out = save_recipe(r, tmp_path / "run" / "recipe.yaml")
    assert load_recipe(out, Recipe) == r
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_changed_keys_names_each_changed_leaf_and_skips_ignored_ones():
    from dompre.recipes import changed_keys
    saved = {"train": {"lr": 0.1, "progress": True}, "model": {"arch": "a", "head": {"k": 1}}, "seed": 0, "gone": 1}
    new = {"train": {"lr": 0.2, "progress": False}, "model": {"arch": "a", "head": {"k": 2}}, "seed": 0}
    assert changed_keys(saved, new) == ["train.lr", "train.progress", "model.head.k", "gone"]
    assert changed_keys(saved, new, ignore=("train.progress", "gone")) == ["train.lr", "model.head.k"]
    assert changed_keys(saved, new, ignore=("train", "model", "gone")) == []
    assert changed_keys(new, new) == []
