"""A zero-cost scripted backend: a test and benchmark fixture, not a model.

It implements the :class:`tabby.backends.base.Backend` protocol without any model: each
job "generates" a scripted text one byte per token, instantly, so tests can drive the
scheduler and the HTTP layer exactly, and the server benchmark can measure the HTTP
layer's own ceiling. The tokenizer is one byte per token (ids 0..255) plus a BOS (256)
and an EOS (257) id.

What it honours: continuous batching up to ``max_batch_size`` live jobs (the others
wait), cancellation, ``max_new_tokens`` (finish ``length``), the end of the script
(finish ``stop`` by EOS), stop strings (text is held back while it could still become a
stop string), a paged-cache account (``page_size`` tokens per page) and a prompt-length
check. Failures can be injected into ``enqueue``, ``step`` and single jobs, and
``before_step`` (called in the worker thread at the start of every step, e.g. a
``threading.Semaphore().acquire``) lets a test hold steps until it releases them.
``Capabilities(handoff=True)`` makes it declare a hand-off point, at the start of each step.
"""

from __future__ import annotations

import codecs
import math
import time
from collections.abc import Callable, Sequence

import attrs

from tabby.backends.base import (
    BackendStats,
    Capabilities,
    LoadProgress,
    LoadSpec,
    ModelInfo,
    ProgressCallback,
)
from tabby.errors import ContextLengthExceeded
from tabby.jobs import FinishReason, GenerationJob, JobResult, JobStats, StopReason

__all__ = [
    "BOS_ID",
    "DEFAULT_SCRIPT",
    "EOS_ID",
    "ByteTokenizer",
    "ScriptedBackend",
    "load",
]

BOS_ID = 256
EOS_ID = 257
VOCAB_SIZE = 258
DEFAULT_SCRIPT = "The quick brown fox jumps over the lazy dog. " * 4
# Modules reported while "loading", so progress streams have something to show.
LOAD_MODULES = 3

Script = str | Callable[[GenerationJob], str]


class ByteTokenizer:
    """One token per UTF-8 byte; BOS and EOS above the byte range."""

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def encode(self, text: str, *, add_bos: bool = False, encode_special: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [BOS_ID, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int], *, decode_special: bool = True) -> str:
        data = bytes(i for i in ids if i < 256)
        text = data.decode("utf-8", errors="replace")
        if decode_special:
            specials = {BOS_ID: "<s>", EOS_ID: "</s>"}
            prefix = "".join(specials[i] for i in ids[:1] if i in specials)
            return prefix + text
        return text

    def piece(self, token_id: int) -> str:
        if token_id == BOS_ID:
            return "<s>"
        if token_id == EOS_ID:
            return "</s>"
        return chr(token_id) if token_id < 128 else f"<0x{token_id:02X}>"


@attrs.define
class _Job:
    job: GenerationJob
    output: bytes
    enqueued_at: float
    started_at: float | None = None
    generated: int = 0
    held: str = ""  # decoded text not yet released (could still become a stop string)
    decoder: codecs.IncrementalDecoder = attrs.Factory(
        lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )


class ScriptedBackend:
    """See the module docstring. Used only from the scheduler's worker thread."""

    def __init__(
        self,
        *,
        name: str = "scripted",
        script: Script = DEFAULT_SCRIPT,
        max_seq_len: int = 4096,
        max_batch_size: int = 8,
        page_size: int = 16,
        cache_pages: int = 1024,
        tokens_per_step: int = 1,
        capabilities: Capabilities | None = None,
        fail_enqueue: Callable[[GenerationJob], Exception | None] | None = None,
        before_step: Callable[[], object] | None = None,
        path: str | None = None,
    ) -> None:
        self._info = ModelInfo(
            name=name,
            backend="scripted",
            max_seq_len=max_seq_len,
            vocab_size=VOCAB_SIZE,
            bos_token_id=BOS_ID,
            eos_token_ids=(EOS_ID,),
            bos_token="<s>",
            eos_token="</s>",
            cache_size=cache_pages * page_size,
            max_batch_size=max_batch_size,
            capabilities=capabilities if capabilities is not None else Capabilities(),
            path=path,
        )
        self._tokenizer = ByteTokenizer()
        self._script = script
        self._page_size = page_size
        self._cache_pages = cache_pages
        self._tokens_per_step = tokens_per_step
        self._fail_enqueue = fail_enqueue
        self._before_step = before_step
        self._step_failures: list[Exception] = []
        self._job_failures: dict[str, str] = {}
        self._waiting: dict[str, _Job] = {}
        self._live: dict[str, _Job] = {}
        self._last_batch = 0
        self._tokens_generated = 0
        self.steps = 0
        self.closed = False
        self.cancelled: list[str] = []  # every job id ever cancelled, for tests

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def tokenizer(self) -> ByteTokenizer:
        return self._tokenizer

    def fail_next_steps(self, error: Exception, count: int = 1) -> None:
        """Make the next ``count`` calls of ``step`` raise ``error``."""
        self._step_failures.extend([error] * count)

    def fail_job(self, job_id: str, message: str) -> None:
        """Make the next step end ``job_id`` alone with ``JobResult.error``."""
        self._job_failures[job_id] = message

    def enqueue(self, job: GenerationJob) -> None:
        if self._fail_enqueue is not None:
            error = self._fail_enqueue(job)
            if error is not None:
                raise error
        if len(job.prompt_ids) >= self._info.max_seq_len:
            raise ContextLengthExceeded(
                f"the prompt is {len(job.prompt_ids)} tokens, the model's context is "
                f"{self._info.max_seq_len} tokens",
                param="prompt",
            )
        text = self._script if isinstance(self._script, str) else self._script(job)
        self._waiting[job.job_id] = _Job(job, text.encode("utf-8"), time.monotonic())

    def cancel(self, job_id: str) -> None:
        if self._waiting.pop(job_id, None) or self._live.pop(job_id, None):
            self.cancelled.append(job_id)

    def has_work(self) -> bool:
        return bool(self._waiting or self._live)

    def step(self) -> list[JobResult]:
        if self._before_step is not None:
            self._before_step()
        self.steps += 1
        if self._step_failures:
            raise self._step_failures.pop(0)
        while self._waiting and len(self._live) < self._info.max_batch_size:
            job_id = next(iter(self._waiting))
            entry = self._waiting.pop(job_id)
            entry.started_at = time.monotonic()
            self._live[job_id] = entry
        self._last_batch = len(self._live)
        results = [
            JobResult(entry.job.job_id, finished=True, error=self._job_failures.pop(job_id))
            if job_id in self._job_failures
            else self._advance(entry)
            for job_id, entry in list(self._live.items())
        ]
        for result in results:
            if result.finished:
                del self._live[result.job_id]
        return results

    def step_with_handoff(self, handoff: Callable[[], None]) -> list[JobResult]:
        """A step whose hand-off point comes first; the scheduler uses it only when the
        backend was made with ``Capabilities(handoff=True)``."""
        handoff()
        return self.step()

    def _advance(self, entry: _Job) -> JobResult:
        job = entry.job
        start = entry.generated
        budget = min(self._tokens_per_step, job.max_new_tokens - start)
        new = entry.output[start : start + budget]
        entry.generated += len(new)
        self._tokens_generated += len(new)
        entry.held += entry.decoder.decode(new)
        finish: tuple[FinishReason, StopReason, str | None] | None = None
        for stop in job.stop_strings:
            at = entry.held.find(stop) if stop else -1
            if at >= 0:
                entry.held = entry.held[:at]
                finish = ("stop", "stop_string", stop)
                break
        if finish is None and entry.generated >= len(entry.output):
            entry.held += entry.decoder.decode(b"", final=True)
            finish = ("stop", "stop_token", "</s>")
        elif finish is None and entry.generated >= job.max_new_tokens:
            entry.held += entry.decoder.decode(b"", final=True)
            finish = ("length", "max_new_tokens", None)
        text = entry.held if finish else _release(entry, job.stop_strings)
        if finish:
            entry.held = ""
        ids = tuple(new)
        if finish is None:
            return JobResult(job.job_id, text=text, token_ids=ids)
        now = time.monotonic()
        started = entry.started_at if entry.started_at is not None else now
        return JobResult(
            job.job_id,
            text=text,
            token_ids=ids,
            finished=True,
            finish_reason=finish[0],
            stop_reason=finish[1],
            stop_str=finish[2],
            stats=JobStats(
                prompt_tokens=len(job.prompt_ids),
                cached_tokens=0,
                generated_tokens=entry.generated,
                queue_time=started - entry.enqueued_at,
                prefill_time=0.0,
                decode_time=now - started,
            ),
        )

    def statistics(self) -> BackendStats:
        used = sum(
            math.ceil((len(e.job.prompt_ids) + e.generated + 1) / self._page_size)
            for e in self._live.values()
        )
        return BackendStats(
            live_jobs=len(self._live),
            waiting_jobs=len(self._waiting),
            last_batch_size=self._last_batch,
            cache_pages_total=self._cache_pages,
            cache_pages_used=used,
            page_size=self._page_size,
            tokens_generated=self._tokens_generated,
        )

    def close(self) -> None:
        self._waiting.clear()
        self._live.clear()
        self.closed = True


def _release(entry: _Job, stop_strings: Sequence[str]) -> str:
    """Release held text except a tail that could still grow into a stop string."""
    keep = 0
    for stop in stop_strings:
        for n in range(min(len(stop) - 1, len(entry.held)), 0, -1):
            if entry.held.endswith(stop[:n]):
                keep = max(keep, n)
                break
    text = entry.held[: len(entry.held) - keep]
    entry.held = entry.held[len(entry.held) - keep :]
    return text


def load(spec: LoadSpec, progress: ProgressCallback) -> ScriptedBackend:
    """Registry entry point: a scripted backend named after the requested model."""
    for module in range(1, LOAD_MODULES + 1):
        progress(LoadProgress("model", module, LOAD_MODULES))
    progress(LoadProgress("model", LOAD_MODULES, LOAD_MODULES, "finished"))
    return ScriptedBackend(
        name=spec.name,
        max_seq_len=spec.max_seq_len or 4096,
        max_batch_size=spec.max_batch_size or 8,
        path=str(spec.path),
    )
