"""From a validated OpenAI request to the generation jobs that answer it.

The pipeline (DESIGN.md, "Streaming chat completion"), up to the scheduler:

1. :func:`structure_request`: the active sampler preset is applied to the raw body
   (only there is "omitted" visible), then the body is validated into its request class.
2. :func:`serving_state_for`: the serving state, after the inline load that the
   ``model`` field may ask for; 503 when no model is loaded.
3. :func:`plan_completion` / :func:`plan_chat`: render the chat prompt with the model's
   template (its metadata stop strings join the request's), tokenize (BOS as the request
   or the tokenizer says), check that every prompt leaves room to generate
   (``ContextLengthExceeded`` before anything is queued or streamed), and build one
   :class:`GenerationJob` per choice: choice index = prompt index × n + choice number.
   The request's constraint is checked (400 naming the field) and put on every job
   with its own masker (:mod:`tabby.serving.structured`); chat requests also resolve their
   tool mode and reasoning tags (:mod:`tabby.serving.chat_options`), which can change the
   prompt (a forced call ends it with the tool tag), the stop strings and the
   constraint. Planning compiles constraints: run it in a worker thread.

Running the jobs and merging their streams is :mod:`tabby.serving.running`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import attrs

from tabby.backends.base import ModelInfo
from tabby.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    NoModelLoaded,
    Unprocessable,
)
from tabby.http.body import structure_body
from tabby.http.openai.requests import (
    MAX_CHOICES,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    OpenAIRequest,
)
from tabby.http.services import Services
from tabby.jobs import ConstraintSpec, GenerationJob, Tokenizer
from tabby.jobs.constraints import request_field, validate
from tabby.serving.chat_options import ChatOptions, chat_options, with_prompt
from tabby.serving.permission import Permission
from tabby.serving.ports import JobSubmitter
from tabby.serving.presets import apply_preset
from tabby.serving.sampling import SamplerParams
from tabby.serving.state import ServingState
from tabby.serving.structured import constrain_job, reasoning_end_for
from tabby.serving.structured import constraint_for as _constraint_for
from tabby.serving.templating import build_variables, strip_leading_bos
from tabby.serving.templating.environment import TemplateMetadata
from tabby.serving.tools import check_tool_messages, template_messages

__all__ = [
    "GenerationPlan",
    "PreparedPrompt",
    "constraint_for",
    "plan_chat",
    "plan_completion",
    "render_chat",
    "render_chat_prompt",
    "serving_state_for",
    "structure_request",
]

log = logging.getLogger(__name__)

R = TypeVar("R", bound=OpenAIRequest)


@attrs.frozen
class PreparedPrompt:
    text: str
    ids: tuple[int, ...]


@attrs.frozen
class GenerationPlan:
    """Everything needed to run one request and to describe its answer."""

    request_id: str
    model_name: str
    epoch: int
    tokenizer: Tokenizer = attrs.field(eq=False)
    prompts: tuple[PreparedPrompt, ...]
    jobs: tuple[GenerationJob, ...]  # in choice order
    n: int
    # Chat only: how the output is shaped (tool calls, reasoning).
    chat: ChatOptions | None = None
    # The scheduler of the model the plan was made for.
    scheduler: JobSubmitter | None = attrs.field(default=None, eq=False)

    def prompt_index(self, choice: int) -> int:
        return choice // self.n


# -- request and state ------------------------------------------------------------------


def structure_request(raw: Any, cls: type[R], state: ServingState) -> R:
    """``raw`` with the active preset applied, validated as ``cls`` (400 names the field)."""
    if not isinstance(raw, Mapping):
        raise InvalidRequest("the body must be a JSON object", code="invalid_body")
    return structure_body(apply_preset(raw, state.preset), cls)


async def serving_state_for(
    services: Services, request: OpenAIRequest, permission: Permission
) -> ServingState:
    """The state to generate with, after an inline load the ``model`` field asks for."""
    models = services.models
    if models is None:
        raise NoModelLoaded("no model is loaded")
    state: ServingState = models.serving_state()
    # Clients always send some model name; it matters only with inline loading on.
    inline = services.config.model.inline_model_loading
    if inline and request.model and request.model != state.model_name:
        state = await models.ensure_model(request.model, permission)
    if not state.loaded or state.tokenizer is None or state.model is None:
        raise NoModelLoaded("no model is loaded")
    return state


# -- structured output and tools ---------------------------------------------------------


def constraint_for(
    request: SamplerParams, state: ServingState | None = None
) -> ConstraintSpec | None:
    """The request's structured-output constraint, checked (400 names the field).

    ``{}`` is no constraint; see :mod:`tabby.serving.structured`.
    """
    return _constraint_for(request, state)


# -- prompts and jobs -------------------------------------------------------------------


def _encode(tokenizer: Tokenizer, info: ModelInfo, text: str, add_bos: bool) -> PreparedPrompt:
    text = strip_leading_bos(text, info.bos_token, add_bos)
    return PreparedPrompt(text, tuple(tokenizer.encode(text, add_bos=add_bos)))


def _build_jobs(
    request: OpenAIRequest,
    state: ServingState,
    request_id: str,
    prompts: Sequence[PreparedPrompt],
    *,
    param: str,
    extra_stops: Sequence[str] = (),
    constraint: ConstraintSpec | None = None,
    reasoning_end: str | None = None,
) -> tuple[GenerationJob, ...]:
    total = len(prompts) * request.n
    if total > MAX_CHOICES:
        raise InvalidRequest(
            f"{len(prompts)} prompts × n={request.n} is {total} choices; at most {MAX_CHOICES}",
            param="n",
        )
    jobs: list[GenerationJob] = []
    for p_idx, prompt in enumerate(prompts):
        try:
            base = request.build_job(
                job_id=request_id,
                prompt_ids=prompt.ids,
                max_seq_len=state.max_seq_len,
                extra_stop_strings=extra_stops,
            )
        except ContextLengthExceeded as exc:
            where = f"{param}[{p_idx}]" if len(prompts) > 1 else param
            raise ContextLengthExceeded(exc.message, param=where) from None
        for n_idx in range(request.n):
            index = p_idx * request.n + n_idx
            # Each choice gets its own seed, so n choices differ and each is reproducible.
            seed = None if base.seed is None else (base.seed + index) % 2**64
            job = attrs.evolve(base, job_id=f"{request_id}-{index}", seed=seed)
            jobs.append(constrain_job(job, constraint, state, reasoning_end=reasoning_end))
    return tuple(jobs)


def _plan(
    request: OpenAIRequest,
    state: ServingState,
    request_id: str,
    prompts: tuple[PreparedPrompt, ...],
    jobs: tuple[GenerationJob, ...],
    chat: ChatOptions | None = None,
) -> GenerationPlan:
    assert state.tokenizer is not None
    return GenerationPlan(
        request_id=request_id,
        model_name=state.model_name or (state.model.name if state.model else ""),
        epoch=state.epoch,
        tokenizer=state.tokenizer,
        prompts=prompts,
        jobs=jobs,
        n=request.n,
        chat=chat,
        scheduler=state.scheduler,
    )


def plan_completion(
    request: CompletionRequest, state: ServingState, request_id: str
) -> GenerationPlan:
    info, tokenizer = state.model, state.tokenizer
    assert info is not None
    assert tokenizer is not None
    add_bos = info.add_bos_token if request.add_bos_token is None else request.add_bos_token
    prompts = tuple(_encode(tokenizer, info, text, add_bos) for text in request.prompts)
    spec = constraint_for(request, state)
    jobs = _build_jobs(request, state, request_id, prompts, param="prompt", constraint=spec)
    return _plan(request, state, request_id, prompts, jobs)


def _message_dict(message: ChatMessage, index: int, vision: bool) -> dict[str, Any]:
    content = message.content
    if isinstance(content, tuple):
        for j, part in enumerate(content):
            where = f"messages[{index}].content[{j}]"
            if part.type == "image_url" and not vision:
                raise InvalidRequest(
                    "image inputs need a model loaded with vision; this one has none",
                    param=where,
                    code="vision_not_supported",
                )
            if part.type != "text" or part.text is None:
                raise InvalidRequest(
                    f'content parts of type "{part.type}" are not supported', param=where
                )
    data: dict[str, Any] = attrs.asdict(message, recurse=True)
    if isinstance(content, tuple):
        data["content"] = [{"type": "text", "text": part.text} for part in content]
    if data.get("tool_calls"):
        # Templates get each call's arguments as an object, not JSON text.
        data["tool_calls"] = template_messages([data])[0]["tool_calls"]
    return data


def _final_text(message: ChatMessage) -> str:
    content = message.content
    if isinstance(content, tuple):
        return "\n".join(part.text or "" for part in content)
    return content or ""


def render_chat(request: ChatCompletionRequest, state: ServingState) -> tuple[str, tuple[str, ...]]:
    """The rendered prompt and the template's stop strings (``tool_start`` included)."""
    text, meta = render_chat_prompt(request, state)
    return text, meta.stop_strings + ((meta.tool_start,) if meta.tool_start else ())


def render_chat_prompt(
    request: ChatCompletionRequest, state: ServingState
) -> tuple[str, TemplateMetadata]:
    """The rendered prompt and the template's metadata."""
    info, template = state.model, state.template
    assert info is not None
    if template is None:
        raise Unprocessable(
            "chat completions need a chat template; the loaded model has none "
            "(load one with /v1/template/switch)",
            code="no_chat_template",
        )
    continuing = request.continue_final_message
    if continuing and request.add_generation_prompt:
        raise Unprocessable(
            "continue_final_message needs add_generation_prompt: false",
            param="continue_final_message",
        )
    if continuing and not _final_text(request.messages[-1]):
        raise Unprocessable(
            "continue_final_message needs a final message with text",
            param=f"messages[{len(request.messages) - 1}].content",
        )
    check_tool_messages(request.messages)
    vision = info.capabilities.vision
    messages = [_message_dict(m, i, vision) for i, m in enumerate(request.messages)]
    template_vars = {**request.reasoning_variables(), **request.template_vars}
    variables = build_variables(
        messages,
        bos_token=info.bos_token,
        eos_token=info.eos_token,
        pad_token=info.pad_token,
        unk_token=info.unk_token,
        add_generation_prompt=request.add_generation_prompt,
        tools=request.tools,
        functions=request.functions,
        template_vars=template_vars,
    )
    rendered = template.render_with_metadata(variables)
    text = rendered.text
    if continuing:
        # Cut what the template adds after the last message (its end-of-turn marker).
        final = _final_text(request.messages[-1])
        at = text.rfind(final)
        if at >= 0:
            text = text[: at + len(final)]
    if request.response_prefix:
        if request.add_generation_prompt or continuing:
            text += request.response_prefix
        else:
            log.warning("response_prefix ignored: add_generation_prompt is false")
    return text, rendered.metadata


def _chat_constraint(
    request: ChatCompletionRequest, state: ServingState, options: ChatOptions
) -> tuple[ConstraintSpec | None, str | None]:
    """The chat jobs' constraint and where it arms (after the reasoning, if any)."""
    spec = constraint_for(request, state)
    if options.tools == "forced":
        if spec is not None:
            field = request_field(spec)
            raise InvalidRequest(
                f"{field} cannot be combined with a tool_choice that forces a call",
                param=field,
            )
        tool_spec = options.tool_constraint()
        assert tool_spec is not None
        validate(tool_spec, state.constraints)
        return tool_spec, None
    tags = options.reasoning
    if spec is None or tags is None:
        return spec, None
    return spec, reasoning_end_for(spec, tags.start, tags.end)


def plan_chat(
    request: ChatCompletionRequest, state: ServingState, request_id: str
) -> GenerationPlan:
    """The chat jobs; constraint maskers are compiled here, so call it from a worker
    thread when the request may be constrained (see :mod:`tabby.serving.structured`)."""
    info, tokenizer = state.model, state.tokenizer
    assert info is not None
    assert tokenizer is not None
    text, meta = render_chat_prompt(request, state)
    options = chat_options(
        tools=request.tools,
        tool_choice=request.tool_choice,
        parallel_tool_calls=request.parallel_tool_calls,
        settings=state.settings,
        template_tool_start=meta.tool_start,
    )
    stops = meta.stop_strings
    if options.tools == "template" and options.tool_start:
        stops += (options.tool_start,)
    if options.tools == "forced" and options.tool_start:
        text += options.tool_start
    options = with_prompt(
        options,
        text,
        state.settings,
        add_bos=info.add_bos_token,
        max_seq_len=state.max_seq_len,
        compiler=state.constraints,
    )
    spec, reasoning_end = _chat_constraint(request, state, options)
    # Chat requests never choose BOS: the model's tokenizer settings do.
    prompts = (_encode(tokenizer, info, text, info.add_bos_token),)
    jobs = _build_jobs(
        request, state, request_id, prompts, param="messages", extra_stops=stops,
        constraint=spec, reasoning_end=reasoning_end,
    )  # fmt: skip
    return _plan(request, state, request_id, prompts, jobs, options)
