"""Continuous batching over the paged KV cache.

Every step runs one forward pass holding the next token of every decoding job plus
prefill chunks of jobs still reading their prompt (at most ``chunk_size`` prompt
tokens per step, so a long prompt never stalls the other streams). New jobs join
between steps, oldest first, as long as ``max_batch_size`` and the cache allow.

Admission reserves the pages a job could ever need (prompt + ``max_new_tokens``,
less what it shares with cached pages), so a running job never runs out of cache;
pages are still taken only as the job grows. A job that could never fit is refused
at ``enqueue`` with :class:`~tabby.errors.ContextLengthExceeded`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

import attrs
import torch

from tabby.engine.batch import SeqChunk, build_batch
from tabby.engine.cache import CacheStats, PagedKVCache, page_keys
from tabby.engine.jobstate import JobState, TextSource
from tabby.engine.model import ForwardBatch, ModelWeights, forward
from tabby.engine.picker import pick_tokens
from tabby.engine.threads import DecodeThreads
from tabby.errors import ContextLengthExceeded, InvalidRequest
from tabby.jobs import GenerationJob, JobResult

__all__ = ["Generator", "GeneratorLimits", "GeneratorStats"]


@attrs.frozen
class GeneratorLimits:
    max_seq_len: int
    max_batch_size: int
    chunk_size: int


@attrs.frozen
class GeneratorStats:
    live_jobs: int
    waiting_jobs: int
    last_batch_size: int
    tokens_generated: int
    cache: CacheStats


class Generator:
    """Owns the cache and every job; used from one thread only."""

    def __init__(
        self,
        weights: ModelWeights,
        cache: PagedKVCache,
        tokenizer: TextSource,
        *,
        limits: GeneratorLimits,
        eos_ids: Sequence[int],
    ) -> None:
        self.weights = weights
        self.cache = cache
        self.tokenizer = tokenizer
        self.limits = limits
        self.eos_ids = tuple(eos_ids)
        self.vocab_size = weights.lm_head.out_features
        self.device = weights.embed.device
        self._waiting: deque[JobState] = deque()
        self._live: list[JobState] = []
        self._last_batch = 0
        self._generated = 0
        # Prefill runs on the threads set at load; decode steps on what measures faster.
        self._max_threads = torch.get_num_threads()
        self._decode_threads = DecodeThreads(self._max_threads)
        self._decode_rows = 0

    # -- the backend surface --------------------------------------------------------------

    def enqueue(self, job: GenerationJob) -> None:
        n = len(job.prompt_ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if job.max_new_tokens < 1:
            raise InvalidRequest("max_new_tokens must be at least 1", param="max_tokens")
        bad = [t for t in job.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(f"prompt token id {bad[0]} is outside the vocabulary")
        total = n + job.max_new_tokens
        if total > self.limits.max_seq_len:
            raise ContextLengthExceeded(
                f"prompt ({n} tokens) + max_new_tokens ({job.max_new_tokens}) = {total} tokens "
                f"exceeds the model's max_seq_len of {self.limits.max_seq_len}",
                param="max_tokens",
            )
        ps = self.cache.page_size
        if self._pages_for(total) + 1 > self.cache.num_pages:
            raise ContextLengthExceeded(
                f"prompt ({n} tokens) + max_new_tokens ({job.max_new_tokens}) = {total} tokens "
                f"does not fit the KV cache of {self.cache.num_pages * ps} tokens",
                param="max_tokens",
            )
        if any(s.job.job_id == job.job_id for s in (*self._waiting, *self._live)):
            raise InvalidRequest(f"job id {job.job_id!r} is already running")
        self._waiting.append(
            JobState.create(job, self.tokenizer, eos_ids=self.eos_ids, vocab_size=self.vocab_size)
        )

    def cancel(self, job_id: str) -> None:
        for s in self._waiting:
            if s.job.job_id == job_id:
                self._waiting.remove(s)
                return
        for s in self._live:
            if s.job.job_id == job_id:
                self._finish(s)
                return

    def has_work(self) -> bool:
        return bool(self._waiting or self._live)

    def stats(self) -> GeneratorStats:
        return GeneratorStats(
            live_jobs=len(self._live),
            waiting_jobs=len(self._waiting),
            last_batch_size=self._last_batch,
            tokens_generated=self._generated,
            cache=self.cache.stats(),
        )

    def close(self) -> None:
        for s in list(self._live):
            self._finish(s)
        self._waiting.clear()

    @torch.inference_mode()
    def step(self, before_head: Callable[[], None] | None = None) -> list[JobResult]:
        """One forward pass for every live job; results for the jobs that progressed.

        ``before_head`` is called during the pass, right before the LM head (or not at
        all when there is nothing to run).
        """
        self._admit()
        if not self._live:
            return []
        now = time.perf_counter()
        chunks, members = self._plan(now)
        batch, logit_index = build_batch(chunks, self.cache.page_size, self.device)
        logits = self._forward(batch, len(chunks), len(batch.tokens) == len(chunks), before_head)
        self._last_batch = len(chunks)
        for s, c in zip(members, chunks, strict=True):
            s.n_done += len(c.tokens)
            self._register_pages(s)
        sampled = [(s, logit_index[i]) for i, s in enumerate(members) if logit_index[i] >= 0]
        results: list[JobResult] = []
        if sampled:
            rows = [r for _, r in sampled]
            picks = pick_tokens(logits, rows, [s for s, _ in sampled])
            now = time.perf_counter()
            for (s, _), pick in zip(sampled, picks, strict=True):
                self._generated += 1
                result = s.accept(pick, now, max_seq_len=self.limits.max_seq_len)
                if s.rewind_to is not None:
                    self._rewind(s, s.rewind_to)
                if result is not None:
                    results.append(result)
                if s.finished:
                    self._finish(s)
        return results

    def _forward(
        self,
        batch: ForwardBatch,
        rows: int,
        decode_only: bool,
        before_head: Callable[[], None] | None,
    ) -> torch.Tensor:
        """Logits on the CPU (where the sampler works) on the step's thread count."""
        if not decode_only or self.device.type != "cpu":
            _set_threads(self._max_threads)
            return forward(self.weights, batch, self.cache.k, self.cache.v, before_head).cpu()
        if rows != self._decode_rows:
            self._decode_rows = rows
            self._decode_threads.reset()
        _set_threads(self._decode_threads.next_threads())
        away = 0.0

        def timed_before_head() -> None:
            # The hand-off's time is the caller's, not the step's.
            nonlocal away
            t = time.perf_counter()
            if before_head is not None:
                before_head()
            away = time.perf_counter() - t

        t0 = time.perf_counter()
        logits = forward(self.weights, batch, self.cache.k, self.cache.v, timed_before_head)
        self._decode_threads.record(time.perf_counter() - t0 - away)
        return logits

    # -- scheduling -----------------------------------------------------------------------

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.cache.page_size)

    def _reserved(self) -> int:
        # Pages the live jobs may still take, plus one each for a copy-on-write on rewind.
        return sum(max(0, self._pages_for(s.max_total) - len(s.pages)) + 1 for s in self._live)

    def _admit(self) -> None:
        ps = self.cache.page_size
        while self._waiting and len(self._live) < self.limits.max_batch_size:
            s = self._waiting[0]
            # Share only pages strictly before the last prompt token: its logits are needed.
            keys = page_keys(s.ids[: s.prompt_len - 1], ps)
            hits = self.cache.count_cached(keys)
            need = self._pages_for(s.max_total) - hits + 1
            room = self.cache.available() - self.cache.count_idle(keys) - self._reserved()
            if need > room:
                return
            self._waiting.popleft()
            s.pages = self.cache.lookup(keys[:hits])
            s.page_keys = list(keys[:hits])
            s.n_done = s.cached_tokens = hits * ps
            self._live.append(s)

    def _plan(self, now: float) -> tuple[list[SeqChunk], list[JobState]]:
        chunks: list[SeqChunk] = []
        members: list[JobState] = []
        budget = self.limits.chunk_size
        for s in self._live:
            pending = len(s.ids) - s.n_done
            if pending > 1:
                if budget <= 0:
                    continue
                take = min(pending, budget)
                budget -= take
            else:
                take = 1
            if s.started_at is None:
                s.started_at = now
            end = s.n_done + take
            while len(s.pages) * self.cache.page_size < end:
                s.pages.append(self.cache.allocate())
            chunks.append(SeqChunk(s.pages, s.n_done, s.ids[s.n_done : end], end == len(s.ids)))
            members.append(s)
        return chunks, members

    def _register_pages(self, s: JobState) -> None:
        ps = self.cache.page_size
        full = s.n_done // ps
        if full <= len(s.page_keys):
            return
        prev = hash(s.page_keys[-1]) if s.page_keys else None
        new = page_keys(s.ids[len(s.page_keys) * ps : full * ps], ps, prev)
        for i, key in enumerate(new, start=len(s.page_keys)):
            self.cache.register(s.pages[i], key)
        s.page_keys.extend(new)

    def _rewind(self, s: JobState, length: int) -> None:
        """Forget every token from ``length`` on; the token before it is fed again."""
        ps = self.cache.page_size
        s.rewind_to = None
        del s.ids[length:]
        s.n_done = min(s.n_done, length - 1)
        keep = s.n_done // ps + 1
        self.cache.release(s.pages[keep:])
        del s.pages[keep:]
        del s.page_keys[s.n_done // ps :]
        last = s.pages[-1]
        if self.cache.is_shared(last):
            fresh = self.cache.allocate()
            self.cache.copy_page(last, fresh, s.n_done % ps)
            self.cache.release([last])
            s.pages[-1] = fresh

    def _finish(self, s: JobState) -> None:
        self.cache.release(s.pages)
        s.pages = []
        s.finished = True
        self._live.remove(s)


def _set_threads(n: int) -> None:
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
