"""The one place where errors become HTTP responses.

Every error path answers ``{"error": {"message", "type", "param", "code"}}`` with the
status that the :class:`~tabby.errors.TabbyError` class carries: errors raised by
handlers, quart's own HTTP errors (unknown route, wrong method, body too large) and
unexpected exceptions (500, logged with their traceback). A traceback reaches the client
only as ``error.trace`` and only with ``network.send_tracebacks``.
"""

from __future__ import annotations

import logging
import math
import traceback
from typing import Any

import quart
from werkzeug.exceptions import HTTPException

from tabby import errors

__all__ = [
    "error_body",
    "error_response",
    "install_error_handlers",
    "to_tabby_error",
]

log = logging.getLogger(__name__)

_BY_STATUS: dict[int, type[errors.TabbyError]] = {
    400: errors.InvalidRequest,
    401: errors.AuthenticationError,
    403: errors.PermissionDenied,
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    409: errors.Conflict,
    413: errors.PayloadTooLarge,
    422: errors.Unprocessable,
    429: errors.TooManyRequests,
    501: errors.NotImplementedFeature,
    503: errors.ServiceUnavailable,
}


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


def _method_and_path() -> str:
    if quart.has_request_context():
        return f"{quart.request.method} {quart.request.path}"
    return "this request"


def error_body(exc: errors.TabbyError, *, trace: str | None = None) -> dict[str, Any]:
    body = exc.to_dict()
    if trace is not None:
        body["error"]["trace"] = trace  # type: ignore[index]
    return body


def error_response(exc: errors.TabbyError, *, trace: str | None = None) -> quart.Response:
    response = quart.Response(
        quart.json.dumps(error_body(exc, trace=trace)),
        status=exc.status,
        mimetype="application/json",
    )
    if isinstance(exc, errors.TooManyRequests):
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _trace(exc: BaseException, send_tracebacks: bool) -> str | None:
    if not send_tracebacks:
        return None
    return "".join(traceback.format_exception(exc))


def install_error_handlers(app: quart.Quart, *, send_tracebacks: bool) -> None:
    @app.errorhandler(errors.TabbyError)
    async def tabby_error(exc: errors.TabbyError) -> quart.Response:
        if exc.status >= 500:
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
        err = errors.TabbyError("internal server error", code="internal_error")
        return error_response(err, trace=_trace(exc, send_tracebacks))
