"""Routes every configuration serves: health, service info and auth checks."""

from __future__ import annotations

import importlib.metadata
from typing import Any

import quart

from tabby.errors import Unprocessable
from tabby.http.auth import Permission, require
from tabby.http.services import Services

__all__ = ["blueprint", "service_info"]


def _version() -> str:
    try:
        return importlib.metadata.version("tabby")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def service_info(api_servers: tuple[str, ...]) -> dict[str, Any]:
    """The ``/.well-known/serviceinfo`` descriptor (KoboldAI service-info format, v0.2)."""
    apis: dict[str, Any] = {}
    if "OAI" in api_servers:
        apis["openai"] = {
            "name": "OpenAI API",
            "relative_url": "/v1",
            "documentation": "https://platform.openai.com/docs/api-reference",
            "version": 1,
        }
    if "Kobold" in api_servers:
        apis["koboldai"] = {
            "name": "KoboldAI API",
            "relative_url": "/api",
            "documentation": "https://lite.koboldai.net/koboldcpp_api",
            "version": 1,
        }
    return {
        "version": 0.2,
        "software": {"name": "tabby", "version": _version()},
        "api": apis,
    }


def blueprint(services: Services) -> quart.Blueprint:
    bp = quart.Blueprint("core", __name__)
    info = service_info(tuple(services.config.network.api_servers))

    @bp.get("/health")
    async def health() -> tuple[dict[str, Any], int]:
        report = await services.health.get()
        if report.healthy:
            return {"status": "healthy", "problems": []}, 200
        problems = [problem.to_json() for problem in report.problems]
        return {"status": "unhealthy", "problems": problems}, 503

    @bp.get("/.well-known/serviceinfo")
    async def serviceinfo() -> dict[str, Any]:
        return info

    @bp.get("/v1/auth/permission")
    async def permission() -> dict[str, str]:
        granted = await require(Permission.API)
        return {"permission": granted.value}

    @bp.post("/v1/auth/keys/reload")
    async def reload_keys() -> dict[str, Any]:
        """Re-read the keys file now (admin); it is also re-read when it changes."""
        await require(Permission.ADMIN)
        outcome = await services.auth.reload()
        if not outcome.ok:
            raise Unprocessable(
                "the keys file was refused; the previous keys stay in force: "
                + "; ".join(outcome.problems),
                code="invalid_keys_file",
            )
        return {"status": "reloaded", "api_keys": outcome.api_keys}

    return bp
