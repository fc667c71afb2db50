"""Downloader: the one owner of running hub downloads.

A ``Download`` carries its own reply channel. Its stream is: one :class:`DownloadStarted`
(after the repo was listed and the request checked) or one :class:`DownloadFailed`; then
any number of :class:`DownloadProgress`; then exactly one :class:`DownloadDone` or
:class:`DownloadFailed`; then the channel closes. Progress is sent with ``send_nowait``
and skipped when the consumer is behind (each event carries running totals, so nothing is
lost). A consumer that closes its end cancels its download, as does ``CancelDownload``.
"""

from __future__ import annotations

import logging
import uuid
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import attrs
import trio

from tabby.actors.hub import (
    DownloadSpec,
    Progress,
    RepoListing,
    destination,
    fetch_listing,
    resolve_endpoint,
    run_download,
)
from tabby.actors.mailbox import Mailbox, Reply, answer
from tabby.errors import Conflict, NotFound, RequestCancelled, TabbyError

if TYPE_CHECKING:
    from tabby.config import TabbyConfig

__all__ = [
    "CancelDownload",
    "Download",
    "DownloadDone",
    "DownloadEvent",
    "DownloadFailed",
    "DownloadInfo",
    "DownloadProgress",
    "DownloadStarted",
    "Downloader",
    "DownloaderHandle",
    "DownloaderStats",
    "GetDownloaderStats",
    "ListDownloads",
    "downloader_from_config",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Commands are tiny and handled at once; a small bound still refuses a flood.
INBOX_BUFFER = 16
# Progress items a slow consumer may have pending before newer ones are skipped.
EVENT_BUFFER = 32


# -- messages ---------------------------------------------------------------------------


@attrs.frozen
class Download:
    spec: DownloadSpec
    reply: trio.MemorySendChannel[DownloadEvent]


@attrs.frozen
class CancelDownload:
    """Cancel a running download; ``reply`` gets NotFound when none has that id."""

    download_id: str
    reply: Reply[None] | None = None


@attrs.frozen
class ListDownloads:
    reply: Reply[tuple[DownloadInfo, ...]]


@attrs.frozen
class GetDownloaderStats:
    reply: Reply[DownloaderStats]


# -- events and replies -----------------------------------------------------------------


@attrs.frozen
class DownloadInfo:
    """What ``GET /v1/downloads`` shows; never the token."""

    download_id: str
    repo_id: str
    revision: str
    repo_type: str
    folder: str
    state: str  # "listing" | "downloading"
    done_bytes: int = 0
    total_bytes: int = 0

    def to_json(self) -> dict[str, object]:
        return attrs.asdict(self)


@attrs.frozen
class DownloadStarted:
    info: DownloadInfo
    files: tuple[str, ...]


@attrs.frozen
class DownloadProgress:
    download_id: str
    progress: Progress


@attrs.frozen
class DownloadDone:
    download_id: str
    path: Path


@attrs.frozen
class DownloadFailed:
    download_id: str
    error: TabbyError


DownloadEvent = DownloadStarted | DownloadProgress | DownloadDone | DownloadFailed
DownloaderMessage = Download | CancelDownload | ListDownloads | GetDownloaderStats


@attrs.frozen
class DownloaderStats:
    running: int
    started: int
    completed: int
    failed: int  # refused, failed or cancelled
    bytes_downloaded: int  # by the running downloads so far


# -- handle -----------------------------------------------------------------------------


@attrs.frozen
class DownloaderHandle:
    _mailbox: Mailbox[DownloaderMessage]

    async def download(self, spec: DownloadSpec) -> trio.MemoryReceiveChannel[DownloadEvent]:
        """Start a download; the caller owns (and must close) the returned stream."""
        event_send, event_receive = trio.open_memory_channel[DownloadEvent](EVENT_BUFFER)
        try:
            await self._mailbox.post(Download(spec, event_send))
        except BaseException:
            event_receive.close()
            raise
        return event_receive

    async def cancel(self, download_id: str) -> None:
        """Cancel a running download; :class:`NotFound` when there is none with that id."""
        await self._mailbox.ask(partial(CancelDownload, download_id))

    def cancel_nowait(self, download_id: str) -> None:
        """Best-effort cancel for cleanup paths (a handler being cancelled itself)."""
        if not self._mailbox.try_post(CancelDownload(download_id)):
            log.debug("could not post cancel for %s", download_id)

    async def list(self) -> tuple[DownloadInfo, ...]:
        return await self._mailbox.ask(ListDownloads)

    async def statistics(self) -> DownloaderStats:
        return await self._mailbox.ask(GetDownloaderStats)


# -- actor ------------------------------------------------------------------------------


@attrs.define
class _Running:
    info: DownloadInfo
    scope: trio.CancelScope


class Downloader:
    """Runs downloads in its own nursery; ``model_dir``/``lora_dir`` are the targets."""

    def __init__(self, *, model_dir: Path, lora_dir: Path, endpoint: str | None = None) -> None:
        self._roots = {"model": model_dir, "lora": lora_dir}
        self._endpoint = endpoint
        self._running: dict[str, _Running] = {}
        self._started = self._completed = self._failed = 0
        self._inbox_send, self._inbox_receive = trio.open_memory_channel[DownloaderMessage](
            INBOX_BUFFER
        )

    @property
    def handle(self) -> DownloaderHandle:
        return DownloaderHandle(Mailbox(self._inbox_send, "downloader"))

    def statistics(self) -> DownloaderStats:
        return DownloaderStats(
            running=len(self._running),
            started=self._started,
            completed=self._completed,
            failed=self._failed,
            bytes_downloaded=sum(r.info.done_bytes for r in self._running.values()),
        )

    async def run(
        self, *, task_status: trio.TaskStatus[DownloaderHandle] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with self._inbox_receive, trio.open_nursery() as nursery:
            task_status.started(self.handle)
            async for message in self._inbox_receive:
                if isinstance(message, Download):
                    self._start(message, nursery)
                elif isinstance(message, CancelDownload):
                    self._cancel(message)
                elif isinstance(message, ListDownloads):
                    answer(message.reply, tuple(r.info for r in self._running.values()))
                else:
                    answer(message.reply, self.statistics())

    def _cancel(self, message: CancelDownload) -> None:
        running = self._running.get(message.download_id)
        if running is not None:
            running.scope.cancel()
        if message.reply is None:
            return
        if running is None:
            missing = NotFound(f"no running download with id {message.download_id!r}", param="id")
            answer(message.reply, error=missing)
        else:
            answer(message.reply)

    def _start(self, message: Download, nursery: trio.Nursery) -> None:
        spec = message.spec
        download_id = uuid.uuid4().hex
        info = DownloadInfo(
            download_id, spec.repo_id, spec.revision, spec.repo_type, spec.folder(), "listing"
        )
        try:
            final = destination(spec, self._roots[spec.repo_type])
            if any(self._final_of(r.info) == final for r in self._running.values()):
                raise Conflict(f"{final.name} is being downloaded already", param="folder_name")
            # Checked again before the final move; here it spares listing the repo.
            if final.exists() and not spec.overwrite:
                raise Conflict(
                    f"{final.name} already exists (overwrite replaces it)", param="folder_name"
                )
        except TabbyError as error:
            self._failed += 1
            _reply(message.reply, DownloadFailed(download_id, error))
            return
        self._started += 1
        self._running[download_id] = _Running(info, trio.CancelScope())
        nursery.start_soon(self._download, download_id, spec, message.reply)

    def _final_of(self, info: DownloadInfo) -> Path:
        return (self._roots[info.repo_type] / info.folder).resolve()

    async def _download(
        self, download_id: str, spec: DownloadSpec, reply: trio.MemorySendChannel[DownloadEvent]
    ) -> None:
        running = self._running[download_id]
        outcome: DownloadEvent | None = None
        try:
            with running.scope:
                outcome = await self._fetch(download_id, spec, reply)
            if running.scope.cancelled_caught:
                outcome = DownloadFailed(
                    download_id, RequestCancelled(f"download {download_id} was cancelled")
                )
        finally:
            del self._running[download_id]
            if isinstance(outcome, DownloadDone):
                self._completed += 1
            else:
                self._failed += 1
            if outcome is not None:
                _reply(reply, outcome)
            else:
                reply.close()

    async def _fetch(
        self, download_id: str, spec: DownloadSpec, reply: trio.MemorySendChannel[DownloadEvent]
    ) -> DownloadEvent:
        running = self._running[download_id]
        root = self._roots[spec.repo_type]
        endpoint = resolve_endpoint(spec, self._endpoint)
        try:
            # Listing is a short blocking call with no side effects: safe to abandon.
            listing: RepoListing = await trio.to_thread.run_sync(
                fetch_listing, spec, endpoint, abandon_on_cancel=True
            )
            running.info = attrs.evolve(
                running.info, state="downloading", total_bytes=listing.total_bytes
            )
            await reply.send(DownloadStarted(running.info, tuple(f.path for f in listing.files)))

            def on_progress(progress: Progress) -> None:
                running.info = attrs.evolve(
                    running.info, done_bytes=progress.done_bytes, total_bytes=progress.total_bytes
                )
                # One slot stays free for the final event, which must not be skipped.
                stats = reply.statistics()
                if stats.open_receive_channels == 0:
                    running.scope.cancel()  # the consumer left: stop and clean up
                    return
                if stats.current_buffer_used >= EVENT_BUFFER - 1:
                    return
                try:
                    reply.send_nowait(DownloadProgress(download_id, progress))
                except trio.WouldBlock:
                    pass  # the consumer is behind; the next event carries the totals
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    running.scope.cancel()  # the consumer left: stop and clean up

            path = await run_download(spec, root, listing, endpoint, on_progress)
        except TabbyError as error:
            log.warning("download %s of %s failed: %s", download_id, spec.repo_id, error.message)
            return DownloadFailed(download_id, error)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            running.scope.cancel()
            return DownloadFailed(download_id, RequestCancelled("the client went away"))
        except Exception as exc:  # disk full, permissions...: fail this download only
            log.exception("download %s of %s failed", download_id, spec.repo_id)
            failure = TabbyError(
                f"download failed: {type(exc).__name__}: {exc}", code="download_failed"
            )
            return DownloadFailed(download_id, failure)
        log.info("downloaded %s to %s", spec.repo_id, path)
        return DownloadDone(download_id, path)


def downloader_from_config(config: TabbyConfig) -> Downloader:
    """The Downloader for ``config``: models into ``model_dir``, LoRAs into ``lora_dir``."""
    return Downloader(
        model_dir=config.resolve(config.model.model_dir),
        lora_dir=config.resolve(config.lora.lora_dir),
    )


def _reply(channel: trio.MemorySendChannel[T], value: T) -> None:
    """Send a final value and close; a consumer that left or lags past the buffer loses it."""
    with channel:
        try:
            channel.send_nowait(value)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("reply dropped: consumer gone")
