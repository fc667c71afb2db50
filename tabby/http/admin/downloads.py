"""Hub download routes (admin): start, list and cancel downloads.

``POST /v1/download`` answers ``{"download_path": ...}`` when the download is complete,
or, with ``"stream": true``, an SSE stream: one ``download.started`` event, then
``download.progress`` events (bytes done / total, overall and per file), then one
``download.done`` event with the path (or an error event). Errors found before any byte
is fetched (bad folder name, existing folder, gated repo, missing revision) are plain
JSON errors with their status, streaming or not. A client that leaves cancels its
download, which leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

import attrs
import quart
import trio

from tabby.actors.downloader import (
    DownloadDone,
    DownloadEvent,
    DownloadFailed,
    DownloadProgress,
    DownloadStarted,
)
from tabby.actors.hub import DownloadSpec
from tabby.errors import NotImplementedFeature, ServiceUnavailable
from tabby.http.auth import Permission, require
from tabby.http.body import parse_body
from tabby.http.services import Services
from tabby.http.sse import SSEItem, sse_response

if TYPE_CHECKING:
    from tabby.actors.downloader import DownloaderHandle

__all__ = ["CancelRequest", "DownloadRequest", "blueprint", "event_json"]


def _globs(value: str | list[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@attrs.frozen
class DownloadRequest:
    repo_id: str = attrs.field(metadata={"doc": "Hub repo, e.g. org/name."})
    revision: str = attrs.field(default="main", metadata={"doc": "Branch, tag or commit."})
    include: str | list[str] = attrs.field(
        factory=lambda: ["*"], metadata={"doc": "Globs to fetch."}
    )
    exclude: str | list[str] = attrs.field(factory=list, metadata={"doc": "Globs to skip."})
    token: str | None = attrs.field(
        default=None, repr=False, metadata={"doc": "Hub token for gated or private repos."}
    )
    folder_name: str | None = attrs.field(
        default=None, metadata={"doc": "Target folder name; the repo name when absent."}
    )
    repo_type: Literal["model", "lora"] = attrs.field(
        default="model", metadata={"doc": "model: into model_dir; lora: into lora_dir."}
    )
    endpoint: str | None = attrs.field(
        default=None, metadata={"doc": "Hub URL (mirrors); else HF_ENDPOINT or huggingface.co."}
    )
    overwrite: bool = attrs.field(default=False, metadata={"doc": "Replace an existing folder."})
    stream: bool = attrs.field(default=False, metadata={"doc": "Stream SSE progress events."})

    def spec(self) -> DownloadSpec:
        return DownloadSpec(
            repo_id=self.repo_id,
            revision=self.revision,
            include=_globs(self.include),
            exclude=_globs(self.exclude),
            token=self.token or None,
            folder_name=self.folder_name or None,
            repo_type=self.repo_type,
            endpoint=self.endpoint or None,
            overwrite=self.overwrite,
        )


@attrs.frozen
class CancelRequest:
    id: str = attrs.field(metadata={"aliases": ("download_id",), "doc": "The download's id."})


def event_json(event: DownloadEvent) -> dict[str, Any]:
    """The SSE payload of one download event (errors are raised, not encoded here)."""
    if isinstance(event, DownloadStarted):
        return {
            "object": "download.started",
            **event.info.to_json(),
            "files": list(event.files),
        }
    if isinstance(event, DownloadProgress):
        p = event.progress
        return {
            "object": "download.progress",
            "download_id": event.download_id,
            "done_bytes": p.done_bytes,
            "total_bytes": p.total_bytes,
            "files": [{"path": f.path, "done": f.done, "total": f.total} for f in p.files],
        }
    if isinstance(event, DownloadDone):
        return {
            "object": "download.done",
            "download_id": event.download_id,
            "download_path": str(event.path),
        }
    raise event.error


async def _next(events: trio.MemoryReceiveChannel[DownloadEvent]) -> DownloadEvent:
    try:
        return await events.receive()
    except trio.EndOfChannel:
        raise ServiceUnavailable("the downloader stopped", code="downloader_stopped") from None


def blueprint(services: Services) -> quart.Blueprint:
    bp = quart.Blueprint("downloads", __name__)

    def downloader() -> DownloaderHandle:
        handle: DownloaderHandle | None = services.downloader
        if handle is None:
            raise NotImplementedFeature("downloads are not enabled on this server")
        return handle

    @bp.post("/v1/download")
    async def download() -> Any:
        await require(Permission.ADMIN)
        body = await parse_body(DownloadRequest)
        handle = downloader()
        events = await handle.download(body.spec())
        try:
            first = await _next(events)
            if isinstance(first, DownloadFailed):
                raise first.error
            if not isinstance(first, DownloadStarted):
                raise ServiceUnavailable(f"unexpected first download event {type(first).__name__}")
        except BaseException:
            events.close()
            raise
        download_id = first.info.download_id
        if body.stream:
            return sse_response(_stream(handle, download_id, first, events))
        with events:
            try:
                while True:
                    event = await _next(events)
                    if isinstance(event, DownloadDone):
                        return {"download_path": str(event.path), "download_id": download_id}
                    if isinstance(event, DownloadFailed):
                        raise event.error
            finally:
                handle.cancel_nowait(download_id)  # a no-op once it finished

    @bp.get("/v1/downloads")
    async def listing() -> dict[str, Any]:
        await require(Permission.ADMIN)
        infos = await downloader().list()
        return {"object": "list", "data": [info.to_json() for info in infos]}

    @bp.delete("/v1/downloads/<download_id>")
    async def cancel(download_id: str) -> dict[str, Any]:
        await require(Permission.ADMIN)
        await downloader().cancel(download_id)
        return {"download_id": download_id, "status": "cancelled"}

    @bp.post("/v1/download/cancel")
    async def cancel_by_body() -> dict[str, Any]:
        await require(Permission.ADMIN)
        body = await parse_body(CancelRequest)
        await downloader().cancel(body.id)
        return {"download_id": body.id, "status": "cancelled"}

    return bp


async def _stream(
    handle: DownloaderHandle,
    download_id: str,
    first: DownloadEvent,
    events: trio.MemoryReceiveChannel[DownloadEvent],
) -> AsyncIterator[SSEItem]:
    with events:
        try:
            yield event_json(first)
            async for event in events:
                yield event_json(event)
                if isinstance(event, DownloadDone):
                    return
            raise ServiceUnavailable("the downloader stopped", code="downloader_stopped")
        finally:
            handle.cancel_nowait(download_id)
