"""A small Hugging Face hub stand-in for download tests, served on 127.0.0.1:0.

It speaks the part of the hub protocol that ``huggingface_hub`` 0.36 and tabby's
downloader use:

* ``GET /api/models/{repo}/revision/{rev}``: commit sha and ``siblings`` (with sizes and
  LFS sha256 when ``blobs=true``);
* ``GET /api/models/{repo}/tree/{rev}``: the recursive file list (newer hub clients);
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: the bytes, with ``Range`` support.

Repos are declared with :class:`FakeRepo`; behaviour switches (a gated repo, a connection
that drops mid-file, a slow file) are fields on the repo, so each test states its scenario.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import attrs
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

__all__ = ["FakeHub", "FakeRepo", "running_hub"]

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 4096


@attrs.define
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    revisions: tuple[str, ...] = ("main",)
    token: str | None = None  # gated: this bearer token is required
    drop_after: int | None = None  # bytes sent before the connection is cut
    drops_left: int = 0  # how many GETs are cut (then the file is served whole)
    slow_file: str | None = None  # this file trickles, for cancellation tests
    requests: list[str] = attrs.Factory(list)  # "METHOD path [auth]" for assertions


@attrs.define
class FakeHub:
    repos: dict[str, FakeRepo] = attrs.Factory(dict)
    url: str = ""

    def add(self, repo: FakeRepo) -> FakeRepo:
        self.repos[repo.repo_id] = repo
        return repo


def _error(status: int, code: str, message: str) -> Response:
    resp = Response(message, status=status)
    resp.headers["X-Error-Code"] = code
    resp.headers["X-Error-Message"] = message
    return resp


def _authorized(repo: FakeRepo) -> bool:
    return repo.token is None or request.headers.get("Authorization") == f"Bearer {repo.token}"


def _lookup(hub: FakeHub, org: str, name: str, revision: str) -> FakeRepo | Response:
    repo = hub.repos.get(f"{org}/{name}")
    if repo is None:
        return _error(401, "RepoNotFound", "Repository not found")
    repo.requests.append(
        f"{request.method} {request.path} {request.headers.get('Authorization', '-')}"
    )
    if not _authorized(repo):
        return _error(401, "GatedRepo", "Access to this gated repository is restricted.")
    if revision not in repo.revisions and revision != COMMIT:
        return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
    return repo


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_app(hub: FakeHub) -> QuartTrio:
    app = QuartTrio(__name__)

    @app.get("/api/models/<org>/<name>/revision/<path:revision>")
    async def revision_info(org: str, name: str, revision: str) -> Any:
        found = _lookup(hub, org, name, revision)
        if isinstance(found, Response):
            return found
        blobs = request.args.get("blobs") == "True" or request.args.get("blobs") == "true"
        siblings: list[dict[str, Any]] = []
        for path, data in found.files.items():
            entry: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry["size"] = len(data)
                entry["blobId"] = hashlib.sha1(data).hexdigest()
                entry["lfs"] = {"size": len(data), "sha256": _etag(data), "pointerSize": 134}
            siblings.append(entry)
        return {"id": found.repo_id, "sha": COMMIT, "siblings": siblings, "private": False}

    @app.get("/api/models/<org>/<name>/tree/<path:revision>")
    async def tree(org: str, name: str, revision: str) -> Any:
        found = _lookup(hub, org, name, revision)
        if isinstance(found, Response):
            return found
        return [
            {"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
            for p, d in found.files.items()
        ]

    @app.route("/<org>/<name>/resolve/<revision>/<path:path>", methods=["GET", "HEAD"])
    async def resolve(org: str, name: str, revision: str, path: str) -> Any:
        found = _lookup(hub, org, name, revision)
        if isinstance(found, Response):
            return found
        data = found.files.get(path)
        if data is None:
            return _error(404, "EntryNotFound", f"{path} does not exist")
        start = 0
        range_header = request.headers.get("Range", "")
        if range_header.startswith("bytes="):
            start = int(range_header.removeprefix("bytes=").split("-")[0])
        body = data[start:]
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_etag(data)}"'}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        status = 206 if start else 200
        if request.method == "HEAD":
            resp = Response(b"", status=status, headers=headers)
            resp.headers["Content-Length"] = str(len(body))  # set after the (empty) body
            return resp
        cut = None
        if found.drop_after is not None and found.drops_left > 0:
            found.drops_left -= 1
            cut = found.drop_after
        resp = Response(
            _stream(body, cut, slow=path == found.slow_file), status=status, headers=headers
        )
        resp.headers["Content-Length"] = str(len(body))
        resp.timeout = None
        return resp

    return app


async def _stream(body: bytes, cut: int | None, *, slow: bool) -> AsyncIterator[bytes]:
    limit = len(body) if cut is None else cut
    for offset in range(0, limit, CHUNK):
        yield body[offset : min(offset + CHUNK, limit)]
        if slow:
            await trio.sleep(0.05)
    if cut is not None:
        # Ending the body early with a Content-Length promise makes the server close the
        # connection: the client sees a truncated transfer, as with a dropped link.
        raise ConnectionAbortedError("fake hub: connection dropped on purpose")


async def running_hub(hub: FakeHub, nursery: trio.Nursery) -> trio.Event:
    """Serve ``hub`` in ``nursery``; sets ``hub.url``; set the returned event to stop it."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    stop = trio.Event()
    app = make_app(hub)
    urls: list[str] = await nursery.start(
        lambda task_status: serve(app, config, shutdown_trigger=stop.wait, task_status=task_status)  # type: ignore[arg-type]
    )
    hub.url = urls[0]
    return stop
