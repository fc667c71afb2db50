"""The quart-trio app factory.

``create_app(services)`` builds the app from the actor handles; nothing global. Every
request gets an id (``quart.g.request_id``, returned as ``X-Request-Id``), an access log
line, CORS headers for the configured origins, and errors in the one JSON format of
``tabby.http.errors``. The access line's duration runs to the start of the response
(for a stream: until its headers go out).

Route families live in ``tabby/http/<family>.py``, each exposing
``blueprint(services) -> quart.Blueprint``; :data:`ROUTE_MODULES` says which are mounted.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import quart
from quart_trio import QuartTrio

from tabby.http.errors import install_error_handlers
from tabby.http.keepalive import SSEKeepAlive
from tabby.logs import ACCESS_LOGGER, access_line, redact_body, redact_headers

if TYPE_CHECKING:
    from tabby.config import TabbyConfig
    from tabby.http.services import Services

__all__ = ["ROUTE_MODULES", "create_app", "current_services", "request_id"]

log = logging.getLogger(__name__)
access_log = logging.getLogger(ACCESS_LOGGER)

_EXTENSION = "tabby.http.services"
_CORS_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
_CORS_MAX_AGE = "600"


def _always(_config: TabbyConfig) -> bool:
    return True


def _openai(config: TabbyConfig) -> bool:
    return "OAI" in config.network.api_servers


# (module, mounted when): add a family here; its module exposes `blueprint(services)`.
ROUTE_MODULES: tuple[tuple[str, Callable[[TabbyConfig], bool]], ...] = (
    ("tabby.http.core", _always),
    ("tabby.http.admin.routes", _always),
    ("tabby.http.openai.routes", _openai),
    ("tabby.http.kobold.routes", lambda config: "Kobold" in config.network.api_servers),
    ("tabby.http.embeddings", _always),
    ("tabby.http.admin.downloads", _always),
)


def current_services() -> Services:
    """The services of the app serving the current request."""
    services: Services = quart.current_app.extensions[_EXTENSION]
    return services


def request_id() -> str:
    rid: str = quart.g.request_id
    return rid


def create_app(
    services: Services, *, extra_blueprints: Sequence[quart.Blueprint] = ()
) -> QuartTrio:
    """The app for ``services``; ``extra_blueprints`` are mounted after the families."""
    config = services.config
    app = QuartTrio("tabby")
    app.extensions[_EXTENSION] = services
    # Streams must never be cut by a total-response timeout; disconnects cancel them.
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["MAX_CONTENT_LENGTH"] = config.network.max_body_size
    app.json.sort_keys = False  # type: ignore[attr-defined]
    install_error_handlers(app, send_tracebacks=config.network.send_tracebacks)
    _install_request_hooks(app, config)
    for module_name, wanted in ROUTE_MODULES:
        if wanted(config):
            module = importlib.import_module(module_name)
            app.register_blueprint(module.blueprint(services))
    for extra in extra_blueprints:
        app.register_blueprint(extra)
    app.asgi_app = SSEKeepAlive(  # type: ignore[method-assign]
        app.asgi_app, config.network.sse_ping_interval
    )
    return app


def _install_request_hooks(app: QuartTrio, config: TabbyConfig) -> None:
    origins = tuple(config.network.cors_origins)
    log_requests = config.logging.log_requests

    @app.before_request
    async def start_request() -> quart.Response | None:
        quart.g.request_id = uuid.uuid4().hex
        quart.g.started = time.perf_counter()
        if log_requests:
            await _log_request()
        request = quart.request
        if (
            request.method == "OPTIONS"
            and "Access-Control-Request-Method" in request.headers
            and _allowed_origin(origins) is not None
        ):
            return _preflight(request)
        return None

    @app.after_request
    async def finish_request(response: quart.Response) -> quart.Response:
        if quart.request.method == "OPTIONS" and response.status_code == 200:
            # quart's automatic OPTIONS answer is an empty text/html page: keep its
            # Allow header, send no body.
            allow = response.headers.get("Allow")
            response = quart.Response("", status=204)
            del response.headers["Content-Type"]
            if allow is not None:
                response.headers["Allow"] = allow
        rid = getattr(quart.g, "request_id", None) or uuid.uuid4().hex
        response.headers["X-Request-Id"] = rid
        allowed = _allowed_origin(origins)
        if allowed is not None:
            response.headers["Access-Control-Allow-Origin"] = allowed
            response.headers["Access-Control-Expose-Headers"] = "X-Request-Id, Retry-After"
            if allowed != "*":
                response.vary.add("Origin")
        started = getattr(quart.g, "started", None)
        duration_ms = (time.perf_counter() - started) * 1000 if started is not None else 0.0
        request = quart.request
        access_log.info(
            access_line(request.method, request.path, response.status_code, duration_ms, rid)
        )
        return response


def _allowed_origin(origins: tuple[str, ...]) -> str | None:
    """The Access-Control-Allow-Origin value for this request, None when not allowed."""
    origin = quart.request.headers.get("Origin")
    if origin is None or not origins:
        return None
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


def _preflight(request: quart.Request) -> quart.Response:
    response = quart.Response("", status=204)
    response.headers["Access-Control-Allow-Methods"] = _CORS_METHODS
    response.headers["Access-Control-Allow-Headers"] = request.headers.get(
        "Access-Control-Request-Headers", "*"
    )
    response.headers["Access-Control-Max-Age"] = _CORS_MAX_AGE
    return response


async def _log_request() -> None:
    request = quart.request
    headers = redact_headers(request.headers.items())
    body: object = None
    if request.mimetype == "application/json":
        raw = await request.get_data(as_text=True)
        try:
            body = redact_body(json.loads(raw)) if raw else None
        except (ValueError, RecursionError):
            body = "<invalid JSON>"
    access_log.info(
        "request %s %s id=%s headers=%s body=%s",
        request.method,
        request.path,
        quart.g.request_id,
        headers,
        json.dumps(body)[:4000],
    )
