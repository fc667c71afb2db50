"""The reference engine behind the backend contract: pure PyTorch, CPU or CUDA.

Defaults, chosen by measurement on a 2-core AVX-512-bf16 CPU with SmolLM2-135M
(one thread, CPU-time clock; see ``bench/engine.py``):

* ``dtype = "auto"``: on CPUs with AVX-512 (bf16) weight-only int8 matrices with
  bfloat16 activations. Decoding reads every weight once per step, so it is bound by
  memory bandwidth: int8 decoded 81-93 tok/s against 35-39 for bf16 and 26 for fp32;
  prefill ran at the bf16 rate (~1,100 tok/s against ~410 for fp32). On CUDA bfloat16,
  elsewhere float32. ``"int8"``, ``"bfloat16"``, ``"float16"`` and ``"float32"`` force one;
  tests use float32, where cached decoding is exact.
* ``threads = 0`` (auto): one fewer than torch's default (one per physical core), at
  least one. Alone, two threads decoded ~35% faster than one on 2 cores, but a server
  shares the cores with its event loop, HTTP and tokenization, and with every core
  busy in torch the streams stalled (1-25 tok/s through HTTP at batch 8, against ~315
  with one thread). Set ``threads`` explicitly to use every core.
* ``max_seq_len``: the model's own, capped at 8192 to bound CPU memory.
* ``cache_size``: ``max(max_seq_len, 8192)`` tokens, so several streams of ordinary
  length fit beside one long one. The cache is allocated once, in pages of 16 tokens
  (16, 32 and 64 measured the same; smaller pages share prefixes more finely).
* ``max_batch_size``: 16.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tabby.backends.base import (
    BackendStats,
    Capabilities,
    LoadProgress,
    LoadSpec,
    ModelInfo,
    ProgressCallback,
)
from tabby.engine.cache import PagedKVCache
from tabby.engine.checkpoint import Checkpoint
from tabby.engine.generator import Generator, GeneratorLimits
from tabby.engine.loading import load_checkpoint
from tabby.engine.model import build_weights
from tabby.engine.tokenizer import EngineTokenizer
from tabby.errors import InvalidRequest
from tabby.jobs import GenerationJob, JobResult

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "MAX_SEQ_LEN_CAP",
    "PAGE_SIZE",
    "ReferenceBackend",
    "load",
    "resolve_device",
    "resolve_dtype",
    "resolve_threads",
]

MAX_SEQ_LEN_CAP = 8192
DEFAULT_MAX_BATCH_SIZE = 16
MIN_CACHE_SIZE = 4 * 2048
PAGE_SIZE = 16

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> tuple[torch.dtype, bool]:
    """(compute dtype, weight-only int8) for a ``dtype`` setting."""
    name = name.lower()
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16, False
        return (torch.bfloat16, True) if _cpu_has_bf16() else (torch.float32, False)
    if name == "int8":
        return (torch.bfloat16 if _cpu_has_bf16() or device.type == "cuda" else torch.float32), True
    try:
        return _DTYPES[name], False
    except KeyError:
        raise InvalidRequest(
            f"dtype {name!r} is not one of auto, int8, {', '.join(sorted(_DTYPES))}",
            param="dtype",
        ) from None


def _cpu_has_bf16() -> bool:
    caps = torch.backends.cpu.get_cpu_capability()
    return "AVX512" in caps.upper() or "AMX" in caps.upper()


class ReferenceBackend:
    """Implements ``tabby.backends.base.Backend``; used from one worker thread."""

    def __init__(self, generator: Generator, tokenizer: EngineTokenizer, info: ModelInfo) -> None:
        self._gen = generator
        self._tokenizer = tokenizer
        self._info = info

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def tokenizer(self) -> EngineTokenizer:
        return self._tokenizer

    @property
    def generator(self) -> Generator:
        return self._gen

    def enqueue(self, job: GenerationJob) -> None:
        self._gen.enqueue(job)

    def cancel(self, job_id: str) -> None:
        self._gen.cancel(job_id)

    def step(self) -> list[JobResult]:
        return self._gen.step()

    def step_with_handoff(self, handoff: Callable[[], None]) -> list[JobResult]:
        # The LM head is a fifth of the weights in one int8 kernel: milliseconds with
        # no Python, where the event loop's work does not hold the engine up.
        return self._gen.step(before_head=handoff)

    def has_work(self) -> bool:
        return self._gen.has_work()

    def statistics(self) -> BackendStats:
        s = self._gen.stats()
        return BackendStats(
            live_jobs=s.live_jobs,
            waiting_jobs=s.waiting_jobs,
            last_batch_size=s.last_batch_size,
            cache_pages_total=s.cache.pages_total,
            cache_pages_used=s.cache.pages_used,
            page_size=s.cache.page_size,
            tokens_generated=s.tokens_generated,
        )

    def close(self) -> None:
        self._gen.close()


# Read once at import, before any load changes it.
_TORCH_DEFAULT_THREADS = torch.get_num_threads()


def resolve_threads(threads: int) -> int:
    """The torch thread count for a ``threads`` setting (0 = auto, see the module doc)."""
    if threads > 0:
        return threads
    return max(1, _TORCH_DEFAULT_THREADS - 1)


def load(spec: LoadSpec, progress: ProgressCallback) -> ReferenceBackend:
    """Load a model folder or GGUF file and build its generator (blocking)."""
    device = resolve_device(spec.device)
    dtype, int8 = resolve_dtype(spec.dtype, device)
    torch.set_num_threads(resolve_threads(spec.threads))
    modules = [0]  # the module count the reader reports, for the final event

    def on_group(done: int, total: int) -> None:
        modules[0] = total
        progress(LoadProgress("model", done, total))

    def on_build(event: LoadProgress) -> None:
        # One count for the whole stream: the final event reuses the reader's total.
        if event.status == "finished" and modules[0]:
            event = LoadProgress("model", modules[0], modules[0], "finished")
        progress(event)

    ckpt = load_checkpoint(
        Path(spec.path), dtype=torch.float32 if int8 else dtype, progress=on_group
    )
    return from_checkpoint(ckpt, spec, on_build, device=device, dtype=dtype, int8=int8)


def from_checkpoint(
    ckpt: Checkpoint,
    spec: LoadSpec,
    progress: ProgressCallback,
    *,
    device: torch.device,
    dtype: torch.dtype,
    int8: bool = False,
) -> ReferenceBackend:
    cfg = ckpt.config
    max_seq_len = spec.max_seq_len or min(cfg.max_position_embeddings, MAX_SEQ_LEN_CAP)
    cache_size = spec.cache_size or max(max_seq_len, MIN_CACHE_SIZE)
    if cache_size < max_seq_len:
        raise InvalidRequest(
            f"cache_size ({cache_size}) must be at least max_seq_len ({max_seq_len})",
            param="cache_size",
        )
    n_layers = cfg.num_layers
    weights = build_weights(
        cfg, ckpt.weights, dtype=dtype, device=device, max_positions=max_seq_len, int8=int8,
        int4=ckpt.four_bit,
        consume=True,
    )
    # One spare page per possible job so rewinds and page rounding never run short.
    batch = spec.max_batch_size or DEFAULT_MAX_BATCH_SIZE
    num_pages = -(-cache_size // PAGE_SIZE) + 1
    cache = PagedKVCache(
        num_layers=n_layers,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        num_pages=num_pages,
        page_size=PAGE_SIZE,
        dtype=dtype,
        device=device,
    )
    gen_defaults = ckpt.generation
    eos = gen_defaults.eos_token_ids or cfg.eos_token_ids
    generator = Generator(
        weights,
        cache,
        ckpt.tokenizer,
        limits=GeneratorLimits(max_seq_len, batch, spec.chunk_size),
        eos_ids=eos,
    )
    info = ModelInfo(
        name=spec.name,
        backend="reference",
        max_seq_len=max_seq_len,
        vocab_size=cfg.vocab_size,
        bos_token_id=gen_defaults.bos_token_id,
        eos_token_ids=tuple(eos),
        bos_token=gen_defaults.bos_token,
        eos_token=gen_defaults.eos_token,
        pad_token=gen_defaults.pad_token,
        unk_token=gen_defaults.unk_token,
        add_bos_token=gen_defaults.add_bos_token,
        chat_template=gen_defaults.chat_template,
        cache_size=(num_pages - 1) * PAGE_SIZE,
        cache_mode="FP16" if dtype != torch.float32 else "FP32",
        max_batch_size=batch,
        chunk_size=spec.chunk_size,
        capabilities=Capabilities(handoff=True),
        path=str(ckpt.path),
    )
    progress(LoadProgress("model", n_layers, n_layers, "finished"))
    return ReferenceBackend(generator, ckpt.tokenizer, info)
