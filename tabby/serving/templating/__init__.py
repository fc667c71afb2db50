"""Chat prompt templates: the sandboxed Jinja2 environment, lookup and variables.

Typical use at model load (in a worker thread)::

    template = find_template(model_path, templates_dir=..., name=..., embedded=...)

and per chat request::

    variables = build_variables(messages, bos_token=..., eos_token=..., ...)
    rendered = template.render_with_metadata(variables)
    prompt = strip_leading_bos(rendered.text, info.bos_token, info.add_bos_token)
    stops = rendered.metadata.stop_strings (+ tool_start)

Rendering failures raise :class:`tabby.errors.TemplateError` (HTTP 400).
"""

from tabby.serving.templating.environment import (
    PromptTemplate,
    RenderedPrompt,
    TemplateMetadata,
    compile_template,
    make_environment,
)
from tabby.serving.templating.lookup import find_template, list_templates, load_named_template
from tabby.serving.templating.variables import build_variables, strip_leading_bos

__all__ = [
    "PromptTemplate",
    "RenderedPrompt",
    "TemplateMetadata",
    "build_variables",
    "compile_template",
    "find_template",
    "list_templates",
    "load_named_template",
    "make_environment",
    "strip_leading_bos",
]
