"""The OpenAI error body, which the OpenAI, admin, Kobold and core routes all answer with.

``{"error": {"message", "type", "param", "code"}}``, plus ``error.trace`` when tracebacks
are sent. It is the app's default error shape; a protocol with a shape of its own
registers it for its blueprint (:func:`tabby.http.errors.use_error_renderer`).
"""

from __future__ import annotations

from typing import Any

from tabby.errors import TabbyError

__all__ = ["error_body"]


def error_body(exc: TabbyError, trace: str | None = None) -> dict[str, Any]:
    detail: dict[str, Any] = {
        "message": exc.message,
        "type": exc.error_type,
        "param": exc.param,
        "code": exc.code,
    }
    if trace is not None:
        detail["trace"] = trace
    return {"error": detail}
