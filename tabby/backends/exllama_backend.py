"""The backend object both exllama adapters share: job bookkeeping over a dynamic generator.

Each library's adapter supplies how to build one library job and what to unload; the
enqueue checks, cancel, step (translating result dicts), statistics and close are here.
"""

from __future__ import annotations

import abc
import gc
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import attrs

from tabby.backends.base import BackendStats, ModelInfo
from tabby.backends.exllama_common import (
    PAGE_SIZE,
    JobLimits,
    LibraryName,
    job_limits,
    translate_results,
    unsupported_samplers,
)
from tabby.backends.exllama_tokenizer import LibraryTokenizer
from tabby.errors import ContextLengthExceeded, NotSupported
from tabby.jobs import GenerationJob, JobResult

__all__ = ["LibraryBackend", "LibraryParts", "LiveJob", "free_vram", "unload_all"]


def free_vram() -> None:
    """Return freed tensors' memory to the driver (after unloading library objects)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def unload_all(components: Iterable[Any]) -> None:
    """``unload()`` each library object that was made (None: never made)."""
    for component in components:
        if component is not None:
            component.unload()


@attrs.define
class LiveJob:
    job: object  # the library job
    limits: JobLimits
    tokens: int  # prompt and output so far, for the cache page estimate
    top_logprobs: int = 0  # alternatives per token, where logprobs come from logits


class LibraryParts(Protocol):
    """What :class:`LibraryBackend` needs of an adapter's library objects."""

    @property
    def generator(self) -> Any: ...


PartsT = TypeVar("PartsT", bound=LibraryParts)


class LibraryBackend(abc.ABC, Generic[PartsT]):
    """Implements ``tabby.backends.base.Backend`` over a library generator.

    The two libraries' generators enqueue, cancel and iterate alike; an adapter
    supplies only the library job (:meth:`_library_job`) and what unloading frees
    (:meth:`_release`). Used from one worker thread.
    """

    library: ClassVar[LibraryName]
    supported_samplers: ClassVar[Sequence[str]]

    def __init__(self, parts: PartsT, tokenizer: LibraryTokenizer, info: ModelInfo) -> None:
        self._parts: PartsT | None = parts
        self._tokenizer = tokenizer
        self._info = info
        self._eos = info.eos_token_ids
        self._live: dict[str, LiveJob] = {}
        self._by_job: dict[int, str] = {}  # id(library job) → our job id
        self._last_batch = 0
        self._generated = 0

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def tokenizer(self) -> LibraryTokenizer:
        return self._tokenizer

    def _require(self) -> PartsT:
        if self._parts is None:
            raise NotSupported(f"the {self.library} model was unloaded")
        return self._parts

    @abc.abstractmethod
    def _library_job(
        self, parts: PartsT, job: GenerationJob, limits: JobLimits, dry_breaker_ids: list[int]
    ) -> object:
        """The library's job object for ``job`` (raises our errors for what it rejects)."""

    @abc.abstractmethod
    def _release(self, parts: PartsT) -> None:
        """Unload the library objects of ``parts`` (VRAM is freed afterwards)."""

    def enqueue(self, job: GenerationJob) -> None:
        parts = self._require()
        # The reference engine's masker mirrors job.constraint, which is what we compile.
        if job.masker is not None and job.constraint is None:
            raise NotSupported(
                f"per-token masks are not supported by the {self.library} backend; use a constraint"
            )
        limits = job_limits(
            job, max_seq_len=self._info.max_seq_len, cache_size=self._info.cache_size
        )
        missing = unsupported_samplers(job.sampler, self.supported_samplers)
        if missing:
            # Logged under the adapter's module, where an operator filters for it.
            logging.getLogger(type(self).__module__).warning(
                "job %s: %s has no %s; ignored", job.job_id, self.library, ", ".join(missing)
            )
        breakers = [
            ids[-1]
            for ids in (self._tokenizer.encode(b) for b in job.sampler.dry_sequence_breakers)
            if ids
        ]
        lib_job = self._library_job(parts, job, limits, breakers)
        try:
            parts.generator.enqueue(lib_job)
        except AssertionError as exc:
            # enqueue's assertions are all about the job never fitting the cache.
            raise ContextLengthExceeded(f"the job does not fit the cache: {exc}") from None
        top = job.top_logprobs if job.logprobs else 0
        self._live[job.job_id] = LiveJob(lib_job, limits, len(job.prompt_ids), top)
        self._by_job[id(lib_job)] = job.job_id

    def cancel(self, job_id: str) -> None:
        live = self._live.pop(job_id, None)
        if live is None or self._parts is None:
            return
        self._by_job.pop(id(live.job), None)
        self._parts.generator.cancel(live.job)

    def _job_id_of(self, result: Mapping[str, Any]) -> str | None:
        return self._by_job.get(id(result.get("job")))

    def step(self) -> list[JobResult]:
        parts = self._require()
        results = translate_results(
            parts.generator.iterate(),
            self._job_id_of,
            self._tokenizer,
            context_bound=lambda job_id: self._live[job_id].limits.context_bound,
            top_logprobs=lambda job_id: self._live[job_id].top_logprobs,
        )
        self._last_batch = 0
        for i, result in enumerate(results):
            if result.token_ids:
                self._last_batch += 1
                self._generated += len(result.token_ids)
                self._live[result.job_id].tokens += len(result.token_ids)
            if result.finished:
                live = self._live.pop(result.job_id)
                self._by_job.pop(id(live.job), None)
                if result.stop_reason == "stop_token" and self._constraint_finished(live.job):
                    # The constraint had nothing left to match, so EOS was all it allowed:
                    # the job ended on its constraint, as the reference engine reports it.
                    results[i] = attrs.evolve(result, stop_reason="constraint", stop_str=None)
        return results

    def _constraint_finished(self, library_job: object) -> bool:
        """Whether the job's constraint has matched completely (adapters that can tell)."""
        return False

    def has_work(self) -> bool:
        return self._parts is not None and bool(self._parts.generator.num_remaining_jobs())

    def _job_counts(self) -> tuple[int, int]:
        """(running, waiting) jobs; by default every tracked job counts as running."""
        return len(self._live), 0

    def statistics(self) -> BackendStats:
        live_jobs, waiting_jobs = self._job_counts()
        used = sum(-(-live.tokens // PAGE_SIZE) for live in self._live.values())
        total = self._info.cache_size // PAGE_SIZE
        return BackendStats(
            live_jobs=live_jobs,
            waiting_jobs=waiting_jobs,
            last_batch_size=self._last_batch,
            cache_pages_total=total,
            cache_pages_used=min(used, total),
            page_size=PAGE_SIZE,
            tokens_generated=self._generated,
        )

    def close(self) -> None:
        parts, self._parts = self._parts, None
        self._live.clear()
        self._by_job.clear()
        if parts is None:
            return
        self._release(parts)
        del parts
        free_vram()
