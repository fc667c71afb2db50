"""Model routes: listings, the loaded model's card, load (SSE) and unload, LoRAs, /props.

Listings depend on the caller (as upstream): the admin key sees every loadable model,
draft model or LoRA on disk, an API key sees only what is loaded. With
``model.use_dummy_models`` the dummy names are listed first for everyone.

``POST /v1/model/load`` checks the request before answering: an unknown model, a name
that leads outside ``model_dir`` or an unavailable backend is a plain JSON error. Then
it streams, when running jobs must finish first, one ``{"status": "waiting",
"running_jobs", "message"}`` event, then ``{"model_type", "module", "modules", "status"}``
events; a failure after
that is one SSE error event. The load goes on if the client leaves (the ModelManager owns
it).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import quart
import trio

from tabby.actors.messages import JobsDraining, LoadEvent, LoadFailed, ModelLoaded
from tabby.backends.base import LoadProgress
from tabby.errors import NoModelLoaded, ServiceUnavailable
from tabby.http.admin.schemas import (
    DraftInfo,
    GenerationSettings,
    LoadProgressEvent,
    LoadWaitingEvent,
    LoraCard,
    LoraList,
    LoraLoadRequest,
    LoraLoadResponse,
    ModelCard,
    ModelList,
    ModelParameters,
    ModelUnloadRequest,
    PropsResponse,
    StatusResponse,
    to_json,
)
from tabby.http.auth import Permission, require
from tabby.http.body import parse_body
from tabby.http.openapi import Route
from tabby.http.services import Services
from tabby.http.sse import SSEItem, sse_response
from tabby.serving.model_settings import ModelLoadRequest
from tabby.serving.state import ServingState

if TYPE_CHECKING:
    from tabby.actors.models import ModelManagerHandle

__all__ = [
    "ROUTES",
    "add_routes",
    "loaded_state",
    "model_manager",
    "model_parameters",
    "progress_json",
]

_TAG = "models"

ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/models", response=ModelList, tag=_TAG,
          doc="List models.\nAdmin key: every model in model_dir; API key: the loaded one."),
    Route("GET", "/v1/model/list", response=ModelList, tag=_TAG,
          doc="List models (alias of /v1/models)."),
    Route("GET", "/v1/model", response=ModelCard, tag=_TAG,
          doc="The loaded model, with its serving parameters.\n503 when none is loaded."),
    Route("GET", "/v1/model/draft/list", response=ModelList, tag=_TAG,
          doc="List draft models.\nAdmin key: every model in draft_model_dir; "
          "API key: the active draft model."),
    Route("POST", "/v1/model/load", request=ModelLoadRequest, stream=LoadProgressEvent,
          auth="admin", tag=_TAG,
          doc="Load a model, streaming progress as server-sent events.\nThe current model is "
          "unloaded first (running jobs finish, or are cancelled with skip_queue). Bad "
          "requests are refused before the stream starts; a failure later is one error "
          "event. Leaving the stream does not stop the load."),
    Route("POST", "/v1/model/unload", request=ModelUnloadRequest, body_required=False,
          response=StatusResponse, auth="admin", tag=_TAG,
          doc="Unload the model.\nThe body is optional; running jobs are cancelled unless "
          "skip_queue is false."),
    Route("GET", "/props", response=PropsResponse, tag=_TAG,
          doc="Server properties (llama.cpp style): slots, chat template, context."),
    Route("GET", "/v1/loras", response=LoraList, tag="loras",
          doc="List LoRAs.\nAdmin key: every folder in lora_dir; API key: the active ones."),
    Route("GET", "/v1/lora/list", response=LoraList, tag="loras",
          doc="List LoRAs (alias of /v1/loras)."),
    Route("GET", "/v1/lora", response=LoraList, tag="loras", doc="The active LoRAs."),
    Route("POST", "/v1/lora/load", request=LoraLoadRequest, response=LoraLoadResponse,
          auth="admin", tag="loras",
          doc="Replace the active LoRAs.\n422 not_supported when the backend has no LoRA "
          "support."),
    Route("POST", "/v1/lora/unload", response=StatusResponse, auth="admin", tag="loras",
          doc="Remove every active LoRA."),
)


def model_manager(services: Services) -> ModelManagerHandle:
    """The ModelManager's handle (503 when model serving is not running)."""
    handle: ModelManagerHandle | None = services.models
    if handle is None:
        raise ServiceUnavailable("model serving is not running on this server")
    return handle


def loaded_state(services: Services) -> ServingState:
    """What is being served (503 when no model is loaded)."""
    state = model_manager(services).serving_state()
    if not state.loaded:
        raise NoModelLoaded("no model is loaded")
    return state


def model_parameters(state: ServingState) -> ModelParameters:
    """The ``parameters`` of the loaded model's card."""
    info, spec, template = state.model, state.load_spec, state.template
    assert info is not None
    draft = None
    if state.draft is not None:
        d = state.draft
        draft = DraftInfo(
            id=d.name, rope_scale=d.rope_scale, rope_alpha=d.rope_alpha, cache_mode=d.cache_mode
        )
    return ModelParameters(
        backend=state.backend_name or info.backend,
        max_seq_len=info.max_seq_len,
        cache_size=info.cache_size,
        cache_mode=info.cache_mode,
        rope_scale=spec.rope_scale if spec is not None else None,
        rope_alpha=spec.rope_alpha if spec is not None else None,
        max_batch_size=info.max_batch_size,
        chunk_size=info.chunk_size,
        prompt_template=template.name if template is not None else None,
        prompt_template_content=template.source if template is not None else None,
        use_vision=info.capabilities.vision and (spec is None or spec.vision),
        loras=[lora.name for lora in state.loras],
        draft=draft,
    )


def progress_json(event: LoadProgress) -> dict[str, Any]:
    return to_json(
        LoadProgressEvent(
            model_type=event.model_type,
            module=event.module,
            modules=event.modules,
            status=event.status,
        )
    )


async def _progress(events: trio.MemoryReceiveChannel[LoadEvent]) -> AsyncIterator[SSEItem]:
    finished: set[str] = set()
    last_modules = 1
    with events:
        async for event in events:
            if isinstance(event, LoadProgress):
                last_modules = event.modules
                if event.status == "finished":
                    finished.add(event.model_type)
                yield progress_json(event)
            elif isinstance(event, JobsDraining):
                jobs = "job" if event.running == 1 else "jobs"
                message = f"waiting for {event.running} running {jobs}"
                yield to_json(LoadWaitingEvent(running_jobs=event.running, message=message))
            elif isinstance(event, ModelLoaded):
                if "model" not in finished:
                    # Clients wait for the main model's "finished"; a backend that
                    # reports no modules still gets one.
                    yield progress_json(LoadProgress("model", last_modules, last_modules,
                                                     "finished"))
                return
            else:
                assert isinstance(event, LoadFailed)
                raise event.error
    raise ServiceUnavailable("the model manager stopped during the load")


def add_routes(bp: quart.Blueprint, services: Services) -> None:
    # One small closure per route, sharing what is captured here; LoRAs are separate.
    dummies = services.config.model.dummy_model_names
    use_dummies = services.config.model.use_dummy_models

    def cards(names: tuple[str, ...]) -> list[ModelCard]:
        now = int(time.time())
        shown = (*dummies, *names) if use_dummies else names
        seen: dict[str, None] = dict.fromkeys(shown)  # dummy names first, no duplicates
        return [ModelCard(id=name, created=now) for name in seen]

    async def model_list() -> dict[str, Any]:
        """List models (admin: every loadable model; API key: the loaded one)."""
        permission = await require(Permission.API)
        if permission.grants(Permission.ADMIN):
            names = await model_manager(services).list("models")
        else:
            state = model_manager(services).serving_state()
            names = (state.model_name,) if state.model_name else ()
        return to_json(ModelList(data=cards(names)))

    bp.add_url_rule("/v1/models", "models", model_list, methods=["GET"])
    bp.add_url_rule("/v1/model/list", "model_list", model_list, methods=["GET"])

    @bp.get("/v1/model")
    async def current_model() -> dict[str, Any]:
        """The loaded model's card with its serving parameters."""
        await require(Permission.API)
        state = loaded_state(services)
        assert state.model_name is not None
        card = ModelCard(
            id=state.model_name, created=int(time.time()), parameters=model_parameters(state)
        )
        return to_json(card)

    @bp.get("/v1/model/draft/list")
    async def draft_list() -> dict[str, Any]:
        """List draft models (admin: draft_model_dir; API key: the active draft)."""
        permission = await require(Permission.API)
        if permission.grants(Permission.ADMIN):
            names = await model_manager(services).list("drafts")
        else:
            draft = model_manager(services).serving_state().draft
            names = (draft.name,) if draft is not None else ()
        now = int(time.time())
        return to_json(ModelList(data=[ModelCard(id=name, created=now) for name in names]))

    @bp.post("/v1/model/load")
    async def load_model() -> quart.Response:
        """Load a model; SSE progress."""
        await require(Permission.ADMIN)
        body = await parse_body(ModelLoadRequest)
        events = await model_manager(services).load_model(body)
        return sse_response(_progress(events))

    @bp.post("/v1/model/unload")
    async def unload_model() -> dict[str, Any]:
        """Unload the model."""
        await require(Permission.ADMIN)
        body = await parse_body(ModelUnloadRequest, allow_empty=True)
        loaded_state(services)
        await model_manager(services).unload_model(skip_queue=body.skip_queue)
        return to_json(StatusResponse(status="unloaded"))

    @bp.get("/props")
    async def props() -> dict[str, Any]:
        """Server properties (llama.cpp style)."""
        await require(Permission.API)
        state = loaded_state(services)
        info = state.model
        assert info is not None
        template = state.template.source if state.template is not None else ""
        return to_json(
            PropsResponse(
                total_slots=info.max_batch_size,
                chat_template=template,
                default_generation_settings=GenerationSettings(n_ctx=info.max_seq_len),
            )
        )

    _add_lora_routes(bp, services)


def _add_lora_routes(bp: quart.Blueprint, services: Services) -> None:
    async def lora_list() -> dict[str, Any]:
        """List LoRAs (admin: lora_dir; API key: the active ones)."""
        permission = await require(Permission.API)
        now = int(time.time())
        if permission.grants(Permission.ADMIN):
            names = await model_manager(services).list("loras")
            return to_json(LoraList(data=[LoraCard(id=name, created=now) for name in names]))
        return _active_loras(model_manager(services).serving_state())

    bp.add_url_rule("/v1/loras", "loras", lora_list, methods=["GET"])
    bp.add_url_rule("/v1/lora/list", "lora_list", lora_list, methods=["GET"])

    @bp.get("/v1/lora")
    async def active_loras() -> dict[str, Any]:
        """The active LoRAs."""
        await require(Permission.API)
        return _active_loras(loaded_state(services))

    @bp.post("/v1/lora/load")
    async def load_loras() -> dict[str, Any]:
        """Replace the active LoRAs."""
        await require(Permission.ADMIN)
        body = await parse_body(LoraLoadRequest)
        loaded_state(services)
        result = await model_manager(services).load_loras(body.loras, skip_queue=body.skip_queue)
        return to_json(LoraLoadResponse(success=list(result.success), failure=list(result.failure)))

    @bp.post("/v1/lora/unload")
    async def unload_loras() -> dict[str, Any]:
        """Remove every active LoRA."""
        await require(Permission.ADMIN)
        loaded_state(services)
        await model_manager(services).unload_loras()
        return to_json(StatusResponse(status="unloaded"))


def _active_loras(state: ServingState) -> dict[str, Any]:
    now = int(time.time())
    cards = [LoraCard(id=lora.name, created=now, scaling=lora.scaling) for lora in state.loras]
    return to_json(LoraList(data=cards))
