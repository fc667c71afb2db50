"""The generation backend contract.

A backend is a plain, synchronous object used only from the GenerationScheduler's
worker thread (never from the event loop, never from two threads at once):

    backend.enqueue(job)        # may raise ContextLengthExceeded / InvalidRequest up front
    backend.cancel(job_id)      # frees the job's cache pages; unknown ids are ignored
    results = backend.step()    # one forward pass for every live job (continuous batching)
    backend.has_work()
    backend.statistics()
    backend.close()

``GenerationJob`` is backend-neutral: the exllama adapters translate it into their
own job objects; the reference engine takes it as is. Each call to ``step`` returns
at most one ``JobResult`` per job that made progress; the last one for a job has
``finished=True`` and carries ``stats``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, cast, runtime_checkable

import attrs

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "Backend",
    "BackendStats",
    "Capabilities",
    "ConstraintSpec",
    "DraftSpec",
    "FinishReason",
    "GenerationJob",
    "HandoffStep",
    "JobResult",
    "JobStats",
    "LoadProgress",
    "LoadSpec",
    "LoraSpec",
    "ModelInfo",
    "ProgressCallback",
    "SamplerSettings",
    "StopReason",
    "TokenLogprob",
    "TokenMasker",
    "Tokenizer",
    "handoff_step",
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


@attrs.frozen
class Capabilities:
    vision: bool = False
    lora: bool = False
    draft: bool = False
    logprobs: bool = True
    constraints: bool = True


@attrs.frozen
class ModelInfo:
    name: str
    backend: str
    max_seq_len: int
    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos_token: bool = True
    chat_template: str | None = None
    cache_size: int = 0
    cache_mode: str = "FP16"
    max_batch_size: int = 1
    chunk_size: int = 2048
    capabilities: Capabilities = Capabilities()
    path: str | None = None


@attrs.frozen
class BackendStats:
    live_jobs: int
    waiting_jobs: int
    last_batch_size: int
    cache_pages_total: int
    cache_pages_used: int
    page_size: int
    tokens_generated: int  # since load


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, *, add_bos: bool = False, encode_special: bool = True) -> list[int]:
        ...

    def decode(self, ids: Sequence[int], *, decode_special: bool = True) -> str: ...

    def piece(self, token_id: int) -> str:
        """The text of one token, for logprobs (bytes that are not valid UTF-8 shown escaped)."""
        ...


class Backend(Protocol):
    @property
    def info(self) -> ModelInfo: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    def enqueue(self, job: GenerationJob) -> None: ...

    def cancel(self, job_id: str) -> None: ...

    def step(self) -> list[JobResult]: ...

    def has_work(self) -> bool: ...

    def statistics(self) -> BackendStats: ...

    def close(self) -> None: ...


class HandoffStep(Protocol):
    """A backend whose step has a hand-off point: ``handoff()`` is called once per step,
    right before a long native computation that needs no Python (the reference engine:
    its LM head), so the event loop's work done then does not stall the step's Python
    between kernels. The GenerationScheduler sends the previous step's text to the
    clients at that point when many streams run (see ``tabby.actors.scheduler``).
    """

    def step_with_handoff(self, handoff: Callable[[], None]) -> list[JobResult]: ...


def handoff_step(backend: Backend) -> HandoffStep | None:
    """``backend`` as a :class:`HandoffStep`, or None when its step has no hand-off point."""
    if callable(getattr(backend, "step_with_handoff", None)):
        return cast(HandoffStep, backend)
    return None


@attrs.frozen
class LoadProgress:
    """One progress event of a load: module i of n of one component."""

    model_type: Literal["model", "draft", "vision"]
    module: int
    modules: int
    status: Literal["processing", "finished"] = "processing"


ProgressCallback = Callable[[LoadProgress], None]


@attrs.frozen
class DraftSpec:
    path: Path
    name: str
    rope_scale: float | None = None
    rope_alpha: float | None = None
    cache_mode: str = "FP16"
    gpu_split: tuple[float, ...] = ()
    num_tokens: int | None = None


@attrs.frozen
class LoraSpec:
    path: Path
    name: str
    scaling: float = 1.0


@attrs.frozen
class LoadSpec:
    """Everything a backend needs to load one model: settings already merged."""

    path: Path  # a model folder or a .gguf file
    name: str
    max_seq_len: int | None = None  # None = the model's own
    cache_size: int | None = None  # None = max_seq_len (times batch where the backend needs it)
    cache_mode: str = "FP16"
    chunk_size: int = 2048
    max_batch_size: int | None = None  # None = backend default
    dtype: str = "auto"
    threads: int = 0  # 0 = auto
    device: str = "auto"
    gpu_split_auto: bool = True
    gpu_split: tuple[float, ...] = ()
    autosplit_reserve: tuple[int, ...] = (96,)
    tensor_parallel: bool = False
    rope_scale: float | None = None
    rope_alpha: float | None = None
    vision: bool = False
    draft: DraftSpec | None = None
    loras: tuple[LoraSpec, ...] = ()
