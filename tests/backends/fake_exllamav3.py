"""A stand-in for the exllamav3 library on CPU: the ``Generator``/``Job``/``Cache`` surface
tabby's adapter uses, with the library's page accounting and a record of each step.

What it keeps of the real library (exllamav3 1.6.5, ``generator/job.py`` and
``generator.py``):

* pages of 256 tokens; a job is admitted by ``iterate()`` only when its pages (prompt
  plus its requeue budget ``max_rq_tokens``, page-aligned, or the whole answer + 1 when
  None) are free and the batch has room; pending jobs are started in queue order,
  later ones may pass a job that does not fit;
* ``enqueue`` cuts ``max_new_tokens`` to the room the cache leaves after the prompt, and
  asserts "cannot be enqueued" for a job bigger than the whole cache;
* a job that reaches its requeue budget gives its pages back and queues again with what
  it generated so far as its prompt;
* result dicts: ``started``, then one ``streaming`` dict per job per step, the last one
  with ``eos`` and the end facts; ``cancel`` frees a job's pages at once.

Tokens are a deterministic function of the prompt, so a batched job equals the same job
alone. ``Generator.steps`` records how many jobs produced a token in each ``iterate()``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

PAGE_SIZE = 256
VOCAB = 64
EOS = 2


def _pages(tokens: int) -> int:
    return -(-tokens // PAGE_SIZE)


class Config:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.eos_token_id_list = [EOS]
        self.bos_token_id = 1
        self.max_position_embeddings = 4096
        self.vocab_size = VOCAB
        self.model_classes = {"text": object}

    @classmethod
    def from_directory(cls, directory: str, **kwargs: Any) -> Config:
        return cls(directory)


class Module:
    def __init__(self, key: str) -> None:
        self.key = key
        self.device: str | None = None

    def load(self, device: str) -> None:
        self.device = device

    def unload(self) -> None:
        self.device = None


class Model:
    """``load_gen`` onto one device yields nothing, as the library's does."""

    def __init__(self, config: Config, layers: int = 4) -> None:
        self.config = config
        self.modules = [Module("embed"), *(Module(f"layer.{i}") for i in range(layers)),
                        Module("head")]
        self.caps: dict[str, Any] = {}
        self.loaded = False
        self.warmed: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, config: Config, component: str = "text") -> Model:
        return cls(config)

    def load_gen(self, device: str | None = None, **kwargs: Any) -> Iterator[tuple[int, int]]:
        if device is not None:
            for module in self.modules:
                module.load(device)
        else:
            for i, module in enumerate(self.modules):
                module.load("cuda:0")
                yield i + 1, len(self.modules)
        self.loaded = True

    def warmup(self, cache: Cache | None = None, **kwargs: Any) -> list[str]:
        assert self.loaded, "warm-up runs on a loaded model"
        self.warmed = kwargs
        return []

    def unload(self) -> None:
        for module in self.modules:
            module.unload()
        self.loaded = False


class CacheLayer_fp16:  # the library's name
    pass


class Cache:
    def __init__(self, model: Model, max_num_tokens: int, **kwargs: Any) -> None:
        assert max_num_tokens % PAGE_SIZE == 0, "cache size must be a multiple of 256"
        self.model = model
        self.max_num_tokens = max_num_tokens
        self.max_pages = max_num_tokens // PAGE_SIZE


class Tokenizer:
    def __init__(self) -> None:
        self.pieces = [f"<{i}>" if i < 3 else chr(ord("A") + (i - 3) % 26) for i in range(VOCAB)]

    @classmethod
    def from_config(cls, config: Config) -> Tokenizer:
        return cls()

    def encode(self, text: str, add_bos: bool = False, encode_special_tokens: bool = False) -> torch.Tensor:
        ids = [3 + (ord(c) % (VOCAB - 3)) for c in text]
        return torch.tensor([([1] if add_bos else []) + ids], dtype=torch.long)

    def decode(self, ids: torch.Tensor, decode_special_tokens: bool = False) -> str:
        return "".join(self.pieces[int(i)] for i in ids[0].tolist())

    def get_id_to_piece_list(self, include_special_tokens: bool = False) -> list[str]:
        return list(self.pieces)


class CustomSampler:
    def __init__(self, steps: Sequence[object]) -> None:
        self.steps = list(steps)


class _Step:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


SS_Argmax = SS_Sample = SS_Temperature = SS_TopK = SS_TopP = SS_MinP = _Step
SS_RepP = SS_PresFreqP = SS_BanTokens = SS_LogitBias = SS_XTC = SS_DRY = _Step


class LLGuidanceFilter:
    def __init__(self, tokenizer: Tokenizer, **kwargs: Any) -> None:
        self.kwargs = kwargs


class Job:
    def __init__(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        identifier: object = None,
        max_rq_tokens: int | None = None,
        stop_conditions: Sequence[int | str] = (),
        **kwargs: Any,
    ) -> None:
        self.prompt = [int(t) for t in input_ids[0].tolist()]
        self.max_new_tokens = max_new_tokens
        self.identifier = identifier
        self.orig_max_rq_tokens = max_rq_tokens
        self.stop_tokens = {c for c in stop_conditions if isinstance(c, int)}
        self.kwargs = kwargs
        self.generated: list[int] = []
        self.reserved = 0  # pages held while active
        self.budget = 0  # new tokens before a requeue, set by prepare()
        self.admitted_at = 0  # tokens generated when it last started

    def prepare(self, max_total_tokens: int) -> int:
        """Pages this job needs to start now (the library's ``prepare`` + page check)."""
        context = len(self.prompt) + len(self.generated)
        left = self.max_new_tokens - len(self.generated)
        if self.orig_max_rq_tokens is None:
            self.budget = left + 1
        else:
            # Aligned to the page boundary after context + the requested budget.
            end = _pages(context - 1 + self.orig_max_rq_tokens) * PAGE_SIZE
            end = min(end, max_total_tokens)
            self.budget = max(1, end - context)
        return _pages(context + self.budget)

    def next_token(self) -> int:
        context = self.prompt + self.generated
        return 3 + (sum(context[-3:]) * 7 + len(context)) % (VOCAB - 3)


class Generator:
    def __init__(
        self,
        model: Model,
        cache: Cache,
        tokenizer: Tokenizer,
        max_batch_size: int = 256,
        max_chunk_size: int = 2048,
        **kwargs: Any,
    ) -> None:
        self.model = model
        self.cache = cache
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_total_tokens = cache.max_num_tokens
        self.free_pages = cache.max_pages
        self.pending: list[Job] = []
        self.active: list[Job] = []
        self.steps: list[int] = []  # jobs that produced a token, per iterate()
        self.requeues = 0
        self.closed = False

    def enqueue(self, job: Job | Sequence[Job]) -> None:
        for j in [job] if isinstance(job, Job) else list(job):
            # The cache bounds the answer: the library cuts max_new_tokens to what fits.
            room = self.max_total_tokens - len(j.prompt) - 1
            if room >= 1:
                j.max_new_tokens = min(j.max_new_tokens, room)
            need = j.prepare(self.max_total_tokens)
            assert need <= self.cache.max_pages, (
                f"Job requires {need} pages (only {self.cache.max_pages} available) and "
                f"cannot be enqueued"
            )
            self.pending.append(j)

    def cancel(self, job: Job) -> None:
        if job in self.pending:
            self.pending.remove(job)
        if job in self.active:
            self.active.remove(job)
            self.free_pages += job.reserved
            job.reserved = 0

    def num_remaining_jobs(self) -> int:
        return len(self.pending) + len(self.active)

    def num_active_jobs(self) -> int:
        return len(self.active)

    def num_pending_jobs(self) -> int:
        return len(self.pending)

    def _start_jobs(self, results: list[dict[str, Any]]) -> None:
        for job in list(self.pending):
            if len(self.active) >= self.max_batch_size:
                return
            need = job.prepare(self.max_total_tokens)
            if need > self.free_pages:
                continue
            self.pending.remove(job)
            self.active.append(job)
            job.reserved = need
            job.admitted_at = len(job.generated)
            self.free_pages -= need
            results.append({"job": job, "stage": "started", "eos": False,
                            "identifier": job.identifier})

    def iterate(self) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        self._start_jobs(results)
        produced = 0
        for job in list(self.active):
            token = job.next_token()
            job.generated.append(token)
            produced += 1
            result: dict[str, Any] = {
                "job": job, "stage": "streaming", "eos": False, "identifier": job.identifier,
                "text": self.tokenizer.pieces[token], "token_ids": torch.tensor([[token]]),
            }
            results.append(result)
            done = len(job.generated)
            reason = None
            if token in job.stop_tokens:
                reason = "stop_token"
            elif done >= job.max_new_tokens:
                reason = "max_new_tokens"
            if reason is not None:
                result.update(eos=True, eos_reason=reason, new_tokens=done,
                              prompt_tokens=len(job.prompt), cached_tokens=0,
                              full_completion="".join(self.tokenizer.pieces[t] for t in job.generated))
                self._release(job)
            elif done - job.admitted_at >= job.budget:
                # Requeue: pages back, the job queues again behind the others.
                self._release(job)
                self.pending.append(job)
                self.requeues += 1
        self.steps.append(produced)
        return results

    def _release(self, job: Job) -> None:
        self.active.remove(job)
        self.free_pages += job.reserved
        job.reserved = 0

    def close(self) -> None:
        self.closed = True


def model_folder(directory: Path) -> Path:
    """A model folder for ``load`` (the fake reads nothing from it)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text("{}")
    return directory
