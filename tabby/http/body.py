"""Request bodies: JSON in, typed attrs objects out, or a 400 naming the field.

Only ``Content-Type: application/json`` is accepted; anything else is a 400 with code
``unsupported_content_type`` (every OpenAI client sends JSON, and 400 keeps the error tree
as it is). Unknown fields are ignored, because OpenAI clients send fields that tabby does
not know; everything else is checked strictly (``"false"`` is not a boolean).

Generation bodies go through :func:`structure_request`: the active sampler preset is
applied to the raw body first (only there is "omitted" visible; it also resolves the
sampler fields' aliases), then the body is validated into the protocol's request class.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

import cattrs
import quart
import trio

from tabby.config.validation import ValidationFailed, make_converter, structure
from tabby.errors import InvalidRequest, RequestTimeout
from tabby.http.context import current_services
from tabby.serving.presets import SamplerPreset, apply_preset

__all__ = ["parse_body", "read_json", "structure_body", "structure_request"]

T = TypeVar("T")
_MAX_LISTED = 5  # problems named in one message; the rest are counted

# Built once per process: cattrs caches structuring functions per class on the converter.
_CONVERTER: cattrs.Converter = make_converter(forbid_extra_keys=False)


async def read_json(*, allow_empty: bool = False) -> Any:
    """The request's JSON body; ``allow_empty`` turns a missing body into ``{}``."""
    request = quart.request
    timeout = current_services().config.network.body_timeout
    # A client that stalls mid-body would otherwise hold its connection forever.
    with trio.move_on_after(timeout) as waited:
        raw = await request.get_data(as_text=False)
    if waited.cancelled_caught:
        raise RequestTimeout(f"the request body did not arrive within {timeout:g} s")
    if not raw.strip() and allow_empty:
        return {}
    if request.mimetype != "application/json":
        shown = request.mimetype or "none"
        raise InvalidRequest(
            f"expected Content-Type: application/json, got {shown}",
            code="unsupported_content_type",
        )
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        # A few KB of "[[[[..." exhaust the parser's recursion limit: the client's fault.
        raise InvalidRequest("the body's JSON is nested too deeply", code="invalid_json") from None


def structure_body(data: Any, cls: type[T]) -> T:
    """``data`` as ``cls``, or InvalidRequest naming the first bad field in ``param``."""
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object", code="invalid_body")
    try:
        return structure(data, cls, _CONVERTER)
    except ValidationFailed as exc:
        issues = exc.issues
        listed = "; ".join(str(issue) for issue in issues[:_MAX_LISTED])
        more = len(issues) - _MAX_LISTED
        if more > 0:
            listed += f"; and {more} more"
        first = issues[0].path if issues else ""
        raise InvalidRequest(f"invalid request: {listed}", param=first or None) from None


async def parse_body(cls: type[T], *, allow_empty: bool = False) -> T:
    """Read, check and structure the request body into ``cls``."""
    return structure_body(await read_json(allow_empty=allow_empty), cls)


def structure_request(raw: Any, cls: type[T], preset: SamplerPreset | None) -> T:
    """``raw`` with ``preset`` applied, validated as ``cls`` (400 names the field)."""
    if not isinstance(raw, Mapping):
        raise InvalidRequest("the body must be a JSON object", code="invalid_body")
    return structure_body(apply_preset(raw, preset), cls)
