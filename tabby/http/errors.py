"""The one place where errors become HTTP responses.

Every error path answers with the status that the :class:`~tabby.errors.TabbyError`
class carries: errors raised by handlers, quart's own HTTP errors (unknown route, wrong
method, body too large) and unexpected exceptions (500, logged with their traceback).
The *body* is the protocol's: each blueprint may register an :data:`ErrorRenderer`
with :func:`use_error_renderer`, and requests outside such a blueprint (other
routes, unknown paths) get the app's default renderer. A stream that fails answers
with one last event in the same shape (``tabby.http.sse``). A traceback reaches the
client only with ``network.send_tracebacks``, inside the rendered body.
"""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import quart
from quart.blueprints import BlueprintSetupState
from werkzeug.exceptions import HTTPException

from tabby import errors

__all__ = [
    "ErrorRenderer",
    "error_renderer",
    "error_response",
    "install_error_handlers",
    "internal_error",
    "to_tabby_error",
    "use_error_renderer",
]

log = logging.getLogger(__name__)

# (error, traceback text or None) -> the JSON body a protocol's clients expect.
ErrorRenderer = Callable[[errors.TabbyError, str | None], Mapping[str, Any]]

_RENDERERS = "tabby.http.error_renderers"

_BY_STATUS: dict[int, type[errors.TabbyError]] = {
    400: errors.InvalidRequest,
    401: errors.AuthenticationError,
    403: errors.PermissionDenied,
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    408: errors.RequestTimeout,
    409: errors.Conflict,
    413: errors.PayloadTooLarge,
    422: errors.Unprocessable,
    429: errors.TooManyRequests,
    501: errors.NotImplementedFeature,
    503: errors.ServiceUnavailable,
}


class _Renderers:
    """The app's renderers: the default and one per registered blueprint name."""

    def __init__(self, default: ErrorRenderer) -> None:
        self.default = default
        self.by_blueprint: dict[str, ErrorRenderer] = {}


def use_error_renderer(bp: quart.Blueprint, render: ErrorRenderer) -> None:
    """Errors of ``bp``'s routes, and of their streams, are rendered by ``render``."""

    def register(state: BlueprintSetupState) -> None:
        renderers: _Renderers = state.app.extensions[_RENDERERS]
        renderers.by_blueprint[state.name] = render

    bp.record_once(register)


def error_renderer() -> ErrorRenderer:
    """The renderer for the current request: its blueprint's (innermost first), else
    the app's default."""
    renderers: _Renderers = quart.current_app.extensions[_RENDERERS]
    if quart.has_request_context():
        for name in quart.request.blueprints:
            render = renderers.by_blueprint.get(name)
            if render is not None:
                return render
    return renderers.default


def to_tabby_error(exc: HTTPException) -> errors.TabbyError:
    """quart/werkzeug HTTP errors (routing, body limits, timeouts) in tabby's terms."""
    status = exc.code or 500
    if status == 404:
        return errors.NotFound(f"no route for {_method_and_path()}")
    if status == 405:
        return errors.MethodNotAllowed(f"method not allowed for {_method_and_path()}")
    if status == 413:
        return errors.PayloadTooLarge("the request body is larger than network.max_body_size")
    cls = _BY_STATUS.get(status)
    message = exc.description or exc.name
    if cls is not None:
        return cls(message)
    err = errors.TabbyError(message, code=exc.name.lower().replace(" ", "_"))
    # Statuses the tree has no class for (408, 415, ...) keep their code.
    err.status = status
    err.error_type = "invalid_request_error" if status < 500 else "server_error"
    return err


def internal_error() -> errors.TabbyError:
    """What an unexpected exception shows the client (its details stay in the log)."""
    return errors.TabbyError("internal server error", code="internal_error")


def _method_and_path() -> str:
    if quart.has_request_context():
        return f"{quart.request.method} {quart.request.path}"
    return "this request"


def error_response(exc: errors.TabbyError, *, trace: str | None = None) -> quart.Response:
    response = quart.Response(
        quart.json.dumps(error_renderer()(exc, trace)),
        status=exc.status,
        mimetype="application/json",
    )
    if (
        isinstance(exc, errors.TooManyRequests | errors.ServiceUnavailable)
        and exc.retry_after is not None
    ):
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _trace(exc: BaseException, send_tracebacks: bool) -> str | None:
    if not send_tracebacks:
        return None
    return "".join(traceback.format_exception(exc))


def install_error_handlers(
    app: quart.Quart, *, send_tracebacks: bool, default: ErrorRenderer
) -> None:
    """Map every error to its status; ``default`` renders the body unless the request's
    blueprint registered a renderer of its own."""
    app.extensions[_RENDERERS] = _Renderers(default)

    @app.errorhandler(errors.TabbyError)
    async def tabby_error(exc: errors.TabbyError) -> quart.Response:
        if isinstance(exc, errors.ServiceUnavailable):
            # No model loaded, a model switching: the server is fine, the caller may retry.
            log.warning("%s: %s", type(exc).__name__, exc.message)
        elif exc.status >= 500:
            log.error("%s: %s", type(exc).__name__, exc.message)
        return error_response(exc, trace=_trace(exc, send_tracebacks))

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> quart.Response:
        response = error_response(to_tabby_error(exc))
        valid = getattr(exc, "valid_methods", None)
        if exc.code == 405 and valid:
            response.headers["Allow"] = ", ".join(sorted(valid))
        return response

    @app.errorhandler(Exception)
    async def unexpected_error(exc: Exception) -> quart.Response:
        log.error("unexpected error", exc_info=exc)
        return error_response(internal_error(), trace=_trace(exc, send_tracebacks))
