"""YAML recipes -> frozen dataclasses.

A recipe schema is a tree of frozen dataclasses. :func:`load_recipe` reads a YAML file into it and
rejects, with the file, the dotted key, the bad value and the valid choices in the message:
unknown keys, values of the wrong type, values outside a ``Literal`` and paths that do not exist.
Command-line overrides ``section.key=value`` are parsed as YAML scalars and checked the same way. A schema
may name keys it has moved (a ``MOVED`` class attribute: dotted old key -> where it lives now); a recipe or
override that still uses one is refused with that hint, never read with a new meaning.
:func:`save_recipe` writes the resolved recipe next to a run's outputs.

Path fields are marked with ``field(metadata=PATH)`` (or ``PATH_MUST_EXIST``); relative paths are
resolved against the recipe file's folder, so a recipe can be run from anywhere. An empty string or null
means "not set" and is left as it is.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union

import yaml

from dompre._io import write_atomic
from dompre.errors import UserError

T = TypeVar("T")

PATH = {"path": True}
PATH_MUST_EXIST = {"path": True, "must_exist": True}


class RecipeError(UserError):
    """A recipe that cannot be used; the message names the file, the key and the fix."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against type ``tp``; return it converted (lists -> tuples, int -> float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise RecipeError(f"{where}: {value!r} is not valid; choose one of {', '.join(map(repr, choices))}")
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except RecipeError:
                pass
        raise RecipeError(f"{where}: {value!r} is not {_type_name(tp)}")
    if tp is type(None):
        if value is not None:
            raise RecipeError(f"{where}: {value!r} is not null")
        return None
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: {value!r} is not {_type_name(tp)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise RecipeError(f"{where}: {value!r} must have {len(args)} items ({_type_name(tp)})")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: {value!r} is not a bool (use true or false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: {value!r} is not an int")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: {value!r} is not a float")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: {value!r} is not a string")
        return value
    raise RecipeError(f"{where}: unsupported field type {tp!r}")  # schema bug, not user error


def _build(cls: type[T], data: dict, where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise RecipeError(f"unknown key {key!r}; valid keys{' in ' + where if where else ''}: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"missing key {(where + '.' if where else '') + missing[0]!r} (required)")
    return cls(**kwargs)


def _resolve_paths(obj: Any, base: Path, where: str = "") -> Any:
    """Resolve path fields against ``base`` and check the ones that must exist."""
    if not dataclasses.is_dataclass(obj):
        return obj
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{where}.{f.name}" if where else f.name
        if f.metadata.get("path") and isinstance(value, str) and value != "":
            p = Path(value).expanduser()
            p = p if p.is_absolute() else (base / p)
            if f.metadata.get("must_exist") and not p.exists():
                raise RecipeError(f"{key}: path {value!r} does not exist (resolved to {p}); fix the path or create it")
            changes[f.name] = str(p.resolve())
        elif dataclasses.is_dataclass(value):
            changes[f.name] = _resolve_paths(value, base, key)
    return dataclasses.replace(obj, **changes) if changes else obj


def parse_overrides(overrides: Sequence[str]) -> dict:
    """``["a.b=1", "c=x"]`` -> nested dict ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise RecipeError(f"override {item!r}: value is not valid YAML ({e})") from None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r} conflicts with another override of {p!r}")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _check_moved(data: dict, moved: dict[str, str]) -> None:
    """Refuse keys a schema has moved (its ``MOVED`` dict: dotted old key -> where it lives now), naming each."""
    found = []
    for key, hint in moved.items():
        node: Any = data
        for part in key.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT:
            found.append(f"{key} has moved: {hint}")
    if found:
        raise RecipeError("; ".join(found))


_ABSENT = object()


def load_recipe(path: str | Path | None, schema: type[T], overrides: Sequence[str] = (),
                base_dir: str | Path | None = None) -> T:
    """Read a YAML recipe into ``schema`` with ``section.key=value`` overrides applied.

    Args:
        path: the YAML file, or None for the schema's defaults.
        schema: a frozen dataclass type.
        overrides: ``dotted.key=value`` strings; values are parsed as YAML scalars.
        base_dir: folder that relative paths resolve against (default: the recipe's folder, else cwd).

    Raises:
        FileNotFoundError: the recipe file does not exist.
        RecipeError: unknown or moved key, wrong type, invalid choice or missing path; the message names the file.
    """
    data: dict = {}
    name = "<defaults>"
    if path is not None:
        path = Path(path)
        name = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} does not exist; pass a YAML file such as recipes/demo.yaml")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    base = Path(base_dir) if base_dir is not None else (Path(path).resolve().parent if path is not None else Path.cwd())
    try:
        data = _merge(data, parse_overrides(overrides))
        _check_moved(data, getattr(schema, "MOVED", {}))
        recipe = _build(schema, data, "")
        return _resolve_paths(recipe, base)
    except RecipeError as e:
        raise RecipeError(f"{name}: {e}") from None


def recipe_to_dict(recipe: Any) -> dict:
    """A plain dict (tuples as lists) of a recipe, for YAML/JSON."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(recipe))


def changed_keys(saved: dict, new: dict, ignore: Sequence[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two recipe dicts (a saved run's and this one's), in ``new``'s
    order then the saved-only ones; a key under an ``ignore`` entry (``"train"`` or ``"train.progress"``) is not
    compared. The one check that a resumed run folder holds the same recipe."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, dict) and v else {key: v})
        return out
    a, b = flat(saved or {}), flat(new)
    skip = (lambda k: any(k == i or k.startswith(i + ".") for i in ignore))
    keys = list(b) + [k for k in a if k not in b]
    return [k for k in keys if not skip(k) and a.get(k) != b.get(k)]


def save_recipe(recipe: Any, path: str | Path, header: str = "") -> Path:
    """Write the resolved recipe as YAML (atomically), after ``header`` as ``#`` comment lines when given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    return write_atomic(path, comment + yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
