"""Sampler presets (``sampler_overrides/<name>.toml``) and applying them to requests.

A preset file maps canonical sampler names (see :class:`tabby.serving.sampling.SamplerParams`,
plus the endpoint-level ``n``) to tables::

    [temperature]
    override = 0.8      # the value
    force = false       # true: replaces whatever the client sent
    additive = false    # lists only: prepended to the client's list (force wins)

A non-forced override is the default used when the client omits the field. Unlike
upstream, a forced ``0``, ``false`` or ``[]`` applies like any other value.

Presets work on the raw request body, before structuring, because only there is
"omitted" visible. :func:`apply_preset` also resolves field aliases (a client that
sends ``max_length`` has sent ``max_tokens``) and drops ``null`` for fields that do
not accept it, so call it on every request, with ``preset=None`` when none is active.
"""

from __future__ import annotations

import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from tabby.config.validation import ValidationFailed, make_converter, structure
from tabby.errors import InvalidRequest, NotFound
from tabby.serving.sampling import (
    SamplerParams,
    parse_sequence_breakers,
    parse_stop,
    parse_token_list,
)

__all__ = [
    "PresetOverride",
    "SamplerPreset",
    "apply_preset",
    "list_presets",
    "load_preset",
    "preset_from_dict",
]

_SUFFIX = ".toml"
_NAME_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")
_ENTRY_KEYS = frozenset({"override", "force", "additive"})
# Endpoint-level fields a preset may also set.
_EXTRA_KEYS = frozenset({"n"})
_LIST_KEYS = frozenset(
    {"stop", "banned_strings", "banned_tokens", "allowed_tokens", "dry_sequence_breakers"}
)


def _alias_table() -> Mapping[str, str]:
    return types.MappingProxyType(
        {
            alias: a.name
            for a in attrs.fields(SamplerParams)
            for alias in a.metadata.get("aliases", ())
        }
    )


def _nullable_fields() -> frozenset[str]:
    hints = typing.get_type_hints(SamplerParams)
    return frozenset(name for name, tp in hints.items() if type(None) in typing.get_args(tp))


_ALIASES = _alias_table()
_NULLABLE = _nullable_fields()
_CANONICAL = frozenset(a.name for a in attrs.fields(SamplerParams)) | _EXTRA_KEYS


@attrs.frozen
class PresetOverride:
    key: str
    value: Any
    force: bool = False
    additive: bool = False


@attrs.frozen
class SamplerPreset:
    name: str
    overrides: tuple[PresetOverride, ...] = ()

    def get(self, key: str) -> PresetOverride | None:
        return next((o for o in self.overrides if o.key == key), None)

    def defaults(self) -> dict[str, Any]:
        """Every override value, keyed by field name (for listing the active preset)."""
        return {o.key: o.value for o in self.overrides}


def _preset_path(presets_dir: Path, name: str) -> Path:
    root = presets_dir.resolve()
    path = (root / f"{name}{_SUFFIX}").resolve()
    if not _NAME_RE.fullmatch(name) or path.parent != root:
        raise InvalidRequest(f"invalid sampler preset name '{name}'", param="preset")
    return path


def list_presets(presets_dir: Path) -> list[str]:
    """Names of the presets in ``presets_dir``."""
    if not presets_dir.is_dir():
        return []
    return sorted(p.stem for p in presets_dir.glob(f"*{_SUFFIX}") if p.is_file())


def load_preset(presets_dir: Path, name: str) -> SamplerPreset:
    """Read and check ``<presets_dir>/<name>.toml`` (synchronous file I/O)."""
    path = _preset_path(presets_dir, name)
    if not path.is_file():
        raise NotFound(f"sampler preset '{name}' not found", param="preset")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidRequest(f"sampler preset file {path.name}: {exc}", param="preset") from None
    return _build(name, data, where=f"sampler preset file {path.name}")


def preset_from_dict(name: str, data: Mapping[str, Any]) -> SamplerPreset:
    """A preset from an already parsed mapping (the inline ``overrides`` of a switch)."""
    return _build(name, data, where=f"sampler preset '{name}'")


def _entry(where: str, key: str, entry: Any) -> PresetOverride | None:
    if key not in _CANONICAL:
        hint = f" (use the canonical name '{_ALIASES[key]}')" if key in _ALIASES else ""
        raise InvalidRequest(f"{where}: unknown sampler key '{key}'{hint}", param=key)
    if not isinstance(entry, Mapping):
        raise InvalidRequest(
            f"{where}: '{key}' must be a table with 'override', 'force' and 'additive'",
            param=key,
        )
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise InvalidRequest(f"{where}: unknown entry '{unknown[0]}' in '{key}'", param=key)
    if entry.get("override") is None:
        return None  # a null override sets nothing
    force, additive = entry.get("force", False), entry.get("additive", False)
    if not isinstance(force, bool) or not isinstance(additive, bool):
        raise InvalidRequest(f"{where}: '{key}' force/additive must be true or false", param=key)
    if additive and key not in _LIST_KEYS:
        raise InvalidRequest(f"{where}: '{key}' is not a list, so it cannot be additive", param=key)
    return PresetOverride(key, entry["override"], force=force, additive=additive)


def _check_values(where: str, overrides: list[PresetOverride]) -> None:
    values = {o.key: o.value for o in overrides if o.key not in _EXTRA_KEYS}
    try:
        structure(values, SamplerParams, make_converter(forbid_extra_keys=True))
    except ValidationFailed as exc:
        issue = exc.issues[0]
        raise InvalidRequest(f"{where}: {issue}", param=issue.path) from None
    n = next((o.value for o in overrides if o.key == "n"), 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidRequest(f"{where}: n: expected an integer ≥ 1, got {n!r}", param="n")


def _build(name: str, data: Mapping[str, Any], *, where: str) -> SamplerPreset:
    overrides = [o for key, entry in data.items() if (o := _entry(where, key, entry))]
    _check_values(where, overrides)
    return SamplerPreset(name=name, overrides=tuple(overrides))


def _as_list(key: str, value: Any) -> list[Any] | None:
    """The client's value of a list field as a list; None when it is malformed."""
    try:
        if key == "stop":
            return [value] if isinstance(value, str) else list(value)
        if key in ("banned_tokens", "allowed_tokens"):
            return list(parse_token_list(value))
        if key == "dry_sequence_breakers":
            return list(parse_sequence_breakers(value))
        return [value] if isinstance(value, str) else list(value)
    except (TypeError, ValueError):
        return None


def _override_list(key: str, value: Any) -> list[Any]:
    if key == "stop":
        strings, ids = parse_stop(value)
        return [*strings, *ids]
    listed = _as_list(key, value)
    return listed if listed is not None else [value]


def apply_preset(raw_body: Mapping[str, Any], preset: SamplerPreset | None) -> dict[str, Any]:
    """A copy of the request body with aliases resolved and the preset applied.

    The canonical name wins over an alias when both are sent. ``null`` is treated as
    omitted for fields that do not accept it. Values stay in their wire form; the
    result is structured (and validated) as usual afterwards.
    """
    body = dict(raw_body)
    for alias, name in _ALIASES.items():
        if alias in body:
            value = body.pop(alias)
            body.setdefault(name, value)
    for name in _CANONICAL - _NULLABLE:
        if name in body and body[name] is None:
            del body[name]
    if preset is None:
        return body
    for override in preset.overrides:
        key, value = override.key, override.value
        if override.force:
            body[key] = value
        elif override.additive:
            client = _as_list(key, body[key]) if body.get(key) is not None else []
            if client is not None:  # malformed input is left for validation to report
                body[key] = _override_list(key, value) + client
        elif body.get(key) is None:
            # Omitted, or null (which many clients send for "no preference").
            body[key] = value
    return body
