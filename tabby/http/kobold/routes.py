"""The KoboldAI API, served when ``[network] api_servers`` includes ``"Kobold"``.

Generation (auth: api), on the same scheduler and models as the OpenAI API:

* ``POST /api/v1/generate`` → ``{"results": [{"text", "finish_reason"}]}``;
* ``POST /api/extra/generate/stream`` → SSE ``event: message`` /
  ``data: {"token": "..."}``, a last event with ``finish_reason``, no ``[DONE]``;
* ``GET|POST /api/extra/generate/check`` → the text so far of a ``genkey``
  (``{"results": []}`` when none is running);
* ``POST /api/extra/abort`` → cancels that generation through the scheduler and
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
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import quart
import trio

from tabby.actors.auth import presented_keys
from tabby.config.validation import FieldError
from tabby.errors import ContextLengthExceeded, InvalidRequest, NoModelLoaded
from tabby.http.auth import Permission, require
from tabby.http.body import read_json, structure_body
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
)
from tabby.http.openai.responses import dump
from tabby.http.openapi import Route
from tabby.http.services import Services
from tabby.http.sse import SSEEvent, SSEItem, sse_response
from tabby.jobs.events import Finished, TextChunk
from tabby.serving.planning import GenerationPlan, PreparedPrompt, constraint_for
from tabby.serving.presets import apply_preset
from tabby.serving.running import ChoiceEvent, RunningGeneration, submit_all
from tabby.serving.state import ServingState
from tabby.serving.structured import constrain_job
from tabby.serving.templating import strip_leading_bos
from tabby.serving.usage import log_metrics, log_request, make_usage

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "KOBOLDCPP_VERSION",
    "KOBOLD_UNITED_VERSION",
    "ROUTES",
    "KoboldService",
    "blueprint",
    "default_max_length",
    "fit_prompt",
    "plan_generation",
]

log = logging.getLogger(__name__)

# Generated tokens when neither the request nor the sampler preset sets a length: a
# short reply, which is what Kobold clients expect when they send none.
DEFAULT_MAX_LENGTH = 80
# The versions the version endpoints answer with (clients gate features on them).
KOBOLD_UNITED_VERSION = "1.2.5"
KOBOLDCPP_VERSION = "1.74"

_V1_PREFIXES = ("/api/v1", "/api/latest")

Events = AsyncIterator[ChoiceEvent]


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


def fit_prompt(
    ids: tuple[int, ...], context: int, max_new: int, bos_id: int | None
) -> tuple[int, ...]:
    """``ids`` trimmed from the front so that ``max_new`` tokens fit after them.

    A job needs ``len(prompt) + max_new + 1 <= context``; ``max_new`` 0 (fill the
    rest) needs room for one token. A leading ``bos_id`` is kept.
    """
    room = context - 1 - max(max_new, 1)
    if room < 1:
        raise ContextLengthExceeded(
            f"max_length ({max_new}) leaves no room for the prompt within the context of "
            f"{context} tokens",
            param="max_length",
        )
    if len(ids) <= room:
        return ids
    if bos_id is not None and ids[0] == bos_id:
        return (ids[0], *ids[len(ids) - (room - 1) :]) if room > 1 else (ids[0],)
    return ids[len(ids) - room :]


def plan_generation(request: GenerateRequest, state: ServingState, rid: str) -> GenerationPlan:
    """One job for a resolved Kobold request (see ``GenerateRequest.resolved``)."""
    info, tokenizer = state.model, state.tokenizer
    assert info is not None
    assert tokenizer is not None
    add_bos = info.add_bos_token if request.add_bos_token is None else request.add_bos_token
    text = strip_leading_bos(request.prompt, info.bos_token, add_bos)
    ids = tuple(tokenizer.encode(text, add_bos=add_bos))
    context = state.max_seq_len
    if request.max_context_length is not None:
        context = min(context, request.max_context_length)
    fitted = fit_prompt(ids, context, request.max_tokens or 0, info.bos_token_id)
    if len(fitted) < len(ids):
        log.info(
            "request %s: prompt trimmed from %d to %d tokens to fit a context of %d",
            rid, len(ids), len(fitted), context,
        )  # fmt: skip
        text = tokenizer.decode(fitted, decode_special=False)
    try:
        job = constrain_job(
            request.build_job(job_id=rid, prompt_ids=fitted, max_seq_len=context),
            constraint_for(request, state),
            state,
        )
    except ContextLengthExceeded as exc:
        raise ContextLengthExceeded(exc.message, param="prompt") from None
    return GenerationPlan(
        request_id=rid,
        model_name=state.model_name or info.name,
        epoch=state.epoch,
        tokenizer=tokenizer,
        prompts=(PreparedPrompt(text, fitted),),
        jobs=(job,),
        n=1,
        scheduler=state.scheduler,
    )


def _serving_state(services: Services) -> ServingState:
    models = services.models
    return models.serving_state() if models is not None else ServingState()


def _loaded_state(services: Services) -> ServingState:
    state = _serving_state(services)
    if not state.loaded or state.tokenizer is None or state.model is None:
        raise NoModelLoaded("no model is loaded")
    return state


def default_max_length(state: ServingState) -> int:
    """The generation length of a request without ``max_length``."""
    preset = apply_preset({}, state.preset).get("max_tokens")
    if isinstance(preset, int) and not isinstance(preset, bool) and preset > 0:
        return preset
    return DEFAULT_MAX_LENGTH


def _finish_reason(finished: Finished | None) -> KoboldFinishReason:
    if finished is not None and finished.stop_reason == "cancelled":
        return "abort"
    return "length" if finished is not None and finished.finish_reason == "length" else "stop"


@attrs.frozen
class _Started:
    plan: GenerationPlan
    generation: KoboldGeneration
    running: RunningGeneration
    started: float


class KoboldService:
    """The Kobold handlers' state: the one genkey registry of this app."""

    def __init__(self, services: Services) -> None:
        self._services = services
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
        caller = await self.caller()
        raw = await read_json()
        if not isinstance(raw, dict):
            raise InvalidRequest("the body must be a JSON object", code="invalid_body")
        request = structure_body(
            apply_preset(raw, _serving_state(self._services).preset), GenerateRequest
        )
        state = _loaded_state(self._services)
        rid = request_id()
        try:
            resolved = request.resolved(default_max_length=default_max_length(state))
        except FieldError as exc:
            raise InvalidRequest(
                f"invalid request: {exc.field}: {exc.message}", param=exc.field
            ) from None
        # Tokenizing (and trimming) the prompt and compiling a constraint is CPU work.
        plan = await trio.to_thread.run_sync(plan_generation, resolved, state, rid)
        log_request(self._services.config.logging, plan, resolved)
        generation = self.genkeys.start(request.genkey or rid, plan.jobs[0].job_id, caller)
        try:
            running = await submit_all(plan)
            if generation.aborted:
                # Aborted while it waited for admission, when Cancel would have missed it.
                assert plan.scheduler is not None  # submit_all refuses a plan without one
                await plan.scheduler.cancel(generation.job_id)
        except BaseException:
            self.genkeys.finish(generation)
            raise
        return _Started(plan, generation, running, time.perf_counter())

    def _done(self, started: _Started) -> None:
        """The generation is over (finished, failed or abandoned): forget it, log it."""
        self.genkeys.finish(started.generation)
        output = started.generation.output
        usage = make_usage(started.plan, [output], time.perf_counter() - started.started)
        log_metrics(started.plan, usage, endpoint="kobold")

    async def generate(self) -> dict[str, Any]:
        started = await self.start()
        output = started.generation.output
        try:
            async with started.running as events:
                async for item in events:
                    output.add(item.event)  # a Failed event raises its error
        finally:
            self._done(started)
        result = GenerateResult(output.text, _finish_reason(output.finished))
        return _json(GenerateResponse((result,)))

    async def stream(self) -> quart.Response:
        started = await self.start()

        async def tokens(events: Events) -> AsyncIterator[SSEItem]:
            output = started.generation.output
            async for item in events:
                event = item.event
                output.add(event)  # a Failed event raises: one SSE error event ends the stream
                if isinstance(event, TextChunk) and event.text:
                    yield SSEEvent(_json(StreamToken(event.text)), event="message")
                elif isinstance(event, Finished):
                    last = StreamToken("", _finish_reason(event))
                    yield SSEEvent(_json(last), event="message")

        @asynccontextmanager
        async def body() -> AsyncIterator[AsyncIterator[SSEItem]]:
            try:
                async with started.running as events:
                    yield tokens(events)
            finally:
                self._done(started)

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
        job_id = self.genkeys.abort(await _genkey(), caller)
        scheduler = _serving_state(self._services).scheduler
        if job_id is not None and scheduler is not None:
            await scheduler.cancel(job_id)
        return _json(AbortResponse(job_id is not None))

    # -- model facts ----------------------------------------------------------------------

    async def model(self) -> dict[str, Any]:
        await require(Permission.API)
        state = _loaded_state(self._services)
        name = state.model_name or (state.model.name if state.model else "")
        return _json(ResultResponse(f"tabby/{name}"))

    async def max_context_length(self) -> dict[str, Any]:
        await require(Permission.API)
        return _json(ValueResponse(_loaded_state(self._services).max_seq_len))

    async def max_length(self) -> dict[str, Any]:
        await require(Permission.API)
        return _json(ValueResponse(default_max_length(_loaded_state(self._services))))

    async def token_count(self) -> dict[str, Any]:
        await require(Permission.API)
        request = structure_body(await read_json(), TokenCountRequest)
        tokenizer = _loaded_state(self._services).tokenizer
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
