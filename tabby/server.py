"""``tabby serve``: every actor and the HTTP server in one nursery.

Start order is dependency order: HealthMonitor, AuthStore, (the model-serving actors),
then the HTTP server last, so nothing answers requests before its handles exist. On
SIGINT/SIGTERM the server stops accepting, gives live requests ``network.shutdown_grace``
seconds, cancels them, and then the whole nursery (actors included) is cancelled. A
second signal cancels at once.
"""

from __future__ import annotations

import errno
import logging
import signal
import sys
from collections.abc import Sequence

import attrs
import quart
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from tabby.actors.auth import AuthStore
from tabby.actors.downloader import downloader_from_config
from tabby.actors.embedder import embedder_from_config
from tabby.actors.health import HealthMonitor
from tabby.actors.keyfile import KeyFile, KeyFileError
from tabby.actors.models import ModelManager, ModelManagerHandle
from tabby.backends.registry import BackendRegistry
from tabby.config import TabbyConfig
from tabby.http.app import create_app
from tabby.http.services import Services

__all__ = ["ServerInfo", "StartupError", "serve"]

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The server cannot start (e.g. the port is taken); one line for the operator."""


@attrs.frozen
class ServerInfo:
    """What :func:`serve` reports once it accepts connections."""

    urls: tuple[str, ...]
    services: Services
    created_keys: KeyFile | None  # the keys, when this start created the keys file
    auth_disabled: bool
    _shutdown: trio.Event

    def shutdown(self) -> None:
        """Begin the graceful shutdown (as SIGTERM does)."""
        self._shutdown.set()


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _hypercorn_config(config: TabbyConfig) -> HypercornConfig:
    hconfig = HypercornConfig()
    hconfig.bind = [_bind(config.network.host, config.network.port)]
    hconfig.graceful_timeout = config.network.shutdown_grace
    # hypercorn's default of 100 refuses (resets) a burst of a few hundred connections.
    hconfig.backlog = config.network.backlog
    hconfig.accesslog = None  # tabby writes its own access line (tabby.logs)
    hconfig.errorlog = logging.getLogger("hypercorn.error")
    return hconfig


async def _watch_signals(
    shutdown: trio.Event,
    cancel: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            if shutdown.is_set():
                log.warning("second signal: stopping now")
                cancel.cancel()
                return
            log.info("%s: shutting down", signal.Signals(signum).name)
            shutdown.set()


class _StartWatch:
    """Passes readiness on, remembering whether it happened."""

    def __init__(self, inner: trio.TaskStatus[list[str]]) -> None:
        self._inner = inner
        self.started_ok = False

    def started(self, value: list[str] | None = None) -> None:
        self.started_ok = True
        self._inner.started(value if value is not None else [])


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


async def _serve_http(
    app: quart.Quart,
    hconfig: HypercornConfig,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    watch = _StartWatch(task_status)
    try:
        await hypercorn_serve(app, hconfig, shutdown_trigger=shutdown.wait, task_status=watch)
    except (OSError, BaseExceptionGroup) as exc:
        bind_errors = [e for e in _leaves(exc) if isinstance(e, OSError)]
        if watch.started_ok or not bind_errors:
            raise
        where = ", ".join(hconfig.bind)
        error = bind_errors[0]
        if error.errno == errno.EADDRINUSE:
            raise StartupError(f"cannot listen on {where}: the address is already in use") from None
        raise StartupError(f"cannot listen on {where}: {error.strerror or error}") from None


def _ending_margin(grace: float) -> float:
    # Time left after the generations end for their last events and the bodies' ends to go
    # out before hypercorn cuts whatever is still open.
    return min(1.0, grace * 0.2)


async def _end_generations_in_grace(
    shutdown: trio.Event, models: ModelManagerHandle, grace: float
) -> None:
    """On shutdown, give generations most of the grace, then end them all.

    Unloading with ``skip_queue`` fails every live job with a 503, so each stream sends a
    final error event and a complete body (and a waiting request gets a 503) before the
    grace runs out, instead of being cut mid-stream.
    """
    await shutdown.wait()
    await trio.sleep(max(0.0, grace - _ending_margin(grace)))
    log.info("shutdown grace ending: stopping the generations still running")
    with trio.move_on_after(_ending_margin(grace)):
        await models.unload_model(skip_queue=True)


def announce(info: ServerInfo, keys_path: str) -> None:
    """The startup banner: URLs, auth mode and, once, freshly created keys."""
    out = sys.stdout
    for url in info.urls:
        print(f"tabby is listening on {url}", file=out)
    if info.auth_disabled:
        print("WARNING: auth is disabled (network.disable_auth): every caller is admin", file=out)
    else:
        print(f"auth: API keys required (keys file: {keys_path})", file=out)
    if info.created_keys is not None:
        print("created new keys; they are shown only this once:", file=out)
        print(f"  admin key: {info.created_keys.admin_key}", file=out)
        for key in info.created_keys.api_keys:
            print(f"  API key:   {key}", file=out)
    out.flush()


async def serve(
    config: TabbyConfig,
    *,
    handle_signals: bool = False,
    quiet: bool = False,
    extra_blueprints: Sequence[quart.Blueprint] = (),
    registry: BackendRegistry | None = None,
    task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run tabby until shutdown; reports a :class:`ServerInfo` once listening.

    ``registry`` replaces the generation backends on offer (tests and benchmarks add
    the scripted backend this way).

    Raises :class:`StartupError` when the port cannot be bound and
    :class:`tabby.actors.keyfile.KeyFileError` when the keys file is unusable.
    """
    try:
        await _serve(config, handle_signals, quiet, extra_blueprints, registry, task_status)
    except BaseExceptionGroup as group:
        # Startup failures surface as themselves, not wrapped by the nurseries.
        for leaf in _leaves(group):
            if isinstance(leaf, StartupError | KeyFileError):
                raise leaf from None
        raise


async def _serve(
    config: TabbyConfig,
    handle_signals: bool,
    quiet: bool,
    extra_blueprints: Sequence[quart.Blueprint],
    registry: BackendRegistry | None,
    task_status: trio.TaskStatus[ServerInfo],
) -> None:
    shutdown = trio.Event()
    keys_path = config.resolve(config.network.api_tokens_file)
    async with trio.open_nursery() as nursery:
        if handle_signals:
            await nursery.start(_watch_signals, shutdown, nursery.cancel_scope)

        health_monitor = HealthMonitor()
        health = await nursery.start(health_monitor.run)
        if config.network.disable_auth:
            log.warning("auth is disabled: every caller is admin")
        auth_store = AuthStore(None if config.network.disable_auth else keys_path, health)
        auth = await nursery.start(auth_store.run)

        # The embedder loads first: transformers' first import is not thread-safe, and
        # the reference engine's load would otherwise race it.
        embedder = await nursery.start(embedder_from_config(config, health).run)
        downloader = await nursery.start(downloader_from_config(config).run)
        # The model manager starts each loaded model's scheduler itself, and reports
        # ready once the startup model is loaded.
        models = await nursery.start(ModelManager(config, health=health, registry=registry).run)

        services = Services(
            config=config,
            auth=auth,
            health=health,
            models=models,
            embedder=embedder,
            downloader=downloader,
        )
        app = create_app(services, extra_blueprints=extra_blueprints)
        hconfig = _hypercorn_config(config)

        async def http(
            *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
        ) -> None:
            await _serve_http(app, hconfig, shutdown, task_status=task_status)
            nursery.cancel_scope.cancel()  # the server is done: stop the actors too

        urls = await nursery.start(http)
        grace = config.network.shutdown_grace
        nursery.start_soon(_end_generations_in_grace, shutdown, models, grace)
        info = ServerInfo(
            urls=tuple(urls),
            services=services,
            created_keys=auth_store.created_keys,
            auth_disabled=auth_store.auth_disabled,
            shutdown=shutdown,
        )
        if not quiet:
            announce(info, str(keys_path))
        task_status.started(info)
