"""Loading the config tree: YAML presets + dotted ``key=value`` overrides, validated.

Unknown keys and wrong types are errors that name the key and what is allowed. The method's
section class comes from the methods table (``hyperscale.methods``), so the tree is assembled
here, above both the schema and the methods. The resolved tree is written next to every run's
outputs and into every checkpoint.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from hyperscale.config.schema import Config, ConfigError
from hyperscale.methods import method_config_class
from hyperscale.models.families import FAMILIES


# ---------------------------------------------------------------- loading

def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
    key, _, raw = item.partition("=")
    value = yaml.safe_load(raw) if raw.strip() else None
    return key.strip().split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    tree = copy.deepcopy(tree)
    for item in overrides:
        path, value = parse_override(item)
        set_path(tree, path, value, f"override '{item}'")
    return tree


def set_path(tree: dict, path: list[str], value: Any, what: str) -> dict:
    """``tree`` with the key at ``path`` set to ``value``; sections on the way are created."""
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{what}: '{part}' is not a section")
    node[path[-1]] = value
    return tree


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def format_errors(err: ValidationError, root: type[BaseModel] = Config, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        key = prefix + (".".join(str(p) for p in e["loc"]) or "<root>")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown key; allowed keys here: {', '.join(_allowed_keys(root, e['loc']))}"
        lines.append(f"  {key}: {msg} (got {e.get('input')!r})" if e["type"] != "extra_forbidden"
                     else f"  {key}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def _validate(tree: dict) -> Config:
    """Validate the method section on its own first (its class from the methods table), so its
    errors name ``method.<key>``."""
    tree = dict(tree)
    raw = tree.get("method") or {"name": "denoising"}
    if isinstance(raw, dict):
        cls = method_config_class(raw.get("name", "denoising"))
        try:
            tree["method"] = cls.model_validate(raw)
        except ValidationError as err:
            raise ConfigError(format_errors(err, root=cls, prefix="method.")) from None
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_errors(err)) from None
    if cfg.model.family not in FAMILIES:
        raise ConfigError(f"invalid config:\n  model.family: unknown family '{cfg.model.family}'; "
                          f"allowed: {', '.join(sorted(FAMILIES))}")
    return cfg


def read_mapping(path: str | Path, what: str = "config") -> dict:
    """A YAML file whose top level is a mapping (empty file: {}), or a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    tree = read_mapping(path) if path is not None else {}
    return _validate(apply_overrides(tree, overrides or []))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def from_dict(tree: dict) -> Config:
    return _validate(tree)
