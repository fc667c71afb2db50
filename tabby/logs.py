"""Logging setup and the per-request access line, with secrets redacted.

Key headers (``Authorization``, ``X-Api-Key``, ``X-Admin-Key``, cookies) and secret body
keys (``token``, ``api_key``, ``admin_key``, ``hf_token``) never reach a log line: they
are replaced by ``[redacted]`` wherever they appear.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "ACCESS_LOGGER",
    "REDACTED",
    "SECRET_BODY_KEYS",
    "SECRET_HEADERS",
    "access_line",
    "redact_body",
    "redact_headers",
    "setup_logging",
]

ACCESS_LOGGER = "tabby.access"
REDACTED = "[redacted]"
SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "x-admin-key", "cookie", "set-cookie"}
)
SECRET_BODY_KEYS = frozenset({"token", "api_key", "admin_key", "hf_token"})
_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    """Console logging at ``level`` (from ``[logging] log_level`` / ``TABBY_LOG_LEVEL``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # hypercorn logs every connection at INFO; tabby writes its own access line.
    logging.getLogger("hypercorn.access").setLevel(logging.WARNING)


def redact_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {name: REDACTED if name.lower() in SECRET_HEADERS else value for name, value in headers}


def redact_body(value: Any) -> Any:
    """A copy of a JSON value with secret keys replaced, at any depth."""
    if isinstance(value, Mapping):
        return {
            key: REDACTED if str(key).lower() in SECRET_BODY_KEYS else redact_body(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact_body(item) for item in value]
    return value


def access_line(method: str, path: str, status: int, duration_ms: float, request_id: str) -> str:
    """One line per request; ``path`` excludes the query string (it may carry secrets)."""
    return f"{method} {path} {status} {duration_ms:.1f}ms id={request_id}"
