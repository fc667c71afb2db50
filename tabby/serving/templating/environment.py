"""The Jinja2 environment chat templates render in, and the compiled template object.

Templates come from model repositories, so they run sandboxed and immutable (no
``list.append`` on request data). The environment mirrors what Hugging Face
templates are written against: trimmed blocks, loop controls, ``raise_exception``,
``strftime_now``, a ``tojson`` that returns plain text, and render-transparent
``{% generation %}`` blocks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NoReturn

import attrs
import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox

from tabby.errors import TemplateError

__all__ = [
    "PromptTemplate",
    "RenderedPrompt",
    "TemplateMetadata",
    "compile_template",
    "make_environment",
]


class _RaisedByTemplate(Exception):
    """``raise_exception(msg)`` called by the template itself."""


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body unchanged.

    Hugging Face uses the block to mark assistant tokens for training masks; for
    serving, the content is all that matters.
    """

    tags = {"generation"}  # noqa: RUF012 - the Extension API defines this as a class attribute

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)  # the "generation" name token
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: object) -> NoReturn:
    raise _RaisedByTemplate(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    indent: int | None = None,
    ensure_ascii: bool = False,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes and returns Markup; prompts want the raw JSON
    # text. ensure_ascii defaults to False as in Hugging Face's environment.
    return json.dumps(
        value,
        indent=indent,
        ensure_ascii=ensure_ascii,
        separators=separators,
        sort_keys=sort_keys,
    )


def make_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """A fresh environment; each template owns one, so nothing is shared between them."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
        keep_trailing_newline=False,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    return env


@attrs.frozen
class TemplateMetadata:
    """Values a template declares with top-level ``{% set %}`` statements."""

    stop_strings: tuple[str, ...] = ()
    tool_start: str | None = None
    tool_end: str | None = None


@attrs.frozen
class RenderedPrompt:
    text: str
    metadata: TemplateMetadata


@attrs.frozen
class PromptTemplate:
    """A named, compiled chat template.

    Rendering is synchronous and fast (well under a millisecond for ordinary chats);
    callers may render on the event loop.
    """

    name: str
    source: str = attrs.field(repr=False)
    compiled: jinja2.Template = attrs.field(repr=False, eq=False)
    # Whether the template reads the request's ``tools`` (else they are described in a
    # system prompt of our own) and renders an assistant turn's ``tool_calls`` (else they
    # are written into its content). Read from the source, once.
    takes_tools: bool = False
    renders_tool_calls: bool = False

    def render(self, variables: Mapping[str, Any]) -> str:
        """The prompt text for ``variables`` (see :func:`build_variables`)."""
        return self.render_with_metadata(variables).text

    def metadata(self, variables: Mapping[str, Any]) -> TemplateMetadata:
        """The template's metadata, evaluated with the request's variables.

        Real templates touch ``messages[0]`` at the top level, so instantiating the
        template with an empty context would fail; the request's variables are used.
        """
        return self.render_with_metadata(variables).metadata

    def render_with_metadata(self, variables: Mapping[str, Any]) -> RenderedPrompt:
        """Render once and read the metadata from the same run."""
        try:
            # A template module's string form is its rendered body, so one pass
            # yields both the prompt and the exported top-level variables.
            module = self.compiled.make_module(dict(variables))
            text = str(module)
        except _RaisedByTemplate as exc:
            raise TemplateError(f"template '{self.name}': {exc}") from None
        except jinja2.TemplateError as exc:
            raise TemplateError(
                f"template '{self.name}': {exc.message or type(exc).__name__}"
            ) from None
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise TemplateError(f"template '{self.name}': {type(exc).__name__}: {exc}") from None
        return RenderedPrompt(text, _read_metadata(module))


def _read_metadata(module: Any) -> TemplateMetadata:
    stops = getattr(module, "stop_strings", None)
    stop_strings: tuple[str, ...] = ()
    # A malformed declaration is ignored rather than failing every request.
    if isinstance(stops, list | tuple) and all(isinstance(s, str) for s in stops):
        stop_strings = tuple(s for s in stops if s)
    tool_start = getattr(module, "tool_start", None)
    tool_end = getattr(module, "tool_end", None)
    return TemplateMetadata(
        stop_strings=stop_strings,
        tool_start=tool_start if isinstance(tool_start, str) and tool_start else None,
        tool_end=tool_end if isinstance(tool_end, str) and tool_end else None,
    )


def compile_template(name: str, source: str) -> PromptTemplate:
    """Compile ``source``; a syntax error becomes :class:`TemplateError` naming ``name``."""
    env = make_environment()
    try:
        tree = env.parse(source)
        compiled = env.from_string(tree)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"template '{name}' does not compile: {exc.message} (line {exc.lineno})"
        ) from None
    return PromptTemplate(
        name=name,
        source=source,
        compiled=compiled,
        takes_tools="tools" in jinja2.meta.find_undeclared_variables(tree),
        renders_tool_calls="tool_calls" in source,
    )
