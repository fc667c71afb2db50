"""Atomic TOML writes that keep the operator's comments and key order (tomlkit).

Used for every file the server writes back: the API-keys store, ``tabby keys``,
``tabby export-config``. A write goes to a temporary file in the same folder, is
fsynced, and replaces the target with ``os.replace``, so readers see the old file or
the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import tomlkit
import tomlkit.exceptions

from tabby.config.errors import ConfigError

__all__ = ["edit_toml", "locked", "read_toml", "write_toml_atomic"]

_DEFAULT_MODE = 0o644


def read_toml(path: Path) -> tomlkit.TOMLDocument:
    """Parse ``path`` with tomlkit (comments kept); a missing file is an empty document.

    Syntax errors become a :class:`ConfigError` naming the file and line.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return tomlkit.document()
    try:
        return tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as exc:
        reason = re.sub(r" at line \d+ col \d+$", "", str(exc))
        raise ConfigError([f"{path}:{exc.line}: TOML syntax error: {reason}"]) from None


def write_toml_atomic(
    path: Path, doc: tomlkit.TOMLDocument | str, *, mode: int | None = None
) -> None:
    """Write ``doc`` to ``path`` atomically.

    ``mode`` sets the file's permission bits; without it an existing file keeps its
    mode and a new one gets 0644 (less the umask).
    """
    text = doc if isinstance(doc, str) else tomlkit.dumps(doc)
    if mode is None:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = _DEFAULT_MODE & ~umask
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; set the final mode before any byte is visible under path.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform can open a folder.
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock for a read-modify-write of ``path``.

    The lock is a ``.<name>.lock`` file beside it: ``path`` itself is replaced on every
    write, so a lock on its inode would not be seen by the next writer. Released when the
    block ends, or when the process dies.
    """
    lock_path = path.with_name(f".{path.name}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def edit_toml(
    path: Path,
    fn: Callable[[tomlkit.TOMLDocument], None],
    *,
    mode: int | None = None,
) -> None:
    """Read ``path`` (missing = empty), let ``fn`` change the document, write it atomically.

    Comments, blank lines and key order of the parts ``fn`` leaves alone are kept. Two
    edits at once (two ``tabby keys add``) take turns, so neither loses the other's change.
    """
    with locked(path):
        doc = read_toml(path)
        fn(doc)
        write_toml_atomic(path, doc, mode=mode)
