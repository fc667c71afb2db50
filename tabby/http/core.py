"""Routes every configuration serves: health, readiness, service info and auth checks.

``/health`` is liveness: the server runs, and its open problems; it names the model
(``"none"`` without one) but does not depend on it. ``/ready`` is readiness: 200 only
while a model is attached and its queue has room, else 503 with the reason. Neither
needs a key, so neither says more than a load balancer needs.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import quart

from tabby.errors import ServiceUnavailable, Unprocessable
from tabby.http.auth import Permission, require
from tabby.http.services import Services

__all__ = ["blueprint", "readiness", "service_info"]


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


def _model_name(services: Services) -> str:
    if services.models is None:
        return "none"
    return services.models.serving_state().model_name or "none"


async def readiness(services: Services) -> tuple[dict[str, Any], int]:
    """The ``/ready`` body and status."""
    models = services.models
    if models is None:
        return {"status": "unavailable", "reason": "model serving is not running"}, 503
    state = models.serving_state()
    if state.loading is not None:
        return _not_ready(f"loading model {state.loading!r}", state.model_name)
    try:
        stats = await models.scheduler_statistics()
    except ServiceUnavailable:
        stats = None
    if not state.loaded or stats is None or not stats.attached or stats.draining:
        return _not_ready("no model is loaded", None)
    bound = services.config.network.max_queued_requests
    body: dict[str, Any] = {"model": state.model_name, "queued": stats.queued, "max_queued": bound}
    if stats.queued >= bound:
        return {"status": "unavailable", "reason": "the queue is full", **body}, 503
    return {"status": "ready", **body}, 200


def _not_ready(reason: str, model: str | None) -> tuple[dict[str, Any], int]:
    return {"status": "unavailable", "reason": reason, "model": model or "none"}, 503


def blueprint(services: Services) -> quart.Blueprint:
    bp = quart.Blueprint("core", __name__)
    info = service_info(tuple(services.config.network.api_servers))

    @bp.get("/health")
    async def health() -> tuple[dict[str, Any], int]:
        report = await services.health.get()
        model = _model_name(services)
        if report.healthy:
            return {"status": "healthy", "model": model, "problems": []}, 200
        problems = [problem.to_json() for problem in report.problems]
        return {"status": "unhealthy", "model": model, "problems": problems}, 503

    @bp.get("/ready")
    async def ready() -> tuple[dict[str, Any], int]:
        return await readiness(services)

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
