"""Merge the configuration sources and structure them into a :class:`TabbyConfig`.

Precedence, lowest first: built-in defaults < the TOML file < ``TABBY_*`` environment
variables < CLI flags. Tables merge key by key; a list or scalar from a later source
replaces the earlier one whole. Structuring is strict (``"false"`` is not a boolean)
and every problem becomes one line of a :class:`ConfigError` naming its source.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import cattrs

from tabby.config.errors import ConfigError
from tabby.config.schema import (
    SECTIONS,
    ModelDefaults,
    ModelSettings,
    NetworkConfig,
    TabbyConfig,
)
from tabby.config.sources import Layer, env_layer, file_layer, parse_cli_overrides
from tabby.config.validation import Issue, ValidationFailed, make_converter, structure

__all__ = ["DEFAULT_CONFIG_NAME", "load_config", "structure_config", "structure_load_settings"]

DEFAULT_CONFIG_NAME = "tabby.toml"


def _document_class() -> type:
    """The file's shape: one table per section, nothing else (no ``base_dir`` key)."""
    fields = {
        name: attrs.field(factory=cls, type=cls, metadata={"section": cls})
        for name, cls in SECTIONS
    }
    return attrs.make_class("Document", fields, frozen=True)


@attrs.frozen
class _Schema:
    converter: cattrs.Converter
    document: type
    load_settings: type


def _schema() -> _Schema:
    converter = make_converter(forbid_extra_keys=True)
    load_settings = ModelSettings

    def defaults_hook(value: Any, _t: type) -> ModelDefaults:
        partial: Any = converter.structure(value, load_settings)
        # Only keys present in the table are set; the rest stay UNSET.
        return ModelDefaults(**{key: getattr(partial, key) for key in value})

    converter.register_structure_hook(ModelDefaults, defaults_hook)
    return _Schema(converter, _document_class(), load_settings)


def structure_config(
    values: Mapping[str, Any],
    *,
    origins: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    config_file: Path | None = None,
) -> TabbyConfig:
    """Structure merged plain values into a :class:`TabbyConfig` (raises :class:`ConfigError`).

    ``origins`` maps dotted key paths to source labels used to prefix error lines.
    """
    schema = _schema()
    try:
        doc: Any = structure(dict(values), schema.document, schema.converter)
    except ValidationFailed as exc:
        raise ConfigError(
            [_format_issue(issue, origins or {}, schema) for issue in exc.issues]
        ) from None
    sections = {name: getattr(doc, name) for name, _ in SECTIONS}
    config = TabbyConfig(
        **sections,
        base_dir=base_dir if base_dir is not None else Path.cwd(),
        config_file=config_file,
    )
    _refuse_open_admin(config.network, origins or {})
    return config


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _refuse_open_admin(network: NetworkConfig, origins: Mapping[str, str]) -> None:
    """``disable_auth`` makes every caller admin: only on loopback, unless asked for."""
    if not network.disable_auth or network.allow_open_network or _is_loopback(network.host):
        return
    raise ConfigError(
        [
            f"{_origin('network.disable_auth', origins)}: network.disable_auth: refused with network.host = {network.host!r}: "
            "every caller who reaches the port would be admin; listen on 127.0.0.1, keep "
            "the keys, or set network.allow_open_network = true"
        ]
    )


def structure_load_settings(values: Mapping[str, Any], *, source: str) -> ModelDefaults:
    """Validate a table of load settings (a model folder's ``tabby_config.toml`` ``[model]``,
    say) with the rules of ``[model]``; keys left out stay :data:`UNSET`.

    Error lines start with ``source`` and name the key, e.g.
    ``models/x/tabby_config.toml: max_seq_len: expected an integer >= 1, got "a"``.
    """
    try:
        return structure_config(
            {"model_defaults": dict(values)}, origins={"model_defaults": source}
        ).model_defaults
    except ConfigError as exc:
        prefix = f"{source}: model_defaults."
        raise ConfigError(
            [
                f"{source}: {line.removeprefix(prefix)}" if line.startswith(prefix) else line
                for line in exc.lines
            ]
        ) from None


def load_config(
    *,
    config_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    cli_args: Sequence[str] = (),
) -> TabbyConfig:
    """Load the configuration from every source; raises :class:`ConfigError`.

    The file is ``config_path``, else the ``--config`` flag of ``cli_args``, else
    ``./tabby.toml`` when it exists (a missing default file means built-in defaults;
    a missing named file is an error). ``env`` defaults to ``os.environ``.
    """
    problems: list[str] = []
    layers: list[Layer] = []
    cli_layer: Layer | None = None
    try:
        cli = parse_cli_overrides(cli_args)
        cli_layer = cli.layer
        config_path = config_path if config_path is not None else cli.config_path
    except ConfigError as exc:
        problems.extend(exc.lines)
    if config_path is None and Path(DEFAULT_CONFIG_NAME).is_file():
        config_path = Path(DEFAULT_CONFIG_NAME)
    if config_path is not None:
        try:
            layers.append(file_layer(config_path))
        except ConfigError as exc:
            problems.extend(exc.lines)
    try:
        layers.append(env_layer(os.environ if env is None else env))
    except ConfigError as exc:
        problems.extend(exc.lines)
    if problems:
        raise ConfigError(problems)
    if cli_layer is not None:
        layers.append(cli_layer)
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for layer in layers:
        _merge(values, layer.values)
        origins.update(layer.origins)
    file = config_path.resolve() if config_path is not None else None
    return structure_config(
        values,
        origins=origins,
        base_dir=file.parent if file is not None else Path.cwd(),
        config_file=file,
    )


def _merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _format_issue(issue: Issue, origins: Mapping[str, str], schema: _Schema) -> str:
    label = _origin(issue.path, origins)
    message = issue.message
    if message == "unknown key":
        message += _suggestion(issue.path, schema)
    else:
        message = _with_expected(issue.path, message, schema)
    body = f"{issue.path}: {message}" if issue.path else message
    return f"{label}: {body}"


def _origin(path: str, origins: Mapping[str, str]) -> str:
    while path:
        if path in origins:
            return origins[path]
        path = path[: path.rindex("[")] if path.endswith("]") else path.rpartition(".")[0]
    return "config"


def _parts(path: str) -> list[str]:
    return re.findall(r"\[\d+\]|[^.\[\]]+", path)


def _field_of(path: str, schema: _Schema) -> tuple[type | None, attrs.Attribute[Any] | None]:
    """The class that holds the last key of ``path`` and that key's attribute."""
    cls: Any = schema.document
    owner: type | None = None
    attribute: attrs.Attribute[Any] | None = None
    for part in _parts(path):
        if part.startswith("["):
            continue
        if cls is ModelDefaults:
            cls = schema.load_settings
        if not (isinstance(cls, type) and attrs.has(cls)):
            return None, None
        owner = cls
        fields = attrs.fields_dict(cls)
        if part not in fields:
            return owner, None
        attribute = fields[part]
        tp = typing.get_type_hints(cls).get(part, attribute.type)
        args = typing.get_args(tp)
        cls = args[0] if typing.get_origin(tp) is tuple and args else tp
    return owner, attribute


def _with_expected(path: str, message: str, schema: _Schema) -> str:
    """Use the field's own 'expected' phrase (ranges, choices) in type errors too."""
    if not message.startswith("expected ") or path.endswith("]"):
        return message
    _, attribute = _field_of(path, schema)
    expected = attribute.metadata.get("expected") if attribute is not None else None
    if expected is None:
        return message
    _, got, rest = message.partition(", got ")
    return f"expected {expected}, got {rest}" if got else f"expected {expected}"


def _suggestion(path: str, schema: _Schema) -> str:
    parent, _, key = path.rpartition(".")
    if parent:
        owner, _ = _field_of(f"{parent}.{key}", schema)
        names = [a.name for a in attrs.fields(owner)] if owner is not None else []
    else:
        names = [name for name, _ in SECTIONS]
    close = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean {close[0]}?)" if close else ""
