"""The job vocabulary every layer shares: what a generation job is and what it yields.

A :class:`GenerationJob` is backend-neutral (token ids, sampler settings, stops, bans,
constraint, logprobs, seed); each backend turns it into its own job and reports
:class:`JobResult` items as it steps. :class:`Tokenizer` is the view of a model's
tokenizer that the layers above the backends use. This module sits at the bottom of the
layers (above ``config`` only): the engine, the backends, the serving core and the
actors all speak it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "ConstraintSpec",
    "FinishReason",
    "GenerationJob",
    "JobResult",
    "JobStats",
    "SamplerSettings",
    "StopReason",
    "TokenLogprob",
    "TokenMasker",
    "Tokenizer",
]

FinishReason = Literal["stop", "length", "tool_calls"]
# Why a job ended, in more detail than the OpenAI finish_reason.
StopReason = Literal[
    "stop_token",
    "stop_string",
    "max_new_tokens",
    "context_length",
    "constraint",
    "cancelled",
]


@attrs.frozen
class SamplerSettings:
    """Per-job sampler settings. Defaults are neutral (they change nothing)."""

    temperature: float = 1.0  # 0 = greedy
    temperature_last: bool = False
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    typical: float = 1.0
    top_a: float = 0.0
    tfs: float = 1.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    # Dynamic temperature is active only when max_temp > min_temp.
    min_temp: float = 1.0
    max_temp: float = 1.0
    temp_exponent: float = 1.0
    smoothing_factor: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_range: int = -1  # -1 = whole context
    repetition_decay: int = 0
    dry_multiplier: float = 0.0  # > 0 enables DRY
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_range: int = 0  # 0 = unlimited
    dry_sequence_breakers: tuple[str, ...] = ()
    mirostat_mode: int = 0  # only 2 is honoured
    mirostat_tau: float = 1.5
    mirostat_eta: float = 0.3
    logit_bias: tuple[tuple[int, float], ...] = ()
    banned_tokens: tuple[int, ...] = ()
    allowed_tokens: tuple[int, ...] = ()  # empty = all allowed
    ban_eos_token: bool = False


@attrs.frozen
class ConstraintSpec:
    """A structured-output constraint, compiled by each backend with llguidance."""

    kind: Literal["json_schema", "regex", "lark", "gbnf"]
    source: str  # the JSON schema text, regex, or grammar
    # The request field it came from, for error messages (e.g. "response_format").
    param: str | None = None


@runtime_checkable
class TokenMasker(Protocol):
    """Per-job token-mask hook used by the reference engine's sampler."""

    def allowed(self) -> Sequence[int] | Tensor | None:
        """Allowed token ids for the next position, or None for no restriction.

        A bool tensor (True = allowed, at least as long as the logits row) is the fast
        form for large vocabularies.
        """

    def consume(self, token_id: int) -> None:
        """Advance the constraint by the sampled token."""

    def is_finished(self) -> bool:
        """True when the constraint is complete and the job must end."""


@attrs.frozen
class GenerationJob:
    job_id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampler: SamplerSettings = SamplerSettings()
    min_new_tokens: int = 0
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's EOS ids
    banned_strings: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per position when logprobs is on
    constraint: ConstraintSpec | None = None
    masker: TokenMasker | None = attrs.field(default=None, eq=False)
    # Number of tokens (from the start) whose text was already shown to the user,
    # e.g. a response prefix; kept for adapters that need it.
    embeddings: tuple[object, ...] = attrs.field(default=(), eq=False)


@attrs.frozen
class TokenLogprob:
    token_id: int
    token: str  # the token's text piece
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token_id, piece, logprob), best first


@attrs.frozen
class JobStats:
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    queue_time: float  # seconds from enqueue to first prefill step
    prefill_time: float
    decode_time: float


@attrs.frozen
class JobResult:
    job_id: str
    text: str = ""  # new text since the last result; stop-string safe
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: StopReason | None = None
    stop_str: str | None = None  # the stop string or token text that ended the job
    stats: JobStats | None = None
    # Set (with finished=True) when the backend failed this job alone; the scheduler
    # ends its stream with Failed(GenerationFailed(error)).
    error: str | None = None


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, *, add_bos: bool = False, encode_special: bool = True) -> list[int]:
        ...

    def decode(self, ids: Sequence[int], *, decode_special: bool = True) -> str: ...

    def piece(self, token_id: int) -> str:
        """The text of one token, for logprobs (bytes that are not valid UTF-8 shown escaped)."""
        ...
