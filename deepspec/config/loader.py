"""Load a pipeline config from YAML, apply dotted ``--set`` overrides, and explain errors."""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from deepspec.config.schema import PipelineConfig

CONFIG_ENV = "DEEPSPEC_CONFIG"


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names the key, the value and the fix."""


def resolve_config_path(path: str | os.PathLike[str] | None) -> Path:
    """Return ``path``, else the ``DEEPSPEC_CONFIG`` environment variable, as a Path."""
    if path is None:
        path = os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"no config given: pass --config FILE or set the {CONFIG_ENV} environment variable")
    resolved = Path(path)
    if not resolved.is_file():
        raise ConfigError(f"config file {str(resolved)!r} not found")
    return resolved


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config (never executed), apply ``key.path=value`` overrides, and validate it."""
    config_path = resolve_config_path(path)
    raw = read_config_mapping(config_path)
    for override in overrides or []:
        apply_override(raw, override)
    return validate_config(raw, source=str(config_path))


def read_config_mapping(config_path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one YAML file as a mapping, with ``extends: <file>`` merged in beneath it.

    ``extends`` names another config file, relative to this one. Its mappings
    are merged key by key, and every other value (lists included) is replaced
    by this file's value.
    """
    resolved = config_path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(path) for path in (*chain, resolved))
        raise ConfigError(f"config files extend each other in a cycle: {cycle}; remove one of the extends keys")
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(config_path)!r} is not valid YAML: {error}") from error
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(config_path)!r} must contain a mapping at the top level")
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str) or not base_name:
        raise ConfigError(f"extends={base_name!r} in {str(config_path)!r} must be the path of another config file")
    base_path = config_path.parent / base_name
    if not base_path.is_file():
        raise ConfigError(
            f"extends={base_name!r} in {str(config_path)!r}: {str(base_path)!r} not found; paths are relative to "
            "the extending file"
        )
    return merge_config_mappings(read_config_mapping(base_path, (*chain, resolved)), raw)


def merge_config_mappings(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated by ``override``: nested mappings merge, every other value is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_config_mappings(merged[key], value)
        else:
            merged[key] = value
    return merged


def validate_config(raw: dict[str, Any], source: str = "<config>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, raw, source)) from error


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in ``raw``, converting the text to the type the schema declares for that key."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like key.path=value, e.g. train.lr=3e-4")
    parts = key.split(".")
    annotation = _field_annotation(PipelineConfig, parts)
    value = _parse_override_value(annotation, text, key)
    node = raw
    for index, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        if not isinstance(child, dict):
            prefix = ".".join(parts[: index + 1])
            raise ConfigError(f"override {override!r}: {prefix} is not a mapping in the config file")
        node = child
    node[parts[-1]] = value


def _field_annotation(model: type[BaseModel], parts: list[str]) -> Any:
    current: Any = model
    for index, part in enumerate(parts):
        dotted = ".".join(parts[: index + 1])
        model_type = _model_in(current)
        if model_type is None:
            parent = ".".join(parts[:index])
            raise ConfigError(f"override key {'.'.join(parts)!r}: {parent} is a value, not a section")
        fields = model_type.model_fields
        if part not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {dotted!r}; allowed keys here: {allowed}")
        current = fields[part].annotation
    return current


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _accepts_plain_str(annotation: Any) -> bool:
    if annotation is str:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts_plain_str(arg) for arg in typing.get_args(annotation))
    return False


def _parse_override_value(annotation: Any, text: str, key: str) -> Any:
    text = text.strip()
    if _accepts_plain_str(annotation) and text not in ("null", "~"):
        return text
    try:
        parsed = yaml.safe_load(text) if text else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {key}={text!r} is not a valid YAML value: {error}") from error
    try:
        return TypeAdapter(annotation).validate_python(parsed)
    except ValidationError as error:
        reason = error.errors()[0]["msg"]
        raise ConfigError(f"invalid value {text!r} for {key}: {reason}") from error


def format_validation_error(error: ValidationError, raw: dict[str, Any], source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        dotted = ".".join(loc) if loc else "<root>"
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            lines.append(f"  {dotted}: unknown key; allowed keys here: {allowed}")
            continue
        if item["type"] == "missing":
            lines.append(f"  {dotted}: required key is missing")
            continue
        if not loc:
            # A check across sections: its message names the keys, and the input is the whole config.
            lines.append(f"  {item['msg']}")
            continue
        value = item.get("input")
        lines.append(f"  {dotted}: {item['msg']} (got {value!r})")
    return "\n".join(lines)


def _allowed_keys(loc: list[str]) -> str:
    model: Any = PipelineConfig
    for part in loc:
        model_type = _model_in(model)
        if model_type is None or part not in model_type.model_fields:
            # A list index or a dynamic key: describe the element type instead.
            args = typing.get_args(model)
            model = args[0] if args else model
            model_type = _model_in(model)
            if model_type is None or part not in model_type.model_fields:
                continue
        model = model_type.model_fields[part].annotation
    model_type = _model_in(model)
    if model_type is None:
        return "(none)"
    return ", ".join(sorted(model_type.model_fields))


def config_to_dict(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")
