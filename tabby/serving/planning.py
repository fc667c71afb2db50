"""From a neutral request (:mod:`tabby.serving.requests`) to the jobs that answer it.

Each protocol has validated its body (with the active sampler preset applied first) and
mapped it onto a :class:`~tabby.serving.requests.ChatRequest` or
:class:`~tabby.serving.requests.CompletionRequest`; :mod:`tabby.serving.generate`
resolved the serving state. Then:

* :func:`plan_completion` / :func:`plan_chat`: render the chat prompt with the model's
   template (its metadata stop strings join the request's; tools and earlier calls the
   template would not show are written in, :mod:`tabby.serving.tools.prompt`), tokenize (BOS as the request
   or the tokenizer says), check that every prompt leaves room to generate
   (``ContextLengthExceeded`` before anything is queued or streamed; a completion that
   asks for it is trimmed from the front instead), and build one
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
from collections.abc import Sequence
from typing import Any

import attrs

from tabby.backends.base import ModelInfo
from tabby.backends.constraints import request_field, validate
from tabby.errors import ContextLengthExceeded, InvalidRequest, Unprocessable
from tabby.jobs import ConstraintSpec, GenerationJob, SamplerSettings, Tokenizer
from tabby.serving.chat_options import ChatOptions, chat_options, with_prompt
from tabby.serving.ports import JobSubmitter
from tabby.serving.requests import (
    MAX_CHOICES,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
)
from tabby.serving.state import ServingState
from tabby.serving.structured import constrain_job, constraint_for, reasoning_end_for
from tabby.serving.templating import build_variables, strip_leading_bos
from tabby.serving.templating.environment import TemplateMetadata
from tabby.serving.tools import (
    FORMATS,
    ToolFormat,
    check_tool_messages,
    prompt_format,
    tool_policy,
    tool_prompt,
    with_tool_prompt,
    with_written_calls,
)

__all__ = [
    "GenerationPlan",
    "PreparedPrompt",
    "fit_prompt",
    "plan_chat",
    "plan_completion",
    "render_chat",
    "render_chat_prompt",
]

log = logging.getLogger(__name__)


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


# -- prompts and jobs -------------------------------------------------------------------


def _encode(tokenizer: Tokenizer, info: ModelInfo, text: str, add_bos: bool) -> PreparedPrompt:
    text = strip_leading_bos(text, info.bos_token, add_bos)
    return PreparedPrompt(text, tuple(tokenizer.encode(text, add_bos=add_bos)))


def _utf8_size(text: str, limit: int) -> int:
    """``text``'s UTF-8 size, or any number over ``limit`` when it is surely over."""
    if len(text) > limit or 4 * len(text) <= limit:
        return len(text)  # bytes >= characters, and a character is at most 4 bytes
    return len(text.encode("utf-8", "surrogatepass"))


def _check_prompt_size(text: str, state: ServingState, *, param: str) -> None:
    """A prompt too large to fit the context whatever its tokens is a 400 before any
    tokenizing (see :attr:`ServingState.prompt_byte_limit`)."""
    limit = state.prompt_byte_limit
    if limit and _utf8_size(text, limit) > limit:
        raise ContextLengthExceeded(
            f"the prompt is over {limit} bytes, more than the context of {state.max_seq_len} "
            "tokens can hold",
            param=param,
        )


def tail_within(text: str, limit: int) -> str:
    """The end of ``text`` within about ``limit`` bytes (whole characters)."""
    if _utf8_size(text, limit) <= limit:
        return text
    return text.encode("utf-8", "surrogatepass")[-limit:].decode("utf-8", "ignore")


def _check_token_ids(sampler: SamplerSettings, state: ServingState) -> None:
    """Token ids the request names must exist in the model's vocabulary (400 otherwise)."""
    vocab = state.model.vocab_size if state.model is not None else 0
    if vocab <= 0:
        return
    named = (
        ("logit_bias", [token for token, _ in sampler.logit_bias]),
        ("banned_tokens", list(sampler.banned_tokens)),
        ("allowed_tokens", list(sampler.allowed_tokens)),
    )
    for field, ids in named:
        outside = [token for token in ids if token >= vocab]
        if outside:
            raise InvalidRequest(
                f"token id {outside[0]} is not in the model's vocabulary (0..{vocab - 1})",
                param=field,
            )


def _build_jobs(
    request: GenerationRequest,
    state: ServingState,
    request_id: str,
    prompts: Sequence[PreparedPrompt],
    *,
    param: str,
    max_seq_len: int,
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
            base = request.sampling.build_job(
                job_id=request_id,
                prompt_ids=prompt.ids,
                max_seq_len=max_seq_len,
                extra_stop_strings=extra_stops,
                default_max_tokens=state.settings.default_max_tokens,
            )
        except ContextLengthExceeded as exc:
            where = f"{param}[{p_idx}]" if len(prompts) > 1 else param
            raise ContextLengthExceeded(exc.message, param=where) from None
        if p_idx == 0:
            _check_token_ids(base.sampler, state)
        for n_idx in range(request.n):
            index = p_idx * request.n + n_idx
            # Each choice gets its own seed, so n choices differ and each is reproducible.
            seed = None if base.seed is None else (base.seed + index) % 2**64
            job = attrs.evolve(base, job_id=f"{request_id}-{index}", seed=seed)
            jobs.append(constrain_job(job, constraint, state, reasoning_end=reasoning_end))
    return tuple(jobs)


def _plan(
    request: GenerationRequest,
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


def _trimmed(
    request: CompletionRequest, state: ServingState, request_id: str, add_bos: bool
) -> tuple[PreparedPrompt, int]:
    """The one prompt, trimmed from the front to fit, and the context it must fit."""
    info, tokenizer = state.model, state.tokenizer
    assert info is not None
    assert tokenizer is not None
    if len(request.prompts) != 1:
        raise InvalidRequest("only a single prompt can be trimmed to fit", param="prompt")
    # Trimmed from the front anyway: only the end that could fit is tokenized.
    text = request.prompts[0]
    if state.prompt_byte_limit:
        text = tail_within(text, state.prompt_byte_limit)
    prompt = _encode(tokenizer, info, text, add_bos)
    context = state.max_seq_len
    if request.context_limit is not None:
        context = min(context, request.context_limit)
    max_new = request.sampling.max_tokens or 0
    fitted = fit_prompt(prompt.ids, context, max_new, info.bos_token_id)
    if len(fitted) == len(prompt.ids):
        return prompt, context
    log.info(
        "request %s: prompt trimmed from %d to %d tokens to fit a context of %d",
        request_id, len(prompt.ids), len(fitted), context,
    )  # fmt: skip
    return PreparedPrompt(tokenizer.decode(fitted, decode_special=False), fitted), context


def plan_completion(
    request: CompletionRequest, state: ServingState, request_id: str
) -> GenerationPlan:
    info, tokenizer = state.model, state.tokenizer
    assert info is not None
    assert tokenizer is not None
    requested_bos = request.sampling.add_bos_token
    add_bos = info.add_bos_token if requested_bos is None else requested_bos
    if request.trim_prompt:
        prompt, context = _trimmed(request, state, request_id, add_bos)
        prompts: tuple[PreparedPrompt, ...] = (prompt,)
    else:
        for index, text in enumerate(request.prompts):
            where = f"prompt[{index}]" if len(request.prompts) > 1 else "prompt"
            _check_prompt_size(text, state, param=where)
        prompts = tuple(_encode(tokenizer, info, text, add_bos) for text in request.prompts)
        context = state.max_seq_len
    spec = constraint_for(request, state)
    jobs = _build_jobs(
        request, state, request_id, prompts, param="prompt", max_seq_len=context,
        constraint=spec,
    )  # fmt: skip
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
    return data


def _final_text(message: ChatMessage) -> str:
    content = message.content
    if isinstance(content, tuple):
        return "\n".join(part.text or "" for part in content)
    return content or ""


def _call_format(state: ServingState) -> ToolFormat | None:
    template = state.template
    assert template is not None
    return prompt_format(
        state.settings.tool_format, template.source, takes_tools=template.takes_tools
    )


def _with_tools_shown(
    messages: list[dict[str, Any]], request: ChatRequest, state: ServingState
) -> list[dict[str, Any]]:
    """The messages with the tools and earlier calls written in where the template would
    not show them (see :mod:`tabby.serving.tools.prompt`)."""
    template = state.template
    assert template is not None
    fmt = _call_format(state) or FORMATS["hermes"]
    if not template.takes_tools:
        policy = tool_policy(request.tools, request.tool_choice, request.parallel_tool_calls)
        if policy.mode != "none":
            messages = with_tool_prompt(messages, tool_prompt(policy.tools, fmt))
    if not template.renders_tool_calls:
        messages = with_written_calls(messages, fmt)
    return messages


def render_chat(request: ChatRequest, state: ServingState) -> tuple[str, tuple[str, ...]]:
    """The rendered prompt and the template's stop strings (``tool_start`` included)."""
    text, meta = render_chat_prompt(request, state)
    return text, meta.stop_strings + ((meta.tool_start,) if meta.tool_start else ())


def render_chat_prompt(
    request: ChatRequest, state: ServingState
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
    variables = build_variables(
        messages,
        bos_token=info.bos_token,
        eos_token=info.eos_token,
        pad_token=info.pad_token,
        unk_token=info.unk_token,
        add_generation_prompt=request.add_generation_prompt,
        tools=request.tools,
        functions=request.functions,
        template_vars=dict(request.template_vars),
    )
    variables["messages"] = _with_tools_shown(variables["messages"], request, state)
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
    request: ChatRequest, state: ServingState, options: ChatOptions
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


def plan_chat(request: ChatRequest, state: ServingState, request_id: str) -> GenerationPlan:
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
        call_format=_call_format(state),
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
    _check_prompt_size(text, state, param="messages")
    # Chat requests never choose BOS: the model's tokenizer settings do.
    prompts = (_encode(tokenizer, info, text, info.add_bos_token),)
    jobs = _build_jobs(
        request, state, request_id, prompts, param="messages", max_seq_len=state.max_seq_len,
        extra_stops=stops, constraint=spec, reasoning_end=reasoning_end,
    )  # fmt: skip
    return _plan(request, state, request_id, prompts, jobs, options)
