"""Recipe loading: YAML (with an optional `defaults:` list) merged onto `RunConfig`, then CLI dotlist.

Errors a user can make (unknown recipe, unreadable YAML, unknown key, wrong type) raise `UserError`
with one message naming what was wrong, what was expected and what to do.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import importlib.util
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from rlx.config.schema import RunConfig
from rlx.errors import UserError
from rlx.trainers.catalog import trainer_spec


def shipped_dir(name: str) -> Path:
    """`recipes/` or `accelerate_configs/`: the repo's top-level directory in a checkout, else the copy in the wheel.

    The top-level directories are the source of truth; setup.py ships them as the data packages
    `rlx.recipes` and `rlx.accelerate_configs`, found here through the import system.
    """
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / name).is_dir():
        return root / name
    try:
        spec = importlib.util.find_spec(f"rlx.{name}")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return root / name  # neither: the error for a missing recipe names this path


RECIPES_DIR = shipped_dir("recipes")
ACCELERATE_CONFIGS_DIR = shipped_dir("accelerate_configs")


def available_recipes(recipes_dir: Path = RECIPES_DIR) -> list[str]:
    return sorted(p.stem for p in recipes_dir.glob("*.yaml") if not p.stem.startswith("_"))


def recipe_summary(name: str, recipes_dir: Path = RECIPES_DIR) -> str:
    """The recipe's one-line summary: the first sentence of its first line when that line is a `#` comment."""
    first = (recipes_dir / f"{name}.yaml").read_text().split("\n", 1)[0]
    if not first.startswith("#"):
        return ""
    text = first.lstrip("#").strip()
    m = re.search(r"\.\s+[A-Z]", text)  # a sentence end, not "et al. 2505" or "e.g."
    return (text[: m.start()] if m else text).rstrip(" .:;,")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(
            f"cannot parse recipe YAML at {where}: {problem}. Fix the YAML syntax there."
        ) from None
    except OSError as e:
        raise UserError(f"cannot read recipe file {path}: {e.strerror}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a YAML mapping of keys to values, got {type(data).__name__}.")
    return data


def _recipe_path(name: str, recipes_dir: Path) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = recipes_dir / f"{name}.yaml"
    if candidate.exists():
        return candidate
    names = available_recipes(recipes_dir)
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UserError(
        f"unknown recipe '{name}'.{hint} Available recipes: {', '.join(names)}. "
        f"Pass recipe=NAME with a file from {recipes_dir}/ or recipe=path/to/file.yaml."
    )


def _compose(path: Path, recipes_dir: Path, seen: tuple[Path, ...] = ()) -> list[dict]:
    """Flatten a recipe and its `defaults:` list (earlier entries are overridden by later ones and by itself)."""
    if path in seen:
        raise UserError(f"recipe {path} includes itself through `defaults:` ({' -> '.join(map(str, seen))}).")
    data = _read_yaml(path)
    defaults = data.pop("defaults", []) or []
    if isinstance(defaults, str):
        defaults = [defaults]
    layers: list[dict] = []
    for d in defaults:
        layers += _compose(_recipe_path(str(d), recipes_dir), recipes_dir, (*seen, path))
    return [*layers, data]


def _normalise(d: dict) -> dict:
    # `regularizers: [relax, entropy]` is shorthand for `regularizers.enabled`.
    if isinstance(d.get("regularizers"), list):
        d = {**d, "regularizers": {"enabled": d["regularizers"]}}
    return d


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            out.append(full)
            out += _all_keys(node._get_node(k), full + ".")
    return out


def _explain(e: OmegaConfBaseException, base: DictConfig, source: str) -> UserError:
    key = getattr(e, "full_key", None) or ""
    if isinstance(e, ConfigKeyError) or "not in struct" in str(e) or "Key '" in str(e):
        valid = _all_keys(base)
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        if not close:
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            close = [k for k in valid if k.startswith(parent + ".") and k.count(".") == key.count(".")][:8]
        return UserError(
            f"unknown config key '{key}' (from {source}). Closest valid keys: {', '.join(close) or '(none)'}. "
            "Run with print_config=true to see every key."
        )
    if isinstance(e, ValidationError):
        node = base
        for part in key.split(".") if key else ():  # nested keys: walk down, `_get_node` takes one level
            node = node._get_node(part) if isinstance(node, DictConfig) else None
        expected = getattr(node, "_metadata", None)
        expected = getattr(expected, "ref_type", None) or getattr(expected, "object_type", None) or "?"
        name = getattr(expected, "__name__", str(expected))
        value = getattr(e, "msg", str(e)).split("'")[1] if "'" in getattr(e, "msg", "") else "?"
        return UserError(
            f"wrong type for config key '{key}' (from {source}): expected {name}, got {value!r}. "
            f"Give a value of type {name}."
        )
    return UserError(f"invalid config (from {source}): {e}")


def _merge(base: DictConfig, layer: dict | DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as e:
        raise _explain(e, base, source) from None


def parse_overrides(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split `recipe=NAME` from `key=value` overrides; reject anything else."""
    recipe, dotlist = None, []
    for arg in argv:
        if "=" not in arg:
            raise UserError(
                f"cannot parse argument '{arg}': expected key=value (e.g. recipe=grpo_tiny trainer.max_steps=50)."
            )
        k, v = arg.split("=", 1)
        if k == "recipe":
            recipe = v
        elif k == "regularizers":
            dotlist.append(f"regularizers.enabled={v}")
        else:
            dotlist.append(arg)
    return recipe, dotlist


def load_config(
    argv: list[str], recipes_dir: Path = RECIPES_DIR, default_recipe: str | None = None
) -> RunConfig:
    """Resolve `recipe=NAME key=value ...` into a validated `RunConfig` (an OmegaConf structured object)."""
    recipe, dotlist = parse_overrides(argv)
    recipe = recipe or default_recipe
    cfg = OmegaConf.structured(RunConfig)
    if recipe:
        path = _recipe_path(recipe, recipes_dir)
        for layer in _compose(path, recipes_dir):
            cfg = _merge(cfg, _normalise(layer), str(path))
        cfg.recipe = Path(recipe).stem
    for item in dotlist:
        try:
            layer = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as e:
            raise UserError(f"cannot parse override '{item}': {e}. Expected key.sub=value.") from None
        cfg = _merge(cfg, layer, f"override '{item}'")
    trainer_spec(cfg.algo)  # a user error naming the registered algorithms when unknown
    if not 0.0 <= cfg.warmstart.teacher_bug_rate <= 1.0:
        raise UserError(
            f"warmstart.teacher_bug_rate={cfg.warmstart.teacher_bug_rate} is not a probability: expected a value "
            "in [0, 1] (0 trains the warm start on correct solutions only)."
        )
    validate_trainer_args(cfg.algo, OmegaConf.to_container(cfg.trainer, resolve=True))
    return cfg


# ---- trainer.* validation against the TRL config class ---------------------------------------------


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a dataclass field annotation; int->float is allowed, str->number is parsed."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any or annotation is None:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except TypeError as e:
                errors.append(e)
        raise TypeError(" or ".join(getattr(a, "__name__", str(a)) for a in args if a is not type(None)))
    if origin is typing.Literal:
        if value in args:
            return value
        raise TypeError(f"one of {list(args)}")
    if origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):  # TRL accepts comma-separated strings for some list fields
            return value
        raise TypeError("list")
    if origin is dict or annotation is dict:
        if isinstance(value, (dict, str)):
            return value
        raise TypeError("dict")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TypeError("bool")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError("int")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError("float")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise TypeError("str")
    return value  # enums and library types: TRL validates them itself


def _accepts_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    return any(_accepts_bool(a) for a in typing.get_args(annotation))


# transformers 5.23 deprecates these TrainingArguments names (still accepted, with a FutureWarning).
RENAMED_TRAINER_ARGS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def validate_trainer_args(algo: str, args: dict[str, Any]) -> dict[str, Any]:
    """Reject unknown or mistyped `trainer.*` keys with the closest valid names; deprecated names are renamed.

    The check runs once per (algorithm, arguments): `load_config` runs it, so a user error surfaces before any
    model loads, and the build step that asks again for the same arguments gets the stored result.
    """
    config_class = trainer_spec(algo).config_class
    try:
        key = json.dumps(args, sort_keys=True)
    except TypeError:  # not plain data: check it, do not store it
        return _validate_trainer_args(algo, config_class, args)
    return copy.deepcopy(_validated_trainer_args(algo, config_class, key))


@functools.lru_cache(maxsize=32)
def _validated_trainer_args(algo: str, config_class: str, key: str) -> dict[str, Any]:
    return _validate_trainer_args(algo, config_class, json.loads(key))


def _validate_trainer_args(algo: str, config_class: str, args: dict[str, Any]) -> dict[str, Any]:
    cls = trainer_spec(algo).trainer_config_class()
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    out = {}
    for k, v in args.items():
        new = RENAMED_TRAINER_ARGS.get(k)
        if new in fields:  # pass the current name: the deprecated one makes transformers warn on every run
            if new in args:
                continue  # both given: the current name wins
            k = new
        if k not in fields:
            close = difflib.get_close_matches(k, sorted(fields), n=3, cutoff=0.6)
            raise UserError(
                f"unknown config key 'trainer.{k}' for algo={algo} ({cls.__name__}). "
                f"Closest valid keys: {', '.join('trainer.' + c for c in close) or '(none)'}. "
                f"See the fields of {cls.__module__}.{cls.__name__}."
            )
        annotation = hints.get(k, Any)
        if isinstance(v, bool) and not _accepts_bool(annotation):
            v = "yes" if v else "no"  # YAML 1.1 reads `no`/`off` as False (e.g. trainer.save_strategy=no)
        try:
            out[k] = _coerce(v, annotation, k)
        except TypeError as e:
            raise UserError(
                f"wrong type for config key 'trainer.{k}': expected {e}, got {v!r}. Give a value of that type."
            ) from None
    return out


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def as_container(node: Any) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node
