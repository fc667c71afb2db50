"""Render the commented default ``tabby.toml`` from the schema."""

from __future__ import annotations

import textwrap
from typing import Any

import attrs
import tomlkit

from tabby.config.schema import LOAD_KEYS, SECTIONS, ModelDefaults

__all__ = ["export_config"]

_PREAMBLE = """\
# tabby configuration. Every key is shown with its default; this file is generated
# from the schema by `tabby export-config`.
#
# Precedence, lowest first: built-in defaults < this file (or --config PATH)
# < environment variables TABBY_<SECTION>_<KEY> (e.g. TABBY_NETWORK_PORT=5001)
# < CLI flags (--network.port 5001, or the short forms --host --port --model-name
# --model-dir --disable-auth --api-servers --log-level).
# Values in the environment and in flags are TOML values; anything else is a string.
#
# TOML has no null: a key whose default is null is shown commented out, and for
# optional text keys an empty string "" also means null. Relative paths resolve
# against the folder of this file.
"""

_DEFAULTS_NOTE = """\
# Set keys apply to every load (startup, API or inline) under the request's own
# values; keys left out are not set (distinct from "" = null).
# max_seq_len = 8192
"""


def _value(value: Any) -> str:
    if isinstance(value, tuple):
        value = [attrs.asdict(v) if attrs.has(type(v)) else v for v in value]
    return str(tomlkit.item(value).as_string())


def _section(name: str, cls: type) -> list[str]:
    doc = (cls.__doc__ or "").strip().splitlines()[0]
    out = [f"# {doc}", f"[{name}]"]
    if cls is ModelDefaults:
        keys = "Any load setting of [model] may be set here: " + ", ".join(LOAD_KEYS) + "."
        out.extend(textwrap.wrap(keys, width=88, initial_indent="# ", subsequent_indent="# "))
        out.extend(_DEFAULTS_NOTE.splitlines())
        return out
    # A section's own keys first, then the load settings it shares with [model_defaults].
    for a in sorted(attrs.fields(cls), key=lambda a: a.name in LOAD_KEYS):
        out.append(f"# {a.metadata['doc']}")
        default = a.default  # section fields have plain defaults, no factories
        if default is None:
            out.append(f"# {a.name} =")
        else:
            out.append(f"{a.name} = {_value(default)}")
    return out


def export_config() -> str:
    """The text of the commented default ``tabby.toml``."""
    lines = _PREAMBLE.splitlines()
    for name, cls in SECTIONS:
        lines.append("")
        lines.extend(_section(name, cls))
    return "\n".join(lines) + "\n"
