"""The OpenAPI 3.1 document, generated from the attrs classes the handlers validate with.

Convention for route modules (``tabby/http/<family>.py``): next to
``blueprint(services)``, export ``ROUTES: tuple[Route, ...]``, one :class:`Route` per
method and path, and list them in ``tabby.http.app.FAMILIES``::

    ROUTES = (
        Route("POST", "/v1/token/encode", request=TokenEncodeRequest,
              response=TokenEncodeResponse, auth="api", doc="Tokenize text or messages."),
    )

``request`` is the attrs class the body is structured into (``body_required=False``
when the body may be left out), ``response`` the attrs class of the JSON answer,
``stream`` the attrs class of each SSE event (both may be set when the request chooses,
as with ``"stream": true``), ``auth`` one of ``"none"``, ``"api"``, ``"admin"``, ``tag``
the group on the /docs page, ``doc`` a summary line and an optional longer text. Field types become JSON schema, field
docs come from ``metadata["doc"]`` and aliases (``metadata["aliases"]``) are listed in
the description and as ``x-aliases``. Paths use quart's rule syntax
(``/v1/downloads/<download_id>``).

A rule of the app that no mounted module declares still appears, with its handler's
docstring, no schemas and permission ``"undeclared"``, so the document always covers
the whole API.
:func:`app_document` builds the document for a running app from the routes its
factory declared (:func:`declare_routes`); ``tabby export-openapi``
(``tabby.http.export``) builds the same app offline and writes it.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import PurePath
from typing import Any, Literal, cast, get_args, get_origin

import attrs
import quart

__all__ = [
    "DOC_PATHS",
    "ErrorDetail",
    "ErrorResponse",
    "Route",
    "SchemaBuilder",
    "app_document",
    "app_routes",
    "build_document",
    "declare_routes",
    "openapi_path",
]

# "undeclared": a rule no module describes (its handler checks whatever it checks).
Auth = Literal["none", "api", "admin", "undeclared"]
OPENAPI_VERSION = "3.1.0"
# The documentation routes themselves, left out of the document (as is customary).
DOC_PATHS = frozenset({"/openapi.json", "/docs"})
_RULE_PARAM = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")
_DECLARED = "tabby.http.openapi.declared"


def _upper(method: str) -> str:
    return method.upper()


@attrs.frozen
class Route:
    """One documented operation of a route module (see the module docstring)."""

    method: str = attrs.field(converter=_upper)
    path: str
    request: type | None = attrs.field(default=None, kw_only=True)
    body_required: bool = attrs.field(default=True, kw_only=True)
    response: type | None = attrs.field(default=None, kw_only=True)
    stream: type | None = attrs.field(default=None, kw_only=True)
    auth: Auth = attrs.field(default="api", kw_only=True)
    doc: str = attrs.field(default="", kw_only=True)
    tag: str | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class ErrorDetail:
    message: str = attrs.field(metadata={"doc": "What went wrong, naming the field."})
    type: str = attrs.field(metadata={"doc": "invalid_request_error, authentication_error, ..."})
    param: str | None = attrs.field(metadata={"doc": "The request field concerned, if any."})
    code: str | None = attrs.field(metadata={"doc": "A stable machine-readable code."})
    trace: str | None = attrs.field(
        default=None, metadata={"doc": "Traceback, only with network.send_tracebacks."}
    )


@attrs.frozen
class ErrorResponse:
    """Every error, in JSON bodies and as the last event of a stream."""

    error: ErrorDetail = attrs.field(metadata={"doc": "The error."})


def openapi_path(rule: str) -> str:
    """quart's ``/a/<name>`` (or ``<int:name>``) as OpenAPI's ``/a/{name}``."""
    return _RULE_PARAM.sub(lambda m: "{" + m.group(1) + "}", rule)


# -- types to JSON schema ---------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, PurePath):
        return str(value)
    return value


def _default_of(field: attrs.Attribute[Any]) -> tuple[bool, Any]:
    """(has a JSON default, the default) of a field."""
    default = field.default
    if default is attrs.NOTHING:
        return False, None
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        factory = cast(Any, default)
        if factory.takes_self:
            return False, None
        default = factory.factory()
    value = _jsonable(default)
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False, None
    return True, value


_PRIMITIVES: dict[Any, str] = {
    int: "integer",
    float: "number",
    bool: "boolean",
    str: "string",
    type(None): "null",
}


def _is_sequence(origin: Any) -> bool:
    import collections.abc as cabc

    return origin in (list, tuple, set, frozenset, cabc.Sequence, cabc.MutableSequence, cabc.Set)


def _is_mapping(origin: Any) -> bool:
    import collections.abc as cabc

    return origin in (dict, cabc.Mapping, cabc.MutableMapping)


class SchemaBuilder:
    """Turns attrs classes into ``components.schemas`` entries, each named once."""

    def __init__(self) -> None:
        self.schemas: dict[str, dict[str, Any]] = {}
        self._names: dict[type, str] = {}

    def ref(self, cls: type) -> dict[str, Any]:
        """A ``$ref`` to ``cls``'s component, building it (and what it uses) first."""
        name = self._names.get(cls)
        if name is None:
            name = self._name_for(cls)
            self._names[cls] = name
            self.schemas[name] = {}  # reserved first: classes may refer to themselves
            self.schemas[name] = self._class_schema(cls)
        return {"$ref": f"#/components/schemas/{name}"}

    def _name_for(self, cls: type) -> str:
        name = cls.__name__
        if name not in self.schemas:
            return name
        # Same class name in two modules: qualify with the module's last part.
        qualified = f"{cls.__module__.rsplit('.', 1)[-1]}_{name}"
        suffix = 2
        candidate = qualified
        while candidate in self.schemas:
            candidate = f"{qualified}{suffix}"
            suffix += 1
        return candidate

    def _class_schema(self, cls: type) -> dict[str, Any]:
        try:
            hints = typing.get_type_hints(cls)
        except (NameError, TypeError):
            hints = {}
        properties: dict[str, Any] = {}
        required: list[str] = []
        for field in attrs.fields(cls):
            tp = hints.get(field.name, field.type if not isinstance(field.type, str) else Any)
            properties[field.name] = self._field_schema(field, tp)
            if field.default is attrs.NOTHING:
                required.append(field.name)
        schema: dict[str, Any] = {"type": "object", "title": cls.__name__}
        doc = _class_doc(cls)
        if doc:
            schema["description"] = doc
        schema["properties"] = properties
        if required:
            schema["required"] = required
        return schema

    def _field_schema(self, field: attrs.Attribute[Any], tp: Any) -> dict[str, Any]:
        schema = dict(self.type_schema(tp))
        description = str(field.metadata.get("doc", "")).strip()
        aliases = tuple(field.metadata.get("aliases", ()))
        if aliases:
            also = "Also accepted as: " + ", ".join(aliases) + "."
            description = f"{description} {also}".strip()
            schema["x-aliases"] = list(aliases)
        if description:
            schema["description"] = description
        has_default, default = _default_of(field)
        if has_default:
            schema["default"] = default
        return schema

    def type_schema(self, tp: Any) -> dict[str, Any]:
        """The JSON schema of one Python type annotation."""
        if tp is Any or tp is object:
            return {}
        if tp in _PRIMITIVES:
            return {"type": _PRIMITIVES[tp]}
        if isinstance(tp, type) and issubclass(tp, PurePath):
            return {"type": "string"}
        if isinstance(tp, type) and attrs.has(tp):
            return self.ref(tp)
        origin, args = get_origin(tp), get_args(tp)
        if origin is Literal:
            return _literal_schema(args)
        if origin in (types.UnionType, typing.Union):
            return self._union_schema(args)
        if origin is not None and _is_sequence(origin):
            if origin is tuple and args and args[-1] is not Ellipsis:
                items = [self.type_schema(a) for a in args]
                return {"type": "array", "prefixItems": items, "minItems": len(items),
                        "maxItems": len(items)}
            return {"type": "array", "items": self.type_schema(args[0]) if args else {}}
        if origin is not None and _is_mapping(origin):
            value = self.type_schema(args[1]) if len(args) == 2 else {}
            return {"type": "object", "additionalProperties": value or True}
        if tp in (list, tuple):
            return {"type": "array"}
        if tp is dict:
            return {"type": "object"}
        return {}

    def _union_schema(self, args: Sequence[Any]) -> dict[str, Any]:
        members = [self.type_schema(a) for a in args]
        if any(m == {} for m in members):
            return {}
        simple = [m for m in members if set(m) == {"type"} and isinstance(m["type"], str)]
        if len(simple) == len(members):
            return {"type": [m["type"] for m in simple]}
        return {"anyOf": members}


def _literal_schema(values: Sequence[Any]) -> dict[str, Any]:
    kinds = sorted({_PRIMITIVES.get(type(v), "string") for v in values})
    kind: str | list[str] = kinds[0] if len(kinds) == 1 else kinds
    return {"type": kind, "enum": list(values)}


def _class_doc(cls: type) -> str:
    doc = cls.__doc__ or ""
    # attrs writes "Cls(a, b)" style docs for classes without one; ignore those.
    if not doc or doc.startswith(f"{cls.__name__}("):
        return ""
    return " ".join(line.strip() for line in doc.strip().split("\n\n")[0].splitlines())


# -- the document -----------------------------------------------------------------------

_SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "API key or admin key."},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
    "adminKey": {"type": "apiKey", "in": "header", "name": "X-Admin-Key"},
}
_SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "none": [],
    "api": [{"bearer": []}, {"apiKey": []}, {"adminKey": []}],
    "admin": [{"bearer": []}, {"adminKey": []}],
}
_AUTH_NOTE = {
    "none": "No key needed.",
    "api": "Needs an API key or the admin key.",
    "admin": "Needs the admin key.",
    "undeclared": "",
}


def _operation(route: Route, builder: SchemaBuilder, operation_id: str) -> dict[str, Any]:
    summary, _, rest = route.doc.strip().partition("\n")
    op: dict[str, Any] = {"operationId": operation_id, "summary": summary.strip()}
    description = " ".join(line.strip() for line in rest.splitlines()).strip()
    op["description"] = f"{description} {_AUTH_NOTE[route.auth]}".strip()
    if route.tag:
        op["tags"] = [route.tag]
    if route.auth in _SECURITY:
        op["security"] = _SECURITY[route.auth]
    op["x-tabby-permission"] = route.auth
    params = _RULE_PARAM.findall(route.path)
    if params:
        op["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in params
        ]
    if route.request is not None:
        op["requestBody"] = {
            "required": route.body_required,
            "content": {"application/json": {"schema": builder.ref(route.request)}},
        }
    content: dict[str, Any] = {}
    if route.response is not None:
        content["application/json"] = {"schema": builder.ref(route.response)}
    if route.stream is not None:
        content["text/event-stream"] = {
            "schema": builder.ref(route.stream),
            "x-sse-event": "Each `data:` line holds one such object; an error ends the "
            "stream with one ErrorResponse object.",
        }
    ok: dict[str, Any] = {"description": "Success."}
    if content:
        ok["content"] = content
    error = {
        "description": "An error (status per error class).",
        "content": {"application/json": {"schema": builder.ref(ErrorResponse)}},
    }
    op["responses"] = {"200": ok, "default": error}
    return op


def build_document(
    routes: Iterable[Route], *, title: str = "tabby", version: str = "0.0.0"
) -> dict[str, Any]:
    """The OpenAPI document of ``routes`` (deterministic: same routes, same JSON)."""
    builder = SchemaBuilder()
    builder.ref(ErrorResponse)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        path = openapi_path(route.path)
        method = route.method.lower()
        operation_id = f"{method}_{re.sub(r'[^A-Za-z0-9]+', '_', path).strip('_')}"
        paths.setdefault(path, {})[method] = _operation(route, builder, operation_id)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": title,
            "version": version,
            "description": "Self-hosted LLM inference server: OpenAI-compatible and admin API.",
        },
        "paths": paths,
        "components": {"schemas": builder.schemas, "securitySchemes": _SECURITY_SCHEMES},
    }


def declare_routes(app: quart.Quart, routes: Iterable[Route]) -> None:
    """Record the documented routes of the families mounted on ``app``."""
    app.extensions[_DECLARED] = tuple(routes)


def app_routes(app: quart.Quart, declared: Iterable[Route] | None = None) -> list[Route]:
    """The declared routes (by default those recorded for ``app``), then every
    undeclared rule of ``app``."""
    if declared is None:
        declared = app.extensions.get(_DECLARED, ())
    declared = list(declared)
    seen = {(r.method, openapi_path(r.path)) for r in declared}
    extra: list[Route] = []
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: (r.rule, r.endpoint)):
        path = openapi_path(rule.rule)
        if rule.endpoint == "static" or path in DOC_PATHS:
            continue
        view = app.view_functions.get(rule.endpoint)
        doc = (view.__doc__ or "").strip() if view is not None else ""
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            if (method, path) in seen:
                continue
            seen.add((method, path))
            summary = doc or f"{method} {path}"
            note = "Its module declares no schemas or permission here."
            extra.append(Route(method, rule.rule, auth="undeclared", doc=f"{summary}\n{note}"))
    return declared + extra


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("tabby")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def app_document(app: quart.Quart) -> dict[str, Any]:
    """The OpenAPI document of a built app."""
    return build_document(app_routes(app), version=_version())
