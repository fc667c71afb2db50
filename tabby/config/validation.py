"""Strict structuring of untyped data (TOML, JSON bodies) into attrs classes.

cattrs' default converter is lenient (``bool("false")`` is ``True``); here every
primitive is checked with ``isinstance`` and every problem is reported with the
path of the field it concerns, e.g. ``messages[0].content``.

Field options, given through ``attrs.field(metadata=...)``:

* ``aliases``: other accepted names for the field (``max_length`` for ``max_tokens``);
  when both are present the canonical name wins.
* ``doc``: a one-line description (used by config export and the OpenAPI schema).

Validators should raise :class:`FieldError` (see :func:`check`) so that the error is
reported at the field's path rather than at the class.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

import attrs
import cattrs
import cattrs.cols as cols
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    StructureHandlerNotFoundError,
)
from cattrs.gen import make_dict_structure_fn

__all__ = [
    "FieldError",
    "Issue",
    "ValidationFailed",
    "check",
    "describe_type",
    "make_converter",
    "structure",
]

T = TypeVar("T")


@attrs.frozen
class Issue:
    path: str  # dotted field path, "" for the whole document
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ValidationFailed(Exception):
    def __init__(self, issues: list[Issue]) -> None:
        super().__init__("; ".join(str(i) for i in issues))
        self.issues = issues


class FieldError(ValueError):
    """Raised by validators: the problem belongs to ``field`` of the class being built."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class _StrictTypeError(TypeError):
    pass


def check(
    predicate: Callable[[Any], bool], expected: str
) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    """An attrs validator: ``predicate(value)`` must hold, else 'expected ..., got ...'."""

    def validator(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and not predicate(value):
            raise FieldError(attribute.name, f"expected {expected}, got {_show(value)}")

    return validator


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"' if len(value) < 60 else f'"{value[:57]}..."'
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def describe_type(tp: Any) -> str:
    """A short human description of a type: 'an integer', 'a list of strings'."""
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if tp is type(None):
        return "null"
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(_show(a) for a in args)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(describe_type(a) for a in args)
    if origin in (list, tuple, set, frozenset) or (origin is not None and _is_seq(origin)):
        inner = describe_type(args[0]) if args else "values"
        return f"a list of {_plural(inner)}"
    if origin is dict or (origin is not None and _is_map(origin)):
        return "a table" if not args else f"a table of {_plural(describe_type(args[1]))}"
    if attrs.has(tp):
        return "a table"
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


def _plural(desc: str) -> str:
    for art in ("an ", "a "):
        if desc.startswith(art):
            word = desc[len(art) :]
            return word + ("es" if word.endswith("h") else "s") if " " not in word else word
    return desc


def _strict_primitive(tp: type) -> Callable[[Any, type], Any]:
    def hook(value: Any, _t: type) -> Any:
        if tp is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if ok:
                return float(value)
        elif tp is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
            if not ok and isinstance(value, float) and value.is_integer():
                return int(value)
        else:
            ok = isinstance(value, tp)
            if ok and tp is str:
                _check_text(value)
        if not ok:
            raise _StrictTypeError(f"expected {describe_type(tp)}, got {_show(value)}")
        return value

    return hook


def _check_text(value: str) -> None:
    """JSON may spell a lone surrogate ("\\ud800"), which is not text: refuse it here,
    where the field is known, rather than in the tokenizer."""
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _StrictTypeError(
            "contains a lone surrogate (\\ud800-\\udfff): text must be valid Unicode"
        ) from None


def _checked_any(value: Any) -> Any:
    """A value of an ``Any`` field (tools, template variables), its text checked."""
    if isinstance(value, str):
        _check_text(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _checked_any(key)
            _checked_any(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _checked_any(item)
    return value


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (types.UnionType, typing.Union)


def _matches_shape(value: Any, tp: Any) -> bool:
    """Cheap pre-check to pick a union member before structuring it."""
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is Any:
        return True
    origin = get_origin(tp)
    if origin is Literal:
        return value in get_args(tp)
    if origin in (list, tuple, set, frozenset) or (origin is not None and _is_seq(origin)):
        return isinstance(value, list | tuple)
    if origin in (dict,) or origin is Mapping or (origin is not None and _is_map(origin)):
        return isinstance(value, dict)
    if attrs.has(tp):
        return isinstance(value, dict)
    return True


def _is_seq(origin: Any) -> bool:
    import collections.abc as cabc

    return origin in (cabc.Sequence, cabc.MutableSequence)


def _is_map(origin: Any) -> bool:
    import collections.abc as cabc

    return origin in (cabc.Mapping, cabc.MutableMapping)


def make_converter(*, forbid_extra_keys: bool) -> cattrs.Converter:
    """A converter with strict primitives, union support and field aliases."""
    conv = cattrs.Converter(forbid_extra_keys=forbid_extra_keys, detailed_validation=True)
    for prim in (int, float, str, bool):
        conv.register_structure_hook(prim, _strict_primitive(prim))

    def union_factory(tp: Any) -> Callable[[Any, Any], Any]:
        members = get_args(tp)

        def hook(value: Any, _t: Any) -> Any:
            for member in members:
                if _matches_shape(value, member):
                    if member is type(None):
                        return None
                    return conv.structure(value, member)
            raise _StrictTypeError(f"expected {describe_type(tp)}, got {_show(value)}")

        return hook

    conv.register_structure_hook_factory(_is_union, union_factory)

    def attrs_factory(cls: type) -> Callable[[Any, type], Any]:
        base: Callable[[Any, type], Any] = make_dict_structure_fn(cls, conv)
        aliases: dict[str, str] = {}
        for a in attrs.fields(cls):
            for alias in a.metadata.get("aliases", ()):
                aliases[alias] = a.name

        def hook(value: Any, _t: type) -> Any:
            if not isinstance(value, Mapping):
                raise _StrictTypeError(f"expected a table/object, got {_show(value)}")
            if aliases:
                value = dict(value)
                for alias, name in aliases.items():
                    if alias in value:
                        alias_value = value.pop(alias)
                        value.setdefault(name, alias_value)
            return base(value, cls)

        return hook

    conv.register_structure_hook_factory(attrs.has, attrs_factory)

    def literal_factory(tp: Any) -> Callable[[Any, Any], Any]:
        allowed = get_args(tp)

        def hook(value: Any, _t: Any) -> Any:
            for choice in allowed:
                if value == choice and type(value) is type(choice):
                    return choice
            raise _StrictTypeError(f"expected {describe_type(tp)}, got {_show(value)}")

        return hook

    conv.register_structure_hook_factory(_is_literal, literal_factory)

    def sequence_factory(tp: Any) -> Callable[[Any, Any], Any]:
        # cattrs would happily iterate a string into a list of characters.
        origin = get_origin(tp) or tp
        if origin is tuple:
            inner = cols.homogenous_tuple_structure_factory(tp, conv)
        else:
            inner = cols.list_structure_factory(tp, conv)
            if origin in (set, frozenset) or cols.is_any_set(tp):
                base_inner = inner
                kind: type = frozenset if origin is frozenset else set

                def inner(value: Any, t: Any) -> Any:
                    return kind(base_inner(value, t))

        def hook(value: Any, t: Any) -> Any:
            if not isinstance(value, list | tuple | set | frozenset):
                raise _StrictTypeError(f"expected {describe_type(tp)}, got {_show(value)}")
            return inner(value, t)

        return hook

    conv.register_structure_hook_factory(
        lambda t: cols.is_sequence(t) or cols.is_any_set(t), sequence_factory
    )
    def mapping_factory(tp: Any) -> Callable[[Any, Any], Any]:
        # cattrs would call .items() on whatever came: a string is a 500, not a 400.
        inner = cols.mapping_structure_factory(tp, conv)

        def hook(value: Any, t: Any) -> Any:
            if not isinstance(value, Mapping):
                raise _StrictTypeError(f"expected {describe_type(tp)}, got {_show(value)}")
            return inner(value, t)

        return hook

    conv.register_structure_hook_factory(cols.is_mapping, mapping_factory)
    conv.register_structure_hook_func(_is_any, lambda v, _t: _checked_any(v))
    return conv


def _walk(exc: BaseException, path: str, out: list[Issue]) -> None:
    if isinstance(exc, IterableValidationError):
        items, rest = exc.group_exceptions()
        for sub, inote in items:
            _walk(sub, f"{path}[{inote.index!r}]", out)
        for sub in rest:
            _walk(sub, path, out)
    elif isinstance(exc, ClassValidationError):
        fields, others = exc.group_exceptions()
        for sub, anote in fields:
            _walk(sub, f"{path}.{anote.name}" if path else anote.name, out)
        for sub in others:
            _walk(sub, path, out)
    elif isinstance(exc, ForbiddenExtraKeysError):
        for key in sorted(exc.extra_fields):
            out.append(Issue(f"{path}.{key}" if path else key, "unknown key"))
    elif isinstance(exc, FieldError):
        out.append(Issue(f"{path}.{exc.field}" if path else exc.field, exc.message))
    elif isinstance(exc, KeyError):
        out.append(Issue(path, "required field missing"))
    elif isinstance(exc, _StrictTypeError):
        out.append(Issue(path, str(exc)))
    elif isinstance(exc, StructureHandlerNotFoundError):
        out.append(Issue(path, f"unsupported value: {exc}"))
    elif isinstance(exc, ValueError | TypeError | cattrs.errors.CattrsError):
        out.append(Issue(path, str(exc)))
    elif isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            _walk(inner, path, out)
    else:
        raise exc


def structure(data: Any, cls: type[T], converter: cattrs.Converter) -> T:
    """Structure ``data`` into ``cls`` or raise :class:`ValidationFailed` with every problem."""
    try:
        return converter.structure(data, cls)
    except (ClassValidationError, IterableValidationError, ValueError, TypeError, cattrs.errors.CattrsError) as exc:
        issues: list[Issue] = []
        _walk(exc, "", issues)
        raise ValidationFailed(issues) from None


def _is_any(tp: object) -> bool:
    return tp is Any


def _is_literal(tp: object) -> bool:
    origin: object = get_origin(tp)
    return origin is Literal
