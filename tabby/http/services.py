"""The handles of the running actors, passed to the HTTP app (no globals).

``tabby.server.serve`` builds one :class:`Services` after starting the actors and gives
it to ``tabby.http.app.create_app``; route modules receive it in ``blueprint(services)``.
A generation goes to the scheduler of its model, which the model's serving state names
(``services.models.serving_state().scheduler``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from tabby.actors.auth import AuthHandle
    from tabby.actors.downloader import DownloaderHandle
    from tabby.actors.embedder import EmbedderHandle
    from tabby.actors.health import HealthHandle
    from tabby.actors.models import ModelManagerHandle
    from tabby.config import TabbyConfig

__all__ = ["Services"]


@attrs.frozen
class Services:
    config: TabbyConfig
    auth: AuthHandle
    health: HealthHandle
    # None where an app is built without that actor (tests of one route family).
    models: ModelManagerHandle | None = None
    embedder: EmbedderHandle | None = None
    downloader: DownloaderHandle | None = None
