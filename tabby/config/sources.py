"""The three configuration sources above the defaults: TOML file, environment, CLI flags.

Each source becomes a :class:`Layer`: a nested dict of plain values plus, for every
key path it sets, a label naming where the value came from (``tabby.toml:12``,
``env TABBY_NETWORK_PORT``, ``flag --port``) so that validation errors can point at it.

Environment variables are ``TABBY_<SECTION>_<KEY>`` (``TABBY_MODEL_DEFAULTS_MAX_SEQ_LEN``);
``TABBY_LOG_LEVEL`` is accepted as the short form of ``TABBY_LOGGING_LOG_LEVEL`` (the
long form wins when both are set). Variables whose section is unknown are ignored
(other tools share the prefix); an unknown key in a known section is an error.

CLI flags are ``--section.key VALUE`` or ``--section.key=VALUE`` (``-`` and ``_`` are
interchangeable in the key), plus the short forms in :data:`SHORT_FLAGS`, plus
``--config PATH``. A boolean flag without a value means ``true``. For list keys a
flag may be repeated (``--api-servers OAI --api-servers Kobold``) or given a TOML
array (``--network.api_servers '["OAI","Kobold"]'``); the occurrences are
concatenated.

Values from the environment and flags are parsed as TOML values (``5001`` is an
integer, ``true`` a boolean, ``[1, 2]`` a list); a value that does not parse as TOML is
taken as a string, so ``--host 0.0.0.0`` works without quotes. For a list key, a value
that is not a TOML array is a one-element list (``TABBY_NETWORK_API_SERVERS=Kobold``).
"""

from __future__ import annotations

import difflib
import re
import tomllib
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import tomlkit
import tomlkit.exceptions

from tabby.config.errors import ConfigError
from tabby.config.schema import SECTIONS, ModelConfigSection

__all__ = [
    "SHORT_FLAGS",
    "CliOverrides",
    "Layer",
    "env_layer",
    "file_layer",
    "parse_cli_overrides",
    "parse_value",
]

SHORT_FLAGS: Mapping[str, str] = {
    "--host": "network.host",
    "--port": "network.port",
    "--disable-auth": "network.disable_auth",
    "--api-servers": "network.api_servers",
    "--model-name": "model.model_name",
    "--model-dir": "model.model_dir",
    "--log-level": "logging.log_level",
}
_ENV_PREFIX = "TABBY_"
_ENV_ALIASES: Mapping[str, str] = {"TABBY_LOG_LEVEL": "logging.log_level"}

_HEADER_RE = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?")
_KEY_RE = re.compile(r"^\s*([A-Za-z0-9_\-.\"' ]+?)\s*=")


@attrs.frozen
class Layer:
    """Values from one source and, per dotted key path, the label of its origin."""

    values: dict[str, Any]
    origins: dict[str, str]


def _key_kinds() -> dict[str, tuple[bool, bool]]:
    """``section.key`` -> (is a boolean, is a list), for every key of the schema."""
    model_hints = typing.get_type_hints(ModelConfigSection)
    kinds: dict[str, tuple[bool, bool]] = {}
    for section, cls in SECTIONS:
        # [model_defaults] keys take the types of their [model] counterparts.
        hints = model_hints if section == "model_defaults" else typing.get_type_hints(cls)
        for a in attrs.fields(cls):
            tp = hints[a.name]
            kinds[f"{section}.{a.name}"] = (tp is bool, typing.get_origin(tp) is tuple)
    return kinds


def parse_value(text: str) -> Any:
    """``text`` read as one TOML value, or the text itself when it is not TOML."""
    try:
        doc = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    # "1\nw = 2" parses but is not one value: keep it as the string it is.
    return doc["v"] if len(doc) == 1 else text


def _set(values: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _walk_paths(value: Any, prefix: str, out: list[str]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            out.append(path)
            _walk_paths(sub, path, out)
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            if isinstance(sub, dict):
                path = f"{prefix}[{i}]"
                out.append(path)
                _walk_paths(sub, path, out)


def _key_lines(text: str) -> dict[str, int]:
    """First line (1-based) of every table header and ``key =`` of a TOML text.

    tomlkit keeps no positions, so this scans lines; values spanning lines never
    start with ``key =``, which is all the scan relies on.
    """
    lines: dict[str, int] = {}
    table = ""
    counts: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        header = _HEADER_RE.match(line)
        if header and not _KEY_RE.match(line):
            name = _clean_key(header.group(2))
            if header.group(1) == "[[":
                index = counts.get(name, 0)
                counts[name] = index + 1
                table = f"{name}[{index}]"
                lines.setdefault(name, number)
            else:
                table = name
            lines.setdefault(table, number)
            continue
        key = _KEY_RE.match(line)
        if key:
            path = f"{table}.{_clean_key(key.group(1))}" if table else _clean_key(key.group(1))
            lines.setdefault(path, number)
    return lines


def _clean_key(raw: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in raw.split("."))


def file_layer(path: Path) -> Layer:
    """The values of a TOML file; syntax errors become a :class:`ConfigError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc}"]) from None
    try:
        values = tomlkit.parse(text).unwrap()
    except tomlkit.exceptions.ParseError as exc:
        reason = re.sub(r" at line \d+ col \d+$", "", str(exc))
        raise ConfigError([f"{path}:{exc.line}: TOML syntax error: {reason}"]) from None
    lines = _key_lines(text)
    paths: list[str] = []
    _walk_paths(values, "", paths)
    origins = {}
    for key_path in paths:
        line = _line_of(lines, key_path)
        origins[key_path] = f"{path}:{line}" if line is not None else str(path)
    return Layer(values=values, origins=origins)


def _line_of(lines: Mapping[str, int], path: str) -> int | None:
    while path:
        if path in lines:
            return lines[path]
        path = _parent(path)
    return None


def _parent(path: str) -> str:
    """``a.b[0].c`` -> ``a.b[0]`` -> ``a.b`` -> ``a`` -> ``""``."""
    if path.endswith("]"):
        return path[: path.rindex("[")]
    return path.rpartition(".")[0]


def env_layer(env: Mapping[str, str]) -> Layer:
    """The ``TABBY_*`` variables of ``env`` that name a config section."""
    kinds = _key_kinds()
    # Longest section first: TABBY_MODEL_DEFAULTS_X belongs to model_defaults, not model.
    sections = sorted((name for name, _ in SECTIONS), key=len, reverse=True)
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    problems: list[str] = []
    # Aliases first, so that the long form of the same key overrides them.
    for var in sorted(env, key=lambda v: v not in _ENV_ALIASES):
        if not var.startswith(_ENV_PREFIX):
            continue
        if var in _ENV_ALIASES:
            path = _ENV_ALIASES[var]
        else:
            rest = var[len(_ENV_PREFIX) :].lower()
            section = next((s for s in sections if rest.startswith(s + "_")), None)
            if section is None:
                continue
            path = f"{section}.{rest[len(section) + 1 :]}"
            if path not in kinds:
                keys = [k.partition(".")[2] for k in kinds if k.startswith(section + ".")]
                close = difflib.get_close_matches(path.partition(".")[2], keys, n=1, cutoff=0.75)
                hint = f" (did you mean {f'TABBY_{section}_{close[0]}'.upper()}?)" if close else ""
                problems.append(f"env {var}: {path}: unknown key{hint}")
                continue
        value = parse_value(env[var])
        if kinds[path][1] and not isinstance(value, list):
            value = [value]
        _set(values, path, value)
        origins[path] = f"env {var}"
        origins.update((sub, f"env {var}") for sub in _sub_paths(path, value))
    if problems:
        raise ConfigError(problems)
    return Layer(values=values, origins=origins)


def _sub_paths(path: str, value: Any) -> list[str]:
    out: list[str] = []
    _walk_paths(value, path, out)
    return out


@attrs.frozen
class CliOverrides:
    """Parsed CLI flags: the config file they name, if any, and their values."""

    config_path: Path | None
    layer: Layer


def _flag_path(flag: str, kinds: Mapping[str, tuple[bool, bool]]) -> str | None:
    if flag in SHORT_FLAGS:
        return SHORT_FLAGS[flag]
    section, dot, key = flag[2:].partition(".")
    path = f"{section.replace('-', '_')}.{key.replace('-', '_')}"
    return path if dot and path in kinds else None


def parse_cli_overrides(args: Sequence[str]) -> CliOverrides:
    """Parse config flags; unknown flags and missing values become a :class:`ConfigError`."""
    kinds = _key_kinds()
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    lists: dict[str, list[Any]] = {}
    problems: list[str] = []
    config_path: Path | None = None
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        flag, eq, inline = arg.partition("=")
        if not flag.startswith("--"):
            problems.append(f"{arg}: unexpected argument (options look like --network.port 5001)")
            continue
        if flag == "--config":
            text, i = _take_value(args, i, inline if eq else None)
            if text is None:
                problems.append("flag --config: missing value (a file path)")
            else:
                config_path = Path(text)
            continue
        path = _flag_path(flag, kinds)
        if path is None:
            problems.append(f"flag {flag}: unknown option")
            _, i = _take_value(args, i, inline if eq else None)  # skip its value too
            continue
        is_bool, is_list = kinds[path]
        text, i = _take_value(args, i, inline if eq else None)
        if text is None and not is_bool:
            problems.append(f"flag {flag}: {path}: missing value")
            continue
        value = True if text is None else parse_value(text)
        origins[path] = f"flag {flag}"
        if is_list:
            lists.setdefault(path, []).extend(value if isinstance(value, list) else [value])
            value = lists[path]
        _set(values, path, value)
        origins.update((sub, f"flag {flag}") for sub in _sub_paths(path, value))
    if problems:
        raise ConfigError(problems)
    return CliOverrides(config_path=config_path, layer=Layer(values=values, origins=origins))


def _take_value(args: Sequence[str], i: int, inline: str | None) -> tuple[str | None, int]:
    """The flag's value (``--k=v`` or ``--k v``) and the index after it."""
    if inline is not None:
        return inline, i
    if i < len(args) and not args[i].startswith("--"):
        return args[i], i + 1
    return None, i
