"""Hugging Face downloads: list a repo with huggingface_hub, stream its files with httpx.

huggingface_hub has no cancel API and (0.36) reports progress only per finished file, so
the repo is listed with ``HfApi.model_info`` and each file is streamed from the hub's
``resolve`` URL with httpx under trio: progress is byte-exact and a cancel lands at the next
chunk. A dropped connection is resumed with a ``Range`` request a few times, then fails.

Files go to a hidden temporary folder inside the target dir and are moved into place with
one rename when every file is complete and checked; any failure or cancel removes it.
The token is sent as a header only: it is kept out of reprs, logs, errors and listings.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Literal

import attrs
import httpx
import trio

from tabby.errors import (
    AuthenticationError,
    Conflict,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    TabbyError,
)

__all__ = [
    "DownloadSpec",
    "FileProgress",
    "Progress",
    "RepoFile",
    "RepoListing",
    "destination",
    "download_command",
    "fetch_listing",
    "run_download",
]

log = logging.getLogger(__name__)

RepoType = Literal["model", "lora"]
TEMP_PREFIX = ".tabby-download-"
PUBLIC_HUB = "https://huggingface.co"
CHUNK_BYTES = 1 << 20
# Files of one download fetched at once: enough to fill a link, few enough for small disks.
PARALLEL_FILES = 4
RETRIES = 3  # per file, for dropped connections
RETRY_BACKOFF_S = 0.25
LISTING_TIMEOUT_S = 30.0
HTTP_TIMEOUT = httpx.Timeout(30.0, read=120.0)
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


@attrs.frozen
class DownloadSpec:
    repo_id: str
    revision: str = "main"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    token: str | None = attrs.field(default=None, repr=False)
    folder_name: str | None = None
    repo_type: RepoType = "model"
    endpoint: str | None = None
    overwrite: bool = False

    def folder(self) -> str:
        return self.folder_name or self.repo_id.rsplit("/", 1)[-1]


@attrs.frozen
class RepoFile:
    path: str
    size: int | None
    sha256: str | None  # LFS files only


@attrs.frozen
class RepoListing:
    commit: str
    files: tuple[RepoFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)


@attrs.frozen
class FileProgress:
    path: str
    done: int
    total: int | None


@attrs.frozen
class Progress:
    files: tuple[FileProgress, ...]
    done_bytes: int
    total_bytes: int


def validate_spec(spec: DownloadSpec) -> None:
    """Raise :class:`InvalidRequest` naming the field for anything unsafe or malformed."""
    if not _REPO_ID.match(spec.repo_id) or ".." in spec.repo_id:
        raise InvalidRequest(f"not a hub repo id: {spec.repo_id!r}", param="repo_id")
    if not spec.revision or any(c in spec.revision for c in "\r\n\0"):
        raise InvalidRequest("revision must be a branch, tag or commit", param="revision")
    folder = spec.folder()
    if folder in ("", ".", "..") or any(c in folder for c in "/\\\0") or folder.startswith("."):
        raise InvalidRequest(
            f"folder_name must be one plain folder name inside the target dir, got {folder!r}",
            param="folder_name",
        )
    if not spec.include:
        raise InvalidRequest("include needs at least one glob", param="include")
    if spec.endpoint is not None and not spec.endpoint.startswith(("http://", "https://")):
        raise InvalidRequest("endpoint must be an http(s) URL", param="endpoint")


def destination(spec: DownloadSpec, root: Path) -> Path:
    """The final folder for ``spec`` under ``root``; never outside it."""
    validate_spec(spec)
    final = (root / spec.folder()).resolve()
    if final.parent != root.resolve():
        raise InvalidRequest("folder_name escapes the target dir", param="folder_name")
    return final


def resolve_endpoint(spec: DownloadSpec, default: str | None) -> str:
    """The request's endpoint, else ``default``, else ``HF_ENDPOINT``, else the public hub."""
    chosen = spec.endpoint or default or os.environ.get("HF_ENDPOINT") or PUBLIC_HUB
    return chosen.rstrip("/")


def _token_for(spec: DownloadSpec, endpoint: str) -> str | bool | None:
    """The request's token; without one, the machine's saved hub token only for the hub.

    huggingface_hub falls back to the saved token (or ``HF_TOKEN``) when given None,
    and a mirror named by the caller must never receive it.
    """
    if spec.token:
        return spec.token
    return None if endpoint.rstrip("/") == PUBLIC_HUB else False


def fetch_listing(spec: DownloadSpec, endpoint: str) -> RepoListing:
    """List the files of ``spec`` at its revision (blocking: run it in a thread)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils._paths import filter_repo_objects

    try:
        info = HfApi(endpoint=endpoint).model_info(
            spec.repo_id,
            revision=spec.revision,
            files_metadata=True,
            token=_token_for(spec, endpoint),
            timeout=LISTING_TIMEOUT_S,
        )
    except Exception as exc:
        raise _hub_error(exc, spec) from None
    siblings = info.siblings or []
    chosen = list(
        filter_repo_objects(
            siblings,
            allow_patterns=list(spec.include),
            ignore_patterns=list(spec.exclude) or None,
            key=lambda s: s.rfilename,
        )
    )
    if not chosen:
        raise InvalidRequest(
            f"no file of {spec.repo_id} matches include {list(spec.include)} "
            f"and exclude {list(spec.exclude)}",
            param="include",
        )
    files = tuple(
        RepoFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs is not None else None) for s in chosen
    )
    for f in files:
        parts = Path(f.path).parts
        if Path(f.path).is_absolute() or ".." in parts:
            raise ServiceUnavailable(f"the hub listed an unsafe path: {f.path!r}", code="hub_error")
    return RepoListing(commit=info.sha or spec.revision, files=files)


def _hub_error(exc: Exception, spec: DownloadSpec) -> TabbyError:
    """Translate huggingface_hub / requests errors at the boundary, by class and status."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = spec.repo_id
    if isinstance(exc, GatedRepoError):
        hint = "the token was refused" if spec.token else "pass a Hugging Face token (token)"
        return AuthenticationError(
            f"{repo} is gated or private on the hub: {hint}", param="token", code="hub_gated_repo"
        )
    if isinstance(exc, RevisionNotFoundError):
        return NotFound(
            f"revision {spec.revision!r} not found in {repo}",
            param="revision",
            code="hub_revision_not_found",
        )
    if isinstance(exc, RepositoryNotFoundError):
        return NotFound(
            f"repository {repo} not found on the hub (or private: pass a token)",
            param="repo_id",
            code="hub_repo_not_found",
        )
    status = (
        exc.response.status_code
        if isinstance(exc, HfHubHTTPError) and exc.response is not None
        else None
    )
    if status in (401, 403):
        return AuthenticationError(
            f"the hub refused access to {repo}", param="token", code="hub_auth"
        )
    return ServiceUnavailable(
        f"the hub could not list {repo}: {type(exc).__name__}", code="hub_unreachable"
    )


class _Tracker:
    """Byte counts of one download; owned by that download's task."""

    def __init__(self, listing: RepoListing, emit: Callable[[Progress], None]) -> None:
        self._done = {f.path: 0 for f in listing.files}
        self._total = {f.path: f.size for f in listing.files}
        self._emit = emit
        self._last = 0.0

    def set(self, path: str, done: int, *, force: bool = False) -> None:
        self._done[path] = done
        now = trio.current_time()
        if force or now - self._last >= 0.1:
            self._last = now
            self._emit(self.snapshot())

    def snapshot(self) -> Progress:
        files = tuple(FileProgress(p, d, self._total[p]) for p, d in self._done.items())
        return Progress(files, sum(self._done.values()), sum(t or 0 for t in self._total.values()))


def _write(handle: BinaryIO, hasher: hashlib._Hash, chunk: bytes) -> None:
    handle.write(chunk)
    hasher.update(chunk)


async def _fetch_file(
    client: httpx.AsyncClient, url: str, target: Path, file: RepoFile, tracker: _Tracker
) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    done, failures = 0, 0
    hasher = hashlib.sha256()
    with target.open("wb") as handle:  # opening is instant; every write goes to a thread
        while True:
            headers = {"Range": f"bytes={done}-"} if done else {}
            try:
                async with client.stream("GET", url, headers=headers) as resp:
                    if resp.status_code == 200 and done:
                        # The server ignored the range: start the file over.
                        done, hasher = 0, hashlib.sha256()
                        await trio.to_thread.run_sync(handle.seek, 0)
                        await trio.to_thread.run_sync(handle.truncate)
                    _check_status(resp, file)
                    pending = bytearray()
                    try:
                        # Chunks come as the network delivers them (progress and cancel
                        # stay prompt); disk writes are batched to CHUNK_BYTES per thread hop.
                        async for chunk in resp.aiter_bytes():
                            pending += chunk
                            done += len(chunk)
                            tracker.set(file.path, done)
                            if len(pending) >= CHUNK_BYTES:
                                await trio.to_thread.run_sync(
                                    _write, handle, hasher, bytes(pending)
                                )
                                pending.clear()
                    finally:
                        if pending:  # keep what arrived, so a resume continues after it
                            with trio.CancelScope(shield=True):
                                await trio.to_thread.run_sync(
                                    _write, handle, hasher, bytes(pending)
                                )
                break
            except httpx.TransportError as exc:
                failures += 1
                if failures > RETRIES:
                    raise ServiceUnavailable(
                        f"download of {file.path} failed after {RETRIES} retries: {type(exc).__name__}",
                        code="hub_connection_failed",
                    ) from None
                log.info("download of %s interrupted at %d bytes; resuming", file.path, done)
                await trio.sleep(RETRY_BACKOFF_S * failures)
    if file.size is not None and done != file.size:
        raise ServiceUnavailable(
            f"{file.path}: got {done} of {file.size} bytes", code="hub_incomplete"
        )
    if file.sha256 is not None and hasher.hexdigest() != file.sha256:
        raise ServiceUnavailable(f"{file.path}: checksum mismatch", code="hub_checksum")
    tracker.set(file.path, done, force=True)


def _check_status(resp: httpx.Response, file: RepoFile) -> None:
    if resp.status_code in (200, 206):
        return
    if resp.status_code in (401, 403):
        raise AuthenticationError(f"the hub refused {file.path}", param="token", code="hub_auth")
    if resp.status_code == 404:
        raise NotFound(f"{file.path} is missing on the hub", code="hub_entry_not_found")
    raise ServiceUnavailable(
        f"the hub answered {resp.status_code} for {file.path}", code="hub_error"
    )


def _commit(temp: Path, final: Path, overwrite: bool) -> None:
    """Move the finished folder into place (blocking)."""
    if final.exists():
        if not overwrite:
            raise Conflict(f"{final.name} already exists", param="folder_name")
        old = final.with_name(f"{TEMP_PREFIX}replaced-{uuid.uuid4().hex}")
        os.replace(final, old)
        os.replace(temp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.replace(temp, final)
        except OSError:
            raise Conflict(
                f"{final.name} appeared during the download", param="folder_name"
            ) from None


def _first_tabby_error(group: BaseExceptionGroup[BaseException]) -> TabbyError | None:
    for exc in group.exceptions:
        if isinstance(exc, TabbyError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            inner = _first_tabby_error(exc)
            if inner is not None:
                return inner
    return None


async def run_download(
    spec: DownloadSpec,
    root: Path,
    listing: RepoListing,
    endpoint: str,
    on_progress: Callable[[Progress], None],
) -> Path:
    """Fetch ``listing`` into ``root/<folder>``; returns the final folder."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils._headers import build_hf_headers

    final = destination(spec, root)
    if final.exists() and not spec.overwrite:
        raise Conflict(f"{final.name} already exists in {root}", param="folder_name")
    temp = root / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    tracker = _Tracker(listing, on_progress)
    headers = build_hf_headers(token=_token_for(spec, endpoint), library_name="tabby")
    limiter = trio.CapacityLimiter(PARALLEL_FILES)

    async def one(file: RepoFile) -> None:
        url = hf_hub_url(spec.repo_id, file.path, revision=listing.commit, endpoint=endpoint)
        async with limiter:
            await _fetch_file(client, url, temp / file.path, file, tracker)

    try:
        await trio.to_thread.run_sync(lambda: temp.mkdir(parents=True))
        async with httpx.AsyncClient(
            headers=headers, timeout=HTTP_TIMEOUT, follow_redirects=True
        ) as client:
            try:
                async with trio.open_nursery() as nursery:
                    for file in listing.files:
                        nursery.start_soon(one, file)
            except BaseExceptionGroup as group:
                first = _first_tabby_error(group)
                if first is None:
                    raise
                raise first from None
        await trio.to_thread.run_sync(_commit, temp, final, spec.overwrite)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(lambda: shutil.rmtree(temp, ignore_errors=True))
    on_progress(tracker.snapshot())
    return final


# -- the `tabby download` command ----------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tabby download",
        description="Download a repo from the Hugging Face hub into model_dir (or lora_dir).",
    )
    parser.add_argument("repo_id", help="hub repo, e.g. org/name")
    parser.add_argument("--revision", default="main", help="branch, tag or commit")
    parser.add_argument("--include", nargs="+", action="extend", metavar="GLOB", help="default *")
    parser.add_argument("--exclude", nargs="+", action="extend", metavar="GLOB")
    parser.add_argument("--token", help="hub token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--folder-name", help="target folder (default: the repo name)")
    parser.add_argument("--repo-type", choices=("model", "lora"), default="model")
    parser.add_argument("--endpoint", help="hub URL for mirrors (default: HF_ENDPOINT)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    parser.add_argument("--config", type=Path, help="tabby.toml naming model_dir and lora_dir")
    parser.add_argument("--dest", type=Path, help="target dir instead of model_dir/lora_dir")
    return parser


async def _download_with_bar(spec: DownloadSpec, root: Path) -> Path:
    from tqdm import tqdm

    endpoint = resolve_endpoint(spec, None)
    final = destination(spec, root)
    if final.exists() and not spec.overwrite:
        raise Conflict(f"{final} already exists (--overwrite replaces it)", param="folder_name")
    listing = await trio.to_thread.run_sync(fetch_listing, spec, endpoint, abandon_on_cancel=True)
    print(f"{spec.repo_id}@{listing.commit[:12]}: {len(listing.files)} files", file=sys.stderr)
    with tqdm(total=listing.total_bytes, unit="B", unit_scale=True, unit_divisor=1024) as bar:

        def show(progress: Progress) -> None:
            bar.update(progress.done_bytes - bar.n)

        return await run_download(spec, root, listing, endpoint, show)


def download_command(args: list[str]) -> int:
    """``tabby download REPO_ID [...]``: prints the folder on success; 1 on failure."""
    ns = _parser().parse_args(args)
    spec = DownloadSpec(
        repo_id=ns.repo_id,
        revision=ns.revision,
        include=tuple(ns.include or ("*",)),
        exclude=tuple(ns.exclude or ()),
        token=ns.token,
        folder_name=ns.folder_name,
        repo_type=ns.repo_type,
        endpoint=ns.endpoint,
        overwrite=ns.overwrite,
    )
    root: Path | None = ns.dest
    if root is None:
        from tabby.config import ConfigError, load_config

        try:
            config = load_config(config_path=ns.config, cli_args=())
        except ConfigError as exc:
            print("\n".join(exc.lines), file=sys.stderr)
            return 2
        section = config.lora.lora_dir if spec.repo_type == "lora" else config.model.model_dir
        root = config.resolve(section)
    try:
        root.mkdir(parents=True, exist_ok=True)
        path = trio.run(_download_with_bar, spec, root)
    except TabbyError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cancelled; nothing was kept", file=sys.stderr)
        return 130
    except BaseExceptionGroup as group:  # Ctrl-C that arrived inside a nursery
        if group.subgroup(KeyboardInterrupt) is None:
            raise
        print("cancelled; nothing was kept", file=sys.stderr)
        return 130
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(download_command(sys.argv[1:]))
