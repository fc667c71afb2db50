"""One job's state inside the generator: tokens, pages, sampler and output text.

Per sampled token the text path is: incremental detokenizer -> banned-string checker
(which may ask for a rewind instead) -> stop-string checker -> the job's result. Text
that could still become a banned or stop string is held back, and the tokens and
logprobs behind it are released together with it.

A job's ``TokenMasker`` is fed every sampled token (stop tokens too). When a
banned-string rewind takes tokens back, a masker with a ``rollback(n)`` method (the
llguidance one has it) is rolled back too; without one the rewind cannot be undone
there, so banned strings with such a masker are best effort.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import attrs
import torch
from torch import Tensor

from tabby.engine.cache import PageKey
from tabby.engine.sampling import SamplingState
from tabby.engine.stops import BannedStringChecker, StopChecker
from tabby.jobs import FinishReason, GenerationJob, JobResult, JobStats, StopReason, TokenLogprob

__all__ = ["JobState", "Pick", "TextSource"]


class _Decoder(Protocol):
    def push(self, token_ids: Sequence[int]) -> str: ...

    def flush(self) -> str: ...


class TextSource(Protocol):
    """What the generator needs from the tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    def encode(
        self, text: str, *, add_bos: bool = False, encode_special: bool = True
    ) -> list[int]: ...

    def stream_decoder(self, *, decode_special: bool = True) -> _Decoder: ...

    def piece(self, token_id: int) -> str: ...


@attrs.frozen
class Pick:
    token: int
    logprob: TokenLogprob | None = None


@attrs.define(eq=False)
class JobState:
    job: GenerationJob
    tokenizer: TextSource
    ids: list[int]
    # [max_total] int64: the ids again, only for a sampler that reads them (penalties, DRY)
    history: Tensor | None
    prompt_len: int
    max_total: int
    stop_ids: frozenset[int]
    enqueued_at: float
    decoder: _Decoder
    sampler: SamplingState
    banned: BannedStringChecker
    stops: StopChecker
    pages: list[int] = attrs.field(factory=list)
    page_keys: list[PageKey] = attrs.field(factory=list)
    n_done: int = 0  # tokens whose keys/values are in the cache
    cached_tokens: int = 0
    started_at: float | None = None
    first_token_at: float | None = None
    finished: bool = False
    rewind_to: int | None = None  # set when a banned string needs the cache rolled back
    held_logprobs: list[TokenLogprob | None] = attrs.field(factory=list)

    @classmethod
    def create(
        cls, job: GenerationJob, tokenizer: TextSource, *, eos_ids: tuple[int, ...], vocab_size: int
    ) -> JobState:
        stop_ids = (*eos_ids, *job.stop_token_ids)
        breakers = frozenset(
            ids[-1]
            for s in job.sampler.dry_sequence_breakers
            if (ids := tokenizer.encode(s, encode_special=False))
        )
        sampler = SamplingState.create(
            job.sampler,
            vocab_size=min(vocab_size, tokenizer.vocab_size),
            eos_ids=stop_ids,
            seed=job.seed,
            min_new_tokens=job.min_new_tokens,
            masker=job.masker,
            breaker_ids=breakers,
        )
        history = None
        if sampler.needs_history:
            history = torch.zeros(len(job.prompt_ids) + job.max_new_tokens, dtype=torch.int64)
            history[: len(job.prompt_ids)] = torch.tensor(job.prompt_ids, dtype=torch.int64)
        return cls(
            job=job,
            tokenizer=tokenizer,
            ids=list(job.prompt_ids),
            history=history,
            prompt_len=len(job.prompt_ids),
            max_total=len(job.prompt_ids) + job.max_new_tokens,
            stop_ids=frozenset(stop_ids),
            enqueued_at=time.perf_counter(),
            decoder=tokenizer.stream_decoder(decode_special=True),
            sampler=sampler,
            banned=BannedStringChecker(job.banned_strings),
            stops=StopChecker(job.stop_strings),
        )

    @property
    def generated(self) -> int:
        return len(self.ids) - self.prompt_len

    # -- one sampled token ----------------------------------------------------------------

    def accept(self, pick: Pick, now: float, *, max_seq_len: int) -> JobResult | None:
        """Take the sampled token; returns what became visible (or None)."""
        if self.first_token_at is None:
            self.first_token_at = now
        t = pick.token
        if self.history is not None:
            self.history[len(self.ids)] = t
        self.ids.append(t)
        masker = self.job.masker
        if masker is not None:
            masker.consume(t)
        if t in self.stop_ids:
            return self._end("stop", "stop_token", self.tokenizer.piece(t), now)
        if self.job.logprobs:
            # Kept in step with the tokens the banned-string checker holds back.
            self.held_logprobs.append(pick.logprob)
        verdict = self.banned.feed(t, self.decoder.push([t]))
        if verdict.rewind:
            self._rewind(verdict.rewind)
            return None
        hit = self.stops.feed(verdict.text)
        lps = self._take_logprobs(len(verdict.tokens))
        if hit.stop is not None:
            return self._end("stop", "stop_string", hit.stop, now, (hit.text, verdict.tokens, lps))
        if self.generated >= self.job.max_new_tokens:
            return self._end("length", "max_new_tokens", None, now, (hit.text, verdict.tokens, lps))
        if masker is not None and masker.is_finished():
            return self._end("stop", "constraint", None, now, (hit.text, verdict.tokens, lps))
        if len(self.ids) >= max_seq_len:
            return self._end("length", "context_length", None, now, (hit.text, verdict.tokens, lps))
        if not hit.text and not verdict.tokens:
            return None
        return JobResult(self.job.job_id, hit.text, verdict.tokens, lps)

    def _take_logprobs(self, n: int) -> tuple[TokenLogprob, ...]:
        if not self.held_logprobs:
            return ()
        out, self.held_logprobs = self.held_logprobs[:n], self.held_logprobs[n:]
        return tuple(lp for lp in out if lp is not None)

    def _rewind(self, n: int) -> None:
        keep = len(self.ids) - n
        rollback = getattr(self.job.masker, "rollback", None)
        if callable(rollback):
            rollback(n)
        del self.held_logprobs[max(0, len(self.held_logprobs) - n) :]
        self.rewind_to = keep
        # The decoder's partial UTF-8 state is rebuilt from the tokens that stay.
        self.decoder = self.tokenizer.stream_decoder(decode_special=True)
        self.decoder.push(self.ids[self.prompt_len : keep])

    def banned_now(self) -> frozenset[int]:
        return self.banned.banned_now()

    # -- the end --------------------------------------------------------------------------

    def _end(
        self,
        finish: FinishReason,
        reason: StopReason,
        stop_str: str | None,
        now: float,
        released: tuple[str, tuple[int, ...], tuple[TokenLogprob, ...]] = ("", (), ()),
    ) -> JobResult:
        self.finished = True
        text, tokens, lps = released
        if reason != "stop_string":
            # Everything still held back is safe now: no further token can complete it.
            tail = self.banned.flush()
            last = self.stops.feed(tail.text + self.decoder.flush())
            if last.stop is not None:
                reason, finish, stop_str = "stop_string", "stop", last.stop
            text += last.text + ("" if last.stop is not None else self.stops.flush())
            tokens += tail.tokens
            lps += self._take_logprobs(len(tail.tokens))
        started = self.started_at if self.started_at is not None else self.enqueued_at
        first = self.first_token_at if self.first_token_at is not None else now
        stats = JobStats(
            prompt_tokens=self.prompt_len,
            cached_tokens=self.cached_tokens,
            generated_tokens=self.generated,
            queue_time=started - self.enqueued_at,
            prefill_time=first - started,
            decode_time=now - first,
        )
        return JobResult(
            job_id=self.job.job_id,
            text=text,
            token_ids=tokens,
            logprobs=lps,
            finished=True,
            finish_reason=finish,
            stop_reason=reason,
            stop_str=stop_str,
            stats=stats,
        )
