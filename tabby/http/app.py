"""The quart-trio app factory.

``create_app(services)`` builds the app from the actor handles; nothing global. Every
request gets an id (``quart.g.request_id``, returned as ``X-Request-Id``), an access log
line, CORS headers for the configured origins, and errors in the one JSON format of
``tabby.http.errors`` (OpenAI's shape unless a blueprint registered its own). The
access line's duration runs to the start of the response (for a stream: until its
headers go out).

Route families live in ``tabby/http/<family>.py`` (or a package), each exposing
``blueprint(services) -> quart.Blueprint`` and, for the OpenAPI document, ``ROUTES``;
:data:`FAMILIES` imports them and says which are mounted. A new protocol is one more
entry there.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import attrs
import quart
from quart_trio import QuartTrio

from tabby.http import core, embeddings
from tabby.http.admin import downloads as admin_downloads
from tabby.http.admin import routes as admin_routes
from tabby.http.client_limit import PerClientLimit
from tabby.http.context import current_services, install_services, request_id
from tabby.http.errors import install_error_handlers
from tabby.http.keepalive import SSEKeepAlive
from tabby.http.kobold import routes as kobold_routes
from tabby.http.openai import routes as openai_routes
from tabby.http.openai.errors import error_body
from tabby.http.openapi import Route, declare_routes
from tabby.http.unread_body import CloseUnreadBodies
from tabby.logs import ACCESS_LOGGER, access_line, redact_body, redact_headers

if TYPE_CHECKING:
    from tabby.config import TabbyConfig
    from tabby.http.services import Services

__all__ = [
    "FAMILIES",
    "ROUTE_MODULES",
    "RouteFamily",
    "create_app",
    "current_services",
    "declared_routes",
    "request_id",
]

log = logging.getLogger(__name__)
access_log = logging.getLogger(ACCESS_LOGGER)

_CORS_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
_CORS_MAX_AGE = "600"


def _always(_config: TabbyConfig) -> bool:
    return True


def _openai(config: TabbyConfig) -> bool:
    return "OAI" in config.network.api_servers


def _kobold(config: TabbyConfig) -> bool:
    return "Kobold" in config.network.api_servers


@attrs.frozen
class RouteFamily:
    """One route module: its blueprint factory, its documented routes, when it is mounted."""

    module: str  # the module's name, for logs and tests
    blueprint: Callable[[Services], quart.Blueprint]
    routes: tuple[Route, ...] = ()
    wanted: Callable[[TabbyConfig], bool] = _always


FAMILIES: tuple[RouteFamily, ...] = (
    RouteFamily(core.__name__, core.blueprint),
    RouteFamily(admin_routes.__name__, admin_routes.blueprint, admin_routes.ROUTES),
    RouteFamily(openai_routes.__name__, openai_routes.blueprint, openai_routes.ROUTES, _openai),
    RouteFamily(kobold_routes.__name__, kobold_routes.blueprint, kobold_routes.ROUTES, _kobold),
    RouteFamily(embeddings.__name__, embeddings.blueprint),
    RouteFamily(admin_downloads.__name__, admin_downloads.blueprint),
)
# (module name, mounted when) of each family.
ROUTE_MODULES: tuple[tuple[str, Callable[[TabbyConfig], bool]], ...] = tuple(
    (family.module, family.wanted) for family in FAMILIES
)


def declared_routes(config: TabbyConfig) -> list[Route]:
    """The documented routes of the families ``config`` mounts."""
    return [route for family in FAMILIES if family.wanted(config) for route in family.routes]


def create_app(
    services: Services, *, extra_blueprints: Sequence[quart.Blueprint] = ()
) -> QuartTrio:
    """The app for ``services``; ``extra_blueprints`` are mounted after the families."""
    config = services.config
    app = QuartTrio("tabby")
    install_services(app, services)
    # Streams must never be cut by a total-response timeout; disconnects cancel them.
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["MAX_CONTENT_LENGTH"] = config.network.max_body_size
    app.json.sort_keys = False  # type: ignore[attr-defined]
    install_error_handlers(
        app, send_tracebacks=config.network.send_tracebacks, default=error_body
    )
    _install_request_hooks(app, config)
    for family in FAMILIES:
        if family.wanted(config):
            app.register_blueprint(family.blueprint(services))
    declare_routes(app, declared_routes(config))
    for extra in extra_blueprints:
        app.register_blueprint(extra)
    app.asgi_app = PerClientLimit(  # type: ignore[method-assign]
        SSEKeepAlive(CloseUnreadBodies(app.asgi_app), config.network.sse_ping_interval),
        config.network.max_requests_per_client,
        error_body,
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
