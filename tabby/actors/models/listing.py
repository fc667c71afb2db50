"""What can be loaded: listing of model, draft and LoRA folders, and name resolution.

A loadable model is a folder with a ``config.json`` or a ``.gguf`` file directly in
``model_dir``, or the embedded default model shipped in its own Python package. A name
is always relative to its folder: absolute paths, ``..`` and symlinks that lead outside
are refused, so a request cannot make the server read arbitrary files.

These functions touch the file system: call them from a worker thread.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath
from typing import Literal

import attrs

from tabby.errors import InvalidRequest

__all__ = [
    "ModelEntry",
    "embedded_default",
    "list_loras",
    "list_models",
    "resolve_inside",
    "resolve_lora",
    "resolve_model",
]

log = logging.getLogger(__name__)

EntryKind = Literal["folder", "gguf", "embedded"]


@attrs.frozen
class ModelEntry:
    name: str  # what a request names it by
    path: Path
    kind: EntryKind


def embedded_default() -> ModelEntry | None:
    """The embedded default chat model, when its package is installed."""
    try:
        from tabby.engine.embedded import DEFAULT_MODEL_NAME, default_model_path
    except ImportError:
        return None
    path = default_model_path()
    if path is None:
        return None
    return ModelEntry(DEFAULT_MODEL_NAME, path, "embedded")


def _is_model(path: Path) -> bool:
    if path.is_dir():
        return (path / "config.json").is_file()
    return path.is_file() and path.suffix == ".gguf"


def list_models(model_dir: Path, *, include_embedded: bool = True) -> list[ModelEntry]:
    """Model folders and GGUF files in ``model_dir`` (sorted), then the embedded default."""
    entries: list[ModelEntry] = []
    if model_dir.is_dir():
        root = model_dir.resolve()
        for child in sorted(model_dir.iterdir()):
            # Hidden entries include downloads still in progress (.tabby-download-*).
            if child.name.startswith(".") or not child.resolve().is_relative_to(root):
                continue
            if not _is_model(child):
                continue
            entries.append(ModelEntry(child.name, child, "gguf" if child.is_file() else "folder"))
    if include_embedded:
        embedded = embedded_default()
        if embedded is not None and all(e.name != embedded.name for e in entries):
            entries.append(embedded)
    return entries


def list_loras(lora_dir: Path) -> list[str]:
    """Every folder in ``lora_dir``."""
    if not lora_dir.is_dir():
        return []
    root = lora_dir.resolve()
    return sorted(
        child.name
        for child in lora_dir.iterdir()
        if child.is_dir()
        and not child.name.startswith(".")
        and child.resolve().is_relative_to(root)
    )


def resolve_inside(root: Path, name: str, *, param: str, what: str) -> Path:
    """``root / name`` resolved, refusing names that lead outside ``root``."""
    pure = PurePosixPath(name)
    if (
        not name
        or name != name.strip()
        or "\\" in name
        or "\x00" in name
        or pure.is_absolute()
        or name.startswith("~")
        or any(part in ("..", ".") for part in pure.parts)
    ):
        raise InvalidRequest(f"invalid {what} name {name!r}: give a name inside the {what} folder", param=param)
    resolved = (root / name).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise InvalidRequest(f"{what} name {name!r} leads outside the {what} folder", param=param)
    return resolved


def resolve_model(model_dir: Path, name: str, *, param: str = "model_name") -> ModelEntry:
    """The model a request names: a folder or ``.gguf`` file in ``model_dir``, or the
    embedded default model when nothing in ``model_dir`` has its name."""
    path = resolve_inside(model_dir, name, param=param, what="model")
    candidates = [path] if path.suffix == ".gguf" else [path, path.with_name(path.name + ".gguf")]
    for candidate in candidates:
        if _is_model(candidate):
            return ModelEntry(name, candidate, "gguf" if candidate.is_file() else "folder")
    embedded = embedded_default()
    if embedded is not None and name == embedded.name:
        return embedded
    if path.is_dir():
        raise InvalidRequest(
            f"model folder {name!r} has no config.json", param=param, code="model_not_found"
        )
    raise InvalidRequest(
        f"model {name!r} not found in the model folder", param=param, code="model_not_found"
    )


def resolve_lora(lora_dir: Path, name: str) -> Path:
    path = resolve_inside(lora_dir, name, param="loras", what="LoRA")
    if not path.is_dir():
        raise InvalidRequest(f"LoRA {name!r} not found in the LoRA folder", param="loras")
    return path
