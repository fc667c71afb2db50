"""What a handler may ask about the request it serves: the app's services and the request id.

Kept apart from :mod:`tabby.http.app` so that route modules can use it while ``app``
imports them (the app mounts the route modules; they never import the app).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import quart

if TYPE_CHECKING:
    from tabby.http.services import Services

__all__ = ["current_services", "install_services", "request_id"]

_EXTENSION = "tabby.http.services"


def install_services(app: quart.Quart, services: Services) -> None:
    """Make ``services`` what :func:`current_services` answers for ``app``'s requests."""
    app.extensions[_EXTENSION] = services


def current_services() -> Services:
    """The services of the app serving the current request."""
    services: Services = quart.current_app.extensions[_EXTENSION]
    return services


def request_id() -> str:
    """The current request's id (also its ``X-Request-Id`` header)."""
    rid: str = quart.g.request_id
    return rid
