"""What a caller may do: the one value the auth actor, the serving core and HTTP share.

It lives in the lowest layer that needs it (the serving core asks for it when a request's
``model`` field would load a model), so the layers above import it downward.
"""

from __future__ import annotations

import enum

__all__ = ["Permission"]


class Permission(enum.Enum):
    NONE = "none"
    API = "api"
    ADMIN = "admin"

    def grants(self, required: Permission) -> bool:
        return _RANK[self] >= _RANK[required]


_RANK = {Permission.NONE: 0, Permission.API: 1, Permission.ADMIN: 2}
