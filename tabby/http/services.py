"""The handles of the running actors, passed to the HTTP app (no globals).

``tabby.server.serve`` builds one :class:`Services` after starting the actors and gives
it to ``tabby.http.app.create_app``; route modules receive it in ``blueprint(services)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from tabby.actors.auth import AuthHandle
    from tabby.actors.health import HealthHandle
    from tabby.config import TabbyConfig

__all__ = ["Services"]


@attrs.frozen
class Services:
    config: TabbyConfig
    auth: AuthHandle
    health: HealthHandle
    # Handles of the actors that later parts add; None while a part is not running.
    models: Any = None
    scheduler: Any = None
    embedder: Any = None
    downloader: Any = None
