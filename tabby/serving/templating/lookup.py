"""Finding a model's chat template.

Order at model load (first hit wins):

1. the configured ``prompt_template`` name: ``templates/<name>.jinja`` (sub-folders
   allowed), else the entry of that name in a list-style ``chat_template`` of the
   model's ``tokenizer_config.json``;
2. ``<model>/tabby_template.jinja``;
3. ``<model>/chat_template.jinja``;
4. ``<model>/chat_template.json``, key ``chat_template``;
5. ``<model>/tokenizer_config.json``, key ``chat_template`` (a string, or a list of
   ``{name, template}``: the one named ``default``, else the first);
6. the template embedded in a GGUF file (read by the caller, passed as text);
7. the template in ``templates/`` whose stem appears in the model's name (all files
   are checked; the longest match wins).

These functions read files synchronously: call them from a worker thread.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tabby.errors import InvalidRequest, NotFound, TemplateError
from tabby.serving.templating.environment import PromptTemplate, compile_template

__all__ = ["find_template", "list_templates", "load_named_template"]

_SUFFIX = ".jinja"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


def list_templates(templates_dir: Path) -> list[str]:
    """Names of the templates in ``templates_dir`` (``tool_calls/x`` for sub-folders)."""
    if not templates_dir.is_dir():
        return []
    return sorted(
        path.relative_to(templates_dir).with_suffix("").as_posix()
        for path in templates_dir.rglob(f"*{_SUFFIX}")
        if path.is_file()
    )


def _named_path(templates_dir: Path, name: str) -> Path:
    if not _NAME_RE.fullmatch(name) or any(part in (".", "..") for part in name.split("/")):
        raise InvalidRequest(f"invalid template name '{name}'", param="prompt_template")
    root = templates_dir.resolve()
    path = (root / f"{name}{_SUFFIX}").resolve()
    # Symlinks are resolved too: a link leading outside the folder is refused.
    if not path.is_relative_to(root):
        raise InvalidRequest(
            f"template name '{name}' leads outside the templates folder", param="prompt_template"
        )
    return path


def load_named_template(templates_dir: Path, name: str) -> PromptTemplate:
    """``templates/<name>.jinja``; :class:`NotFound` when absent."""
    path = _named_path(templates_dir, name)
    if not path.is_file():
        raise NotFound(f"template '{name}' not found", param="prompt_template")
    return compile_template(name, path.read_text(encoding="utf-8"))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TemplateError(f"cannot read {path.name}: {exc}") from None


def _tokenizer_config_template(model_dir: Path, wanted: str | None) -> str | None:
    """``chat_template`` of tokenizer_config.json; ``wanted`` picks a named entry."""
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return None
    data = _read_json(path)
    value = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(value, str):
        return None if wanted is not None else value
    if not isinstance(value, list):
        return None
    entries: dict[str, str] = {
        e["name"]: e["template"]
        for e in value
        if isinstance(e, dict)
        and isinstance(e.get("name"), str)
        and isinstance(e.get("template"), str)
    }
    if wanted is not None:
        return entries.get(wanted)
    if "default" in entries:
        return entries["default"]
    return next(iter(entries.values()), None)


def _from_model_dir(model_dir: Path) -> PromptTemplate | None:
    for filename in ("tabby_template.jinja", "chat_template.jinja"):
        path = model_dir / filename
        if path.is_file():
            return compile_template(filename, path.read_text(encoding="utf-8"))
    path = model_dir / "chat_template.json"
    if path.is_file():
        data = _read_json(path)
        text = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(text, str):
            return compile_template("chat_template.json", text)
    text = _tokenizer_config_template(model_dir, None)
    if text is not None:
        return compile_template("tokenizer_config.json", text)
    return None


def _squash(text: str) -> str:
    # "Meta-Llama-3-8B" and "llama3" should meet: compare letters and digits only.
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _match_by_name(templates_dir: Path, model_name: str) -> PromptTemplate | None:
    squashed = _squash(model_name)
    best: str | None = None
    best_len = 0
    for name in list_templates(templates_dir):
        stem = _squash(name.rsplit("/", 1)[-1])
        if stem and stem in squashed and len(stem) > best_len:
            best, best_len = name, len(stem)
    return load_named_template(templates_dir, best) if best is not None else None


def find_template(
    model_path: Path,
    *,
    templates_dir: Path,
    name: str | None,
    embedded: str | None,
) -> PromptTemplate | None:
    """The chat template for the model at ``model_path`` (a folder or a GGUF file).

    ``name`` is the configured ``prompt_template``; when it is set and cannot be
    found, :class:`NotFound` is raised rather than silently using another template.
    ``embedded`` is the chat template read from a GGUF file, if any. Returns None
    when the model has no template at all.
    """
    model_dir = model_path if model_path.is_dir() else None
    if name is not None:
        try:
            return load_named_template(templates_dir, name)
        except NotFound:
            text = _tokenizer_config_template(model_dir, name) if model_dir else None
            if text is None:
                raise
            return compile_template(name, text)
    if model_dir is not None:
        found = _from_model_dir(model_dir)
        if found is not None:
            return found
    if embedded:
        return compile_template("gguf", embedded)
    model_name = model_path.name if model_dir is not None else model_path.stem
    return _match_by_name(templates_dir, model_name)
