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

Optional abilities are declared in ``info.capabilities``, and callers decide by those
flags, never by looking for methods. One of them adds a method: a backend whose
``capabilities.handoff`` is set also implements :class:`HandoffStep`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol, cast

import attrs

from tabby.jobs import GenerationJob, JobResult, Tokenizer

__all__ = [
    "Backend",
    "BackendStats",
    "Capabilities",
    "DraftSpec",
    "HandoffStep",
    "LoadProgress",
    "LoadSpec",
    "LoraSpec",
    "ModelInfo",
    "ProgressCallback",
    "handoff_step",
]


@attrs.frozen
class Capabilities:
    vision: bool = False
    lora: bool = False
    draft: bool = False
    logprobs: bool = True
    constraints: bool = True
    # The step has a hand-off point: the backend implements HandoffStep.
    handoff: bool = False


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


class HandoffStep(Backend, Protocol):
    """A backend whose step has a hand-off point (``capabilities.handoff``).

    ``step_with_handoff(handoff)`` is one ``step`` that calls ``handoff()`` once, right
    before a long native computation that needs no Python (the reference engine: its LM
    head), so the event loop's work done then does not stall the step's Python between
    kernels. The GenerationScheduler sends the previous step's text to the clients at
    that point when many streams run (see ``tabby.actors.scheduler``). A step with
    nothing to run may return without calling it.
    """

    def step_with_handoff(self, handoff: Callable[[], None]) -> list[JobResult]: ...


def handoff_step(backend: Backend) -> HandoffStep | None:
    """``backend`` as a :class:`HandoffStep` when its capabilities declare a hand-off
    point, else None."""
    if backend.info.capabilities.handoff:
        # The flag is the backend's promise that it implements the protocol.
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
