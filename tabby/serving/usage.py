"""OpenAI wire shapes computed from generation results: usage, logprobs, metrics.

Usage follows reference §7.5 plus OpenAI's ``prompt_tokens_details.cached_tokens``: for
``n > 1`` the prompt counts once per prompt, completion tokens are summed, times are the
longest of the choices, and ``total_time`` is the request's own wall time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from tabby.config.schema import LoggingConfig
from tabby.http.openai.responses import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)
from tabby.jobs import Tokenizer, TokenLogprob
from tabby.serving.planning import GenerationPlan
from tabby.serving.running import ChoiceAccumulator
from tabby.serving.sampling import SamplerParams

__all__ = ["chat_logprobs", "completion_logprobs", "log_metrics", "log_request", "make_usage"]

log = logging.getLogger("tabby.metrics")

INDETERMINATE = "Indeterminate"


def _rate(tokens: int, seconds: float) -> float | str:
    return round(tokens / seconds, 2) if seconds > 0 else INDETERMINATE


def make_usage(
    plan: GenerationPlan, choices: Sequence[ChoiceAccumulator], total_time: float
) -> Usage:
    prompt_tokens = sum(len(p.ids) for p in plan.prompts)
    completion = sum(c.generated_tokens for c in choices)
    stats = [c.stats for c in choices if c.stats is not None]
    # The first choice of each prompt shows what the cache held for that prompt.
    cached = sum(
        c.stats.cached_tokens for c in choices if c.stats is not None and c.index % plan.n == 0
    )
    prompt_time = max((s.prefill_time for s in stats), default=0.0)
    completion_time = max((s.decode_time for s in stats), default=0.0)
    queue_time = max((s.queue_time for s in stats), default=0.0)
    new_prompt_tokens = max(prompt_tokens - cached, 0)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        queue_time=round(queue_time, 3),
        prompt_time=round(prompt_time, 3),
        prompt_tokens_per_sec=_rate(new_prompt_tokens, prompt_time),
        completion_time=round(completion_time, 3),
        completion_tokens_per_sec=_rate(max(s.generated_tokens for s in stats), completion_time)
        if stats
        else INDETERMINATE,
        total_time=round(total_time, 3),
    )


def log_request(
    logging_config: LoggingConfig, plan: GenerationPlan, request: SamplerParams
) -> None:
    """The ``log_prompt`` / ``log_generation_params`` lines, and samplers with no effect."""
    request_log = logging.getLogger("tabby.requests")
    if logging_config.log_prompt:
        for i, prompt in enumerate(plan.prompts):
            request_log.info("prompt %s[%d]: %s", plan.request_id, i, prompt.text)
    if logging_config.log_generation_params:
        job = plan.jobs[0]
        request_log.info(
            "generation %s: max_new_tokens=%d min_new_tokens=%d seed=%s stop=%r sampler=%r",
            plan.request_id, job.max_new_tokens, job.min_new_tokens, job.seed,
            job.stop_strings + tuple(str(i) for i in job.stop_token_ids), job.sampler,
        )  # fmt: skip
    ignored = request.ineffective_fields()
    if ignored:
        request_log.warning(
            "request %s: ignoring %s (no effect here)", plan.request_id, ", ".join(ignored)
        )


def log_metrics(plan: GenerationPlan, usage: Usage, *, endpoint: str) -> None:
    """The one metrics line per request."""
    log.info(
        "%s %s: %d prompt tokens (%d cached, %s T/s prefill), %d generated in %.2f s "
        "(%s T/s), queue %.2f s, total %.2f s, %d choices, context %d",
        endpoint,
        plan.request_id,
        usage.prompt_tokens,
        usage.prompt_tokens_details.cached_tokens,
        usage.prompt_tokens_per_sec,
        usage.completion_tokens,
        usage.completion_time,
        usage.completion_tokens_per_sec,
        usage.queue_time,
        usage.total_time,
        len(plan.jobs),
        max((len(p.ids) for p in plan.prompts), default=0) + usage.completion_tokens,
    )


def _bytes_of(tokenizer: Tokenizer) -> Callable[[int, str], list[int]]:
    """Token id → its exact bytes, where the tokenizer can tell (pieces escape bad UTF-8)."""
    exact = getattr(tokenizer, "token_bytes", None)

    def lookup(token_id: int, piece: str) -> list[int]:
        if exact is not None:
            return list(exact(token_id))
        return list(piece.encode("utf-8", errors="replace"))

    return lookup


def chat_logprobs(logprobs: Sequence[TokenLogprob], tokenizer: Tokenizer) -> ChatLogprobs:
    """The chat shape: ``{content: [{token, logprob, bytes, top_logprobs}]}``."""
    to_bytes = _bytes_of(tokenizer)
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=lp.token,
                logprob=lp.logprob,
                bytes=to_bytes(lp.token_id, lp.token),
                top_logprobs=[
                    TopLogprob(token=piece, logprob=value, bytes=to_bytes(token_id, piece))
                    for token_id, piece, value in lp.top
                ],
            )
            for lp in logprobs
        ]
    )


def completion_logprobs(logprobs: Sequence[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    """The legacy completions shape; ``offset`` is where the first token's text starts."""
    tokens: list[str] = []
    values: list[float] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for lp in logprobs:
        tokens.append(lp.token)
        values.append(lp.logprob)
        tops.append({piece: value for _id, piece, value in lp.top} if lp.top else None)
        offsets.append(offset)
        offset += len(lp.token)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets
    )
