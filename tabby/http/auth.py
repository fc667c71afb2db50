"""Auth for route modules.

Either call ``await require(Permission.API)`` at the top of a handler (it returns the
caller's permission, which list endpoints use to show more to admins), or decorate the
handler with ``@requires_api`` / ``@requires_admin``. Routes with neither are public.

401 when no key or an unknown key is presented, 403 when an API key is presented to an
admin route. The permission is also left in ``quart.g.permission``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import quart

from tabby.actors.auth import presented_keys
from tabby.errors import AuthenticationError, PermissionDenied
from tabby.http.context import current_services
from tabby.serving.permission import Permission

__all__ = ["Permission", "require", "requires_admin", "requires_api"]

P = ParamSpec("P")
R = TypeVar("R")


async def require(level: Permission) -> Permission:
    """The caller's permission if it grants ``level``; else raise 401 or 403."""
    keys = presented_keys(quart.request.headers)
    permission = await current_services().auth.check_keys(keys)
    quart.g.permission = permission
    if permission.grants(level):
        return permission
    kind = "admin key" if level is Permission.ADMIN else "API key"
    if permission is Permission.NONE:
        if not keys:
            raise AuthenticationError(
                f"Please provide an {kind} (Authorization: Bearer, X-Api-Key or X-Admin-Key)",
                code="missing_api_key",
            )
        raise AuthenticationError(f"Invalid {kind}")
    raise PermissionDenied("This route needs the admin key; an API key is not enough")


def _checked(handler: Callable[P, Awaitable[R]], level: Permission) -> Callable[P, Awaitable[R]]:
    @functools.wraps(handler)
    async def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        await require(level)
        return await handler(*args, **kwargs)

    return checked


def requires_api(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Decorator: the handler runs only for API or admin keys."""
    return _checked(handler, Permission.API)


def requires_admin(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Decorator: the handler runs only for the admin key."""
    return _checked(handler, Permission.ADMIN)
