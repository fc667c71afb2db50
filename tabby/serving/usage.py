"""What a request cost: token counts and timings, and the request and metrics log lines.

The figures follow reference §7.5 (plus the cached prompt tokens): for ``n > 1`` the
prompt counts once per prompt, completion tokens are summed (second, tool-call passes
included), times are the longest of the choices, and ``total_time`` is the request's
own wall time. Each protocol renders :class:`UsageStats` in its own shape.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import attrs

from tabby.config.schema import LoggingConfig
from tabby.serving.planning import GenerationPlan
from tabby.serving.running import ChoiceAccumulator

__all__ = ["INDETERMINATE", "UsageStats", "log_metrics", "log_request", "make_usage"]

log = logging.getLogger("tabby.metrics")

# A rate whose time is 0 (nothing was measured).
INDETERMINATE = "Indeterminate"


@attrs.frozen
class UsageStats:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the cache
    queue_time: float  # seconds waiting for a batch slot (longest choice)
    prompt_time: float
    prompt_tokens_per_sec: float | str  # or INDETERMINATE
    completion_time: float
    completion_tokens_per_sec: float | str
    total_time: float

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def with_extra_tokens(self, extra: int) -> UsageStats:
        """These figures with ``extra`` generated tokens (second passes) added."""
        if not extra:
            return self
        return attrs.evolve(self, completion_tokens=self.completion_tokens + extra)


def _rate(tokens: int, seconds: float) -> float | str:
    return round(tokens / seconds, 2) if seconds > 0 else INDETERMINATE


def make_usage(
    plan: GenerationPlan, choices: Sequence[ChoiceAccumulator], total_time: float
) -> UsageStats:
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
    return UsageStats(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        cached_tokens=cached,
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
    logging_config: LoggingConfig, plan: GenerationPlan, ignored_fields: Sequence[str]
) -> None:
    """The ``log_prompt`` / ``log_generation_params`` lines, and fields with no effect."""
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
    if ignored_fields:
        request_log.warning(
            "request %s: ignoring %s (no effect here)", plan.request_id, ", ".join(ignored_fields)
        )


def log_metrics(plan: GenerationPlan, usage: UsageStats, *, endpoint: str) -> None:
    """The one metrics line per request."""
    log.info(
        "%s %s: %d prompt tokens (%d cached, %s T/s prefill), %d generated in %.2f s "
        "(%s T/s), queue %.2f s, total %.2f s, %d choices, context %d",
        endpoint,
        plan.request_id,
        usage.prompt_tokens,
        usage.cached_tokens,
        usage.prompt_tokens_per_sec,
        usage.completion_tokens,
        usage.completion_time,
        usage.completion_tokens_per_sec,
        usage.queue_time,
        usage.total_time,
        len(plan.jobs),
        max((len(p.ids) for p in plan.prompts), default=0) + usage.completion_tokens,
    )
