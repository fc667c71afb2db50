"""The KoboldAI API, served when ``[network] api_servers`` includes ``"Kobold"``.

Generation (auth: api), on the same serving core as the OpenAI API (the body is mapped
onto a neutral completion request that trims its prompt to fit, see
``tabby.http.kobold.schemas``):

* ``POST /api/v1/generate`` → ``{"results": [{"text", "finish_reason"}]}``;
* ``POST /api/extra/generate/stream`` → SSE ``event: message`` /
  ``data: {"token": "..."}``, a last event with ``finish_reason``, no ``[DONE]``;
* ``GET|POST /api/extra/generate/check`` → the text so far of a ``genkey``
  (``{"results": []}`` when none is running);
* ``POST /api/extra/abort`` → cancels that generation through its model's scheduler and
  answers ``{"success": <whether something was aborted>}``; the generate call then
  answers with the text so far and the stream ends.

Check and abort are for the caller that started the generation (same API key) or an
admin (403 otherwise). A generate without ``max_length`` generates the default length
that ``/api/v1/config/max_length`` reports (not the context size, unlike upstream), and
the prompt is trimmed from the front so that it and ``max_length`` fit in
``max_context_length`` (capped to the model's context).

Also: ``GET /api/v1/model``, ``POST /api/extra/tokencount``, the context and length
figures, the version endpoints (no auth; they answer as KoboldAI United and KoboldCpp
do, which clients use to pick features), the soft-prompt stubs (no auth), and every
``/api/v1/...`` route again under ``/api/latest/...``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import quart

from tabby.actors.auth import presented_keys
from tabby.config.validation import FieldError
from tabby.errors import InvalidRequest
from tabby.http.auth import Permission, require
from tabby.http.body import read_json, structure_body, structure_request
from tabby.http.context import request_id
from tabby.http.kobold.genkeys import Caller, GenkeyRegistry, KoboldGeneration
from tabby.http.kobold.schemas import (
    AbortResponse,
    CheckResponse,
    CheckResult,
    EmptyResponse,
    GenerateRequest,
    GenerateResponse,
    GenerateResult,
    GenkeyRequest,
    KoboldCppVersion,
    KoboldFinishReason,
    ResultResponse,
    SoftPromptList,
    StreamToken,
    TextValue,
    TokenCountRequest,
    TokenCountResponse,
    ValueResponse,
    completion_request,
)
from tabby.http.openai.responses import dump
from tabby.http.openapi import Route
from tabby.http.services import Services
from tabby.http.sse import SSEEvent, SSEItem, sse_response
from tabby.http.waiting import Handoff, while_loading
from tabby.serving.generate import (
    ChoiceFinished,
    ChoiceText,
    Generation,
    GenerationEvent,
    GenerationService,
)
from tabby.serving.presets import apply_preset
from tabby.serving.state import ServingState

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "KOBOLDCPP_VERSION",
    "KOBOLD_UNITED_VERSION",
    "ROUTES",
    "KoboldService",
    "blueprint",
    "default_max_length",
]

log = logging.getLogger(__name__)

# Generated tokens when neither the request nor the sampler preset sets a length: a
# short reply, which is what Kobold clients expect when they send none.
DEFAULT_MAX_LENGTH = 80
# The versions the version endpoints answer with (clients gate features on them).
KOBOLD_UNITED_VERSION = "1.2.5"
KOBOLDCPP_VERSION = "1.74"

_V1_PREFIXES = ("/api/v1", "/api/latest")

Events = AsyncIterator[GenerationEvent]


def _json(value: object) -> dict[str, Any]:
    out: dict[str, Any] = dump(value)
    return out


def _v1(method: str, path: str, **kw: Any) -> tuple[Route, ...]:
    return tuple(Route(method, prefix + path, tag="kobold", **kw) for prefix in _V1_PREFIXES)


def _extra(method: str, path: str, **kw: Any) -> Route:
    return Route(method, "/api/extra" + path, tag="kobold", **kw)


_GENERATE_DOC = (
    "Generate text (KoboldAI).\nEvery sampler field and the Kobold names; ``genkey`` names "
    "the generation for check and abort."
)
ROUTES: tuple[Route, ...] = (
    *_v1("POST", "/generate", request=GenerateRequest, response=GenerateResponse,
         doc=_GENERATE_DOC),
    *_v1("GET", "/model", response=ResultResponse, doc='The loaded model, as "tabby/<name>".'),
    *_v1("GET", "/config/max_context_length", response=ValueResponse,
         doc="The model's context length."),
    *_v1("GET", "/config/max_length", response=ValueResponse,
         doc="The generation length of a request without max_length."),
    *_v1("GET", "/info/version", response=ResultResponse, auth="none",
         doc="The KoboldAI United API version answered."),
    *_v1("GET", "/config/soft_prompts_list", response=SoftPromptList, auth="none",
         doc="Soft prompts (none)."),
    *_v1("GET", "/config/soft_prompt", response=TextValue, auth="none",
         doc="The soft prompt (none)."),
    *_v1("PUT", "/config/soft_prompt", response=EmptyResponse, auth="none",
         doc="Set the soft prompt (accepted; no effect)."),
    _extra("POST", "/generate/stream", request=GenerateRequest, stream=StreamToken,
           doc="Generate text as server-sent events (KoboldAI).\nEach event is "
           "``event: message``; the last one carries finish_reason."),
    _extra("GET", "/generate/check", response=CheckResponse,
           doc="The text so far of a genkey (query parameter genkey).\nOnly for the key "
           "that started it, or the admin key."),
    _extra("POST", "/generate/check", request=GenkeyRequest, response=CheckResponse,
           doc="The text so far of a genkey.\nOnly for the key that started it, or the "
           "admin key."),
    _extra("POST", "/abort", request=GenkeyRequest, response=AbortResponse,
           doc="Stop the generation of a genkey.\nOnly for the key that started it, or "
           "the admin key; the generate call answers with the text so far."),
    _extra("POST", "/tokencount", request=TokenCountRequest, response=TokenCountResponse,
           doc="Tokenize a text (no BOS)."),
    _extra("GET", "/true_max_context_length", response=ValueResponse,
           doc="The model's context length."),
    _extra("GET", "/version", response=KoboldCppVersion, auth="none",
           doc="The KoboldCpp API version answered."),
)  # fmt: skip


def default_max_length(state: ServingState) -> int:
    """The generation length of a request without ``max_length``."""
    preset = apply_preset({}, state.preset).get("max_tokens")
    if isinstance(preset, int) and not isinstance(preset, bool) and preset > 0:
        return preset
    return DEFAULT_MAX_LENGTH


def _finish_reason(finished: ChoiceFinished | None) -> KoboldFinishReason:
    if finished is not None and finished.cancelled:
        return "abort"
    return "length" if finished is not None and finished.finish_reason == "length" else "stop"


async def _tokens(events: Events) -> AsyncIterator[SSEItem]:
    """A stream's SSE events; a failure raises: one SSE error event ends the stream."""
    async for event in events:
        if isinstance(event, ChoiceText) and event.content:
            yield SSEEvent(_json(StreamToken(event.content)), event="message")
        elif isinstance(event, ChoiceFinished):
            last = StreamToken("", _finish_reason(event))
            yield SSEEvent(_json(last), event="message")


@attrs.frozen
class _Started:
    generation: Generation
    registered: KoboldGeneration


class KoboldService:
    """The Kobold handlers' state: the one genkey registry of this app."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._serving = GenerationService(services.models, services.config)
        self.genkeys = GenkeyRegistry()

    async def caller(self) -> Caller:
        """The caller (401/403 as for the OpenAI API) and the keys that authorize them."""
        permission = await require(Permission.API)
        keys = presented_keys(quart.request.headers)
        if len(keys) > 1:
            # Only keys that grant access on their own may own a generation.
            checks = [await self._services.auth.check_keys((key,)) for key in keys]
            keys = tuple(k for k, p in zip(keys, checks, strict=True) if p.grants(Permission.API))
        return Caller.from_keys(permission, keys)

    # -- generation ---------------------------------------------------------------------

    async def start(self) -> _Started:
        caller, request = await self.receive()
        return await self.begin(caller, request, request_id())

    async def receive(self) -> tuple[Caller, GenerateRequest]:
        """The caller and the validated body (in the handler: it reads the request)."""
        caller = await self.caller()
        raw = await read_json()
        request = structure_request(raw, GenerateRequest, self._serving.current_state().preset)
        return caller, request

    async def begin(self, caller: Caller, request: GenerateRequest, rid: str) -> _Started:
        """Plan and submit the generation (after the request was received)."""
        # Kobold names no model: the loaded one (waited for while a load runs).
        state = await self._serving.serving_state(None, caller.permission)
        try:
            resolved = request.resolved(default_max_length=default_max_length(state))
        except FieldError as exc:
            raise InvalidRequest(
                f"invalid request: {exc.field}: {exc.message}", param=exc.field
            ) from None
        generation = await self._serving.prepare(
            completion_request(resolved), caller.permission, rid, label="kobold", state=state
        )
        plan = generation.plan
        registered = self.genkeys.start(
            request.genkey or rid,
            plan.jobs[0].job_id,
            caller,
            output=generation.choices[0],
            scheduler=plan.scheduler,
        )
        try:
            await generation.submit()
            if registered.aborted:
                # Aborted while it waited for admission, when Cancel would have missed it.
                assert plan.scheduler is not None  # submit refuses a plan without one
                await plan.scheduler.cancel(registered.job_id)
        except BaseException:
            self.genkeys.finish(registered)
            raise
        return _Started(generation, registered)

    async def generate(self) -> dict[str, Any]:
        started = await self.start()
        try:
            result = await started.generation.collect()
        finally:
            self.genkeys.finish(started.registered)
        choice = result.choices[0]
        answer = GenerateResult(choice.text, _finish_reason(choice.finished))
        return _json(GenerateResponse((answer,)))

    async def stream(self) -> quart.Response:
        caller, request = await self.receive()
        rid = request_id()
        if self._serving.switching():
            # Headers and ": loading" comments now; the tokens once the model is there.
            async def produce(send: Handoff) -> None:
                started = await self.begin(caller, request, rid)
                try:
                    async with started.generation.stream() as events:
                        async for item in _tokens(events):
                            await send.send(item)
                finally:
                    self.genkeys.finish(started.registered)

            return sse_response(while_loading(produce))
        started = await self.begin(caller, request, rid)

        @asynccontextmanager
        async def body() -> AsyncIterator[AsyncIterator[SSEItem]]:
            try:
                async with started.generation.stream() as events:
                    yield _tokens(events)
            finally:
                self.genkeys.finish(started.registered)

        return sse_response(body())

    # -- genkeys --------------------------------------------------------------------------

    async def check(self) -> dict[str, Any]:
        caller = await self.caller()
        generation = self.genkeys.lookup(await _genkey(), caller)
        if generation is None:
            return _json(CheckResponse(()))
        return _json(CheckResponse((CheckResult(generation.text),)))

    async def abort(self) -> dict[str, Any]:
        caller = await self.caller()
        generation = self.genkeys.abort(await _genkey(), caller)
        if generation is not None and generation.scheduler is not None:
            await generation.scheduler.cancel(generation.job_id)
        return _json(AbortResponse(generation is not None))

    # -- model facts ----------------------------------------------------------------------

    async def model(self) -> dict[str, Any]:
        await require(Permission.API)
        state = self._serving.loaded_state()
        name = state.model_name or (state.model.name if state.model else "")
        return _json(ResultResponse(f"tabby/{name}"))

    async def max_context_length(self) -> dict[str, Any]:
        await require(Permission.API)
        return _json(ValueResponse(self._serving.loaded_state().max_seq_len))

    async def max_length(self) -> dict[str, Any]:
        await require(Permission.API)
        return _json(ValueResponse(default_max_length(self._serving.loaded_state())))

    async def token_count(self) -> dict[str, Any]:
        await require(Permission.API)
        request = structure_body(await read_json(), TokenCountRequest)
        tokenizer = self._serving.loaded_state().tokenizer
        assert tokenizer is not None
        ids = tokenizer.encode(request.prompt, add_bos=False)
        return _json(TokenCountResponse(len(ids), tuple(ids)))


async def _genkey() -> str:
    """The genkey of a check or abort: the JSON body's, else the query string's."""
    raw = await read_json(allow_empty=True)
    if isinstance(raw, dict) and "genkey" not in raw and "genkey" in quart.request.args:
        raw = {**raw, "genkey": quart.request.args["genkey"]}
    return structure_body(raw, GenkeyRequest).genkey


Handler = Callable[[], Awaitable[Any]]


def blueprint(services: Services) -> quart.Blueprint:
    bp = quart.Blueprint("kobold", __name__)
    kobold = KoboldService(services)

    def route(path: str, name: str, handler: Handler, methods: tuple[str, ...] = ("GET",)) -> None:
        bp.add_url_rule(path, endpoint=name, view_func=handler, methods=list(methods))

    def v1(path: str, name: str, handler: Handler, methods: tuple[str, ...] = ("GET",)) -> None:
        for index, prefix in enumerate(_V1_PREFIXES):
            route(prefix + path, f"{name}_{index}", handler, methods)

    async def united_version() -> dict[str, Any]:
        return _json(ResultResponse(KOBOLD_UNITED_VERSION))

    async def koboldcpp_version() -> dict[str, Any]:
        return _json(KoboldCppVersion("KoboldCpp", KOBOLDCPP_VERSION))

    async def soft_prompts_list() -> dict[str, Any]:
        return _json(SoftPromptList(()))

    async def soft_prompt() -> dict[str, Any]:
        return _json(TextValue(""))

    async def set_soft_prompt() -> dict[str, Any]:
        return _json(EmptyResponse())

    v1("/generate", "generate", kobold.generate, ("POST",))
    v1("/model", "model", kobold.model)
    v1("/config/max_context_length", "max_context_length", kobold.max_context_length)
    v1("/config/max_length", "max_length", kobold.max_length)
    v1("/info/version", "united_version", united_version)
    v1("/config/soft_prompts_list", "soft_prompts_list", soft_prompts_list)
    v1("/config/soft_prompt", "soft_prompt", soft_prompt)
    v1("/config/soft_prompt", "set_soft_prompt", set_soft_prompt, ("PUT",))
    route("/api/extra/generate/stream", "stream", kobold.stream, ("POST",))
    route("/api/extra/generate/check", "check", kobold.check, ("GET", "POST"))
    route("/api/extra/abort", "abort", kobold.abort, ("POST",))
    route("/api/extra/tokencount", "tokencount", kobold.token_count, ("POST",))
    route(
        "/api/extra/true_max_context_length", "true_max_context_length", kobold.max_context_length
    )
    route("/api/extra/version", "koboldcpp_version", koboldcpp_version)
    return bp
