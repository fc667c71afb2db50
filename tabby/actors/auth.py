"""AuthStore: the one owner of the API keys.

Which header carries a key does not matter, only which key it is: the admin key grants
``admin`` (and so works wherever an API key does), an API key grants ``api`` and never
more. Keys are read from ``X-Admin-Key``, ``X-Api-Key`` and ``Authorization: Bearer``
(scheme case-insensitive); a request presenting several gets the highest permission any
of them grants. Every comparison runs over every key with ``hmac.compare_digest``.

The store polls the keys file (mtime, size, inode) and reloads it when it changes. An
invalid file keeps the previous keys and opens a health problem until it is fixed.
"""

from __future__ import annotations

import hmac
import logging
import os
from functools import partial
from pathlib import Path
from typing import Protocol

import attrs
import trio

from tabby.actors.health import HealthHandle
from tabby.actors.keyfile import KeyFile, KeyFileError, create_key_file, read_key_file
from tabby.actors.mailbox import Mailbox, Reply, answer
from tabby.serving.permission import Permission

__all__ = [
    "AuthHandle",
    "AuthStats",
    "AuthStore",
    "CheckKey",
    "GetAuthStats",
    "HeaderSource",
    "ReloadKeys",
    "ReloadOutcome",
    "presented_keys",
]

log = logging.getLogger(__name__)

# Checks are answered at once; a short queue only absorbs bursts of requests.
INBOX_BUFFER = 64
DEFAULT_POLL_INTERVAL = 1.0
HEALTH_SOURCE = "auth"
HEALTH_KEY = "api_tokens"


# -- messages ---------------------------------------------------------------------------


@attrs.frozen
class CheckKey:
    keys: tuple[str, ...]
    reply: Reply[Permission]


@attrs.frozen
class ReloadKeys:
    """Re-read the keys file now, without waiting for the next poll."""

    reply: Reply[ReloadOutcome]


@attrs.frozen
class GetAuthStats:
    reply: Reply[AuthStats]


@attrs.frozen
class ReloadOutcome:
    ok: bool
    api_keys: int  # API keys in force after the reload
    problems: tuple[str, ...]  # why the file was refused (empty when ok)


@attrs.frozen
class AuthStats:
    auth_disabled: bool
    api_keys: int
    checks: int
    refused: int  # checks that granted no permission
    reloads: int  # successful reads of a changed file (the first read included)
    failed_reloads: int
    keys_file_problem: bool  # the file on disk was refused; the previous keys serve


AuthMessage = CheckKey | ReloadKeys | GetAuthStats


class HeaderSource(Protocol):
    """Case-insensitive header lookup (quart's ``request.headers``)."""

    def get(self, key: str) -> str | None: ...


def presented_keys(headers: HeaderSource) -> tuple[str, ...]:
    """Every key the request presents, in header priority order."""
    keys: list[str] = []
    for name in ("X-Admin-Key", "X-Api-Key"):
        value = (headers.get(name) or "").strip()
        if value:
            keys.append(value)
    scheme, _, token = (headers.get("Authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    return tuple(keys)


# -- handle -----------------------------------------------------------------------------


@attrs.frozen
class AuthHandle:
    _mailbox: Mailbox[AuthMessage]

    async def check(self, headers: HeaderSource) -> Permission:
        return await self.check_keys(presented_keys(headers))

    async def check_keys(self, keys: tuple[str, ...]) -> Permission:
        return await self._mailbox.ask(partial(CheckKey, keys))

    async def reload(self) -> ReloadOutcome:
        return await self._mailbox.ask(ReloadKeys)

    async def statistics(self) -> AuthStats:
        return await self._mailbox.ask(GetAuthStats)


# -- actor ------------------------------------------------------------------------------


@attrs.frozen
class _KeySet:
    admin: bytes
    api: tuple[bytes, ...]

    @classmethod
    def from_file(cls, keys: KeyFile) -> _KeySet:
        return cls(keys.admin_key.encode(), tuple(k.encode() for k in keys.api_keys))

    def permission_of(self, key: str) -> Permission:
        candidate = key.encode()
        # No early exit: the time taken must not depend on which key matched.
        is_admin = hmac.compare_digest(candidate, self.admin)
        is_api = False
        for api_key in self.api:
            is_api |= hmac.compare_digest(candidate, api_key)
        if is_admin:
            return Permission.ADMIN
        return Permission.API if is_api else Permission.NONE


_FileStamp = tuple[int, int, int]  # (mtime_ns, size, inode)


def _stamp(path: Path) -> _FileStamp | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _load_or_create(path: Path) -> tuple[KeyFile, bool]:
    if path.exists():
        return read_key_file(path), False
    return create_key_file(path), True


class AuthStore:
    """Owns the key set. ``path=None`` disables auth: every caller is admin."""

    def __init__(
        self,
        path: Path | None,
        health: HealthHandle,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        self._path = path
        self._health = health
        self._poll_interval = poll_interval
        self._keys: _KeySet | None = None
        self._stamp: _FileStamp | None = None
        self._problem_open = False
        self._checks = 0
        self._refused = 0
        self._reloads = 0
        self._failed_reloads = 0
        self.created_keys: KeyFile | None = None  # set when run() wrote a new file
        self._inbox_send, self._inbox_receive = trio.open_memory_channel[AuthMessage](INBOX_BUFFER)

    @property
    def auth_disabled(self) -> bool:
        return self._path is None

    @property
    def handle(self) -> AuthHandle:
        return AuthHandle(Mailbox(self._inbox_send, "key store"))

    def statistics(self) -> AuthStats:
        return AuthStats(
            auth_disabled=self.auth_disabled,
            api_keys=len(self._keys.api) if self._keys else 0,
            checks=self._checks,
            refused=self._refused,
            reloads=self._reloads,
            failed_reloads=self._failed_reloads,
            keys_file_problem=self._problem_open,
        )

    async def run(
        self, *, task_status: trio.TaskStatus[AuthHandle] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Load (or create) the keys file, then serve checks and watch the file.

        Raises :class:`KeyFileError` before reporting ready if the file is unusable.
        """
        if self._path is not None:
            path = self._path
            keys, created = await trio.to_thread.run_sync(_load_or_create, path)
            self._stamp = await trio.to_thread.run_sync(_stamp, path)
            self._keys = _KeySet.from_file(keys)
            self._reloads += 1
            if created:
                self.created_keys = keys
        async with self._inbox_receive:
            task_status.started(self.handle)
            next_poll = trio.current_time() + self._poll_interval
            while True:
                message: AuthMessage | None = None
                # Only the wait is bounded: a reload in progress must not be cut short.
                with trio.move_on_at(next_poll):
                    message = await self._inbox_receive.receive()
                if message is not None:
                    await self._handle(message)
                    continue
                if self._path is not None:
                    await self._poll()
                next_poll = trio.current_time() + self._poll_interval

    async def _handle(self, message: AuthMessage) -> None:
        if isinstance(message, CheckKey):
            self._checks += 1
            permission = self._permission(message.keys)
            if permission is Permission.NONE:
                self._refused += 1
            answer(message.reply, permission)
        elif isinstance(message, ReloadKeys):
            answer(message.reply, await self._reload())
        else:
            answer(message.reply, self.statistics())

    def _permission(self, keys: tuple[str, ...]) -> Permission:
        if self._keys is None:
            return Permission.ADMIN
        best = Permission.NONE
        for key in keys:
            found = self._keys.permission_of(key)
            if found.grants(best) and found is not best:
                best = found
        return best

    async def _poll(self) -> None:
        assert self._path is not None
        stamp = await trio.to_thread.run_sync(_stamp, self._path)
        if stamp != self._stamp:
            await self._reload()

    async def _reload(self) -> ReloadOutcome:
        if self._path is None:
            return ReloadOutcome(True, 0, ())
        path = self._path
        self._stamp = await trio.to_thread.run_sync(_stamp, path)
        try:
            keys = await trio.to_thread.run_sync(read_key_file, path)
        except KeyFileError as exc:
            self._failed_reloads += 1
            log.error(
                "keys file refused, previous keys still in force: %s", "; ".join(exc.lines)
            )
            # /health answers anyone: the problem says what, the log says where and why.
            self._health.report(
                HEALTH_SOURCE,
                HEALTH_KEY,
                "keys file refused, previous keys still in force (details in the server log)",
            )
            self._problem_open = True
            api_count = len(self._keys.api) if self._keys else 0
            return ReloadOutcome(False, api_count, tuple(exc.lines))
        self._keys = _KeySet.from_file(keys)
        self._reloads += 1
        log.info("reloaded %s: %d API key(s)", path, len(keys.api_keys))
        if self._problem_open:
            self._health.clear(HEALTH_SOURCE, HEALTH_KEY)
            self._problem_open = False
        return ReloadOutcome(True, len(keys.api_keys), ())
