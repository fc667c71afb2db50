"""The API keys file (``api_tokens.toml``) and the ``tabby keys`` command.

The file holds one admin key and any number of API keys::

    admin_key = "..."
    api_keys = ["...", "..."]

It is created on first start with fresh random keys, always written atomically with mode
0600, and edited with tomlkit so that the operator's comments survive a rotation. The
running server re-reads it when it changes (see ``tabby.actors.auth``).
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

import attrs
import tomlkit
import tomlkit.exceptions
from tomlkit.items import Array

from tabby.config.tomlio import edit_toml, write_toml_atomic
from tabby.config.validation import ValidationFailed, check, make_converter, structure

__all__ = [
    "KEY_BYTES",
    "KeyFile",
    "KeyFileError",
    "add_api_key",
    "create_key_file",
    "generate_key",
    "keys_main",
    "read_key_file",
    "rotate_admin_key",
]

# 16 random bytes = 128 bits, written as 32 hex characters.
KEY_BYTES = 16
FILE_MODE = 0o600

_HEADER = """\
tabby API keys. Keep this file private (mode 0600).
Send a key as "Authorization: Bearer <key>", "X-Api-Key: <key>" or "X-Admin-Key: <key>".
The admin key works everywhere; API keys work everywhere except admin routes.
The server re-reads this file when it changes; `tabby keys` adds and rotates keys."""


def _is_key(value: object) -> bool:
    return isinstance(value, str) and bool(value) and value == value.strip()


def _all_keys(values: object) -> bool:
    return isinstance(values, tuple) and all(_is_key(v) for v in values)


@attrs.frozen
class KeyFile:
    admin_key: str = attrs.field(
        validator=check(_is_key, "a non-empty key without surrounding spaces"),
        metadata={"doc": "the key for admin routes (also accepted as an API key)"},
    )
    api_keys: tuple[str, ...] = attrs.field(
        default=(),
        validator=check(_all_keys, "a list of non-empty keys without surrounding spaces"),
        metadata={"doc": "keys for the API routes"},
    )


class KeyFileError(Exception):
    """The keys file cannot be used; ``lines`` says why, one problem per line."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def generate_key() -> str:
    return secrets.token_hex(KEY_BYTES)


def parse_key_file(text: str, path: Path) -> KeyFile:
    """Validate the text of a keys file; problems name the file (and line where known)."""
    try:
        data = tomlkit.parse(text).unwrap()
    except tomlkit.exceptions.ParseError as exc:
        raise KeyFileError([f"{path}:{exc.line}: {exc}"]) from None
    if isinstance(data.get("api_keys"), str):
        # A lone string would otherwise be taken as a sequence of one-letter keys.
        raise KeyFileError(
            [f'{path}: api_keys: expected a list of keys, got a string (use ["..."])']
        )
    try:
        return structure(data, KeyFile, make_converter(forbid_extra_keys=True))
    except ValidationFailed as exc:
        raise KeyFileError([f"{path}: {issue}" for issue in exc.issues]) from None


def read_key_file(path: Path) -> KeyFile:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyFileError([f"{path}: cannot read the keys file: {exc.strerror}"]) from None
    return parse_key_file(text, path)


def _new_document(keys: KeyFile) -> tomlkit.TOMLDocument:
    doc = tomlkit.document()
    for line in _HEADER.splitlines():
        doc.add(tomlkit.comment(line))
    doc.add(tomlkit.nl())
    doc.add("admin_key", keys.admin_key)
    api = tomlkit.array()
    api.extend(keys.api_keys)
    doc.add("api_keys", api)
    return doc


def create_key_file(path: Path) -> KeyFile:
    """Write a new keys file with one fresh API key and a fresh admin key."""
    keys = KeyFile(admin_key=generate_key(), api_keys=(generate_key(),))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_toml_atomic(path, _new_document(keys), mode=FILE_MODE)
    return keys


def add_api_key(path: Path) -> str:
    """Append a fresh API key, keeping the file's comments and order."""
    read_key_file(path)  # refuse to edit a file the server could not use either
    key = generate_key()

    def append(doc: tomlkit.TOMLDocument) -> None:
        existing = doc.get("api_keys")
        if isinstance(existing, Array):
            existing.append(key)
        else:
            api = tomlkit.array()
            api.append(key)
            doc["api_keys"] = api

    edit_toml(path, append, mode=FILE_MODE)
    return key


def rotate_admin_key(path: Path) -> str:
    """Replace the admin key, keeping the file's comments and order."""
    read_key_file(path)
    key = generate_key()

    def replace(doc: tomlkit.TOMLDocument) -> None:
        doc["admin_key"] = key

    edit_toml(path, replace, mode=FILE_MODE)
    return key


# -- the `tabby keys` command -----------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        nargs="?",
        choices=("show", "add", "rotate-admin"),
        default="show",
        help="show the keys (default), add an API key, or replace the admin key",
    )
    parser.add_argument("--file", type=Path, help="the keys file (default: from the config)")


def keys_main(path: Path, action: str) -> int:
    """Run one ``tabby keys`` action on ``path``; returns the exit code."""
    try:
        if not path.exists():
            create_key_file(path)
            print(f"created {path}")
        if action == "add":
            print(f"added API key: {add_api_key(path)}")
        elif action == "rotate-admin":
            print(f"new admin key: {rotate_admin_key(path)}")
        else:
            keys = read_key_file(path)
            print(f"keys file: {path}")
            print(f"admin key: {keys.admin_key}")
            for key in keys.api_keys:
                print(f"API key:   {key}")
    except KeyFileError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return 2
    return 0
