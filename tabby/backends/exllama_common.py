"""What the exllamav2 and exllamav3 adapters share; pure Python, never imports exllama.

Five concerns, kept together because both adapters need each of them and none is big
enough for a module of its own:

* load-time rules: cache modes, cache/context sizing in pages of 256, RoPE alpha,
  GPU split and autosplit reserve units, and the guarded first import of a library
  (which compiles its CUDA extension);
* pre-enqueue rules: prompt and output within the context and the cache, stop
  conditions (EOS ids always in), samplers a library lacks;
* translation of the libraries' result dicts (same shape in both) into ``JobResult``;
* a ``Tokenizer`` adapter over a library tokenizer;
* :class:`LibraryBackend`, the job bookkeeping of both ``Backend`` implementations.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import importlib.util
import logging
import math
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any, Literal, Protocol

import attrs

from tabby.errors import BackendUnavailable, ContextLengthExceeded, InvalidRequest
from tabby.jobs import (
    FinishReason,
    GenerationJob,
    JobResult,
    JobStats,
    SamplerSettings,
    StopReason,
    TokenLogprob,
)

__all__ = [
    "IMPORT_TIMEOUT_S",
    "LOGPROB_FLOOR",
    "PAGE_SIZE",
    "CacheBits",
    "ContextSize",
    "JobLimits",
    "LibraryName",
    "Placement",
    "autosplit_reserve_bytes",
    "autosplit_reserve_gb",
    "check_runtime",
    "chunk_size_for",
    "clean_strings",
    "common_job_kwargs",
    "import_library",
    "job_limits",
    "logprobs_from_logits",
    "parse_cache_mode_v2",
    "parse_cache_mode_v3",
    "placement",
    "rope_alpha_auto",
    "round_up_to_page",
    "rows_of",
    "size_context",
    "stop_conditions",
    "translate_results",
    "unsupported_samplers",
]

log = logging.getLogger(__name__)

# Both generators manage their caches in pages of this many tokens.
PAGE_SIZE = 256
# The OpenAI API has no -inf; a token with probability 0 reports this log-probability.
LOGPROB_FLOOR = -1000.0
# The first import compiles the CUDA extension: ~7 min for exllamav3 on a 16-core box.
IMPORT_TIMEOUT_S = 1800.0

LibraryName = Literal["exllamav2", "exllamav3"]

_MIN_CAPABILITY: Mapping[str, tuple[int, int]] = {"exllamav2": (6, 0), "exllamav3": (8, 0)}
_QUANT_BITS: Mapping[str, int] = {"Q4": 4, "Q6": 6, "Q8": 8}
_BITS_PAIR = re.compile(r"^([2-8])\s*,\s*([2-8])$")


# -- runtime checks and the guarded import ------------------------------------------------


def check_runtime(name: LibraryName, *, installed: bool | None = None) -> None:
    """Raise BackendUnavailable unless ``name`` can run here; imports nothing of it.

    ``installed`` overrides the package lookup (for tests of the CUDA checks).
    """
    if installed is None:
        installed = importlib.util.find_spec(name) is not None
    if not installed:
        raise BackendUnavailable(
            f"the {name} package is not installed; install it with `pip install tabby[{name}]` "
            f"(it needs an NVIDIA GPU, a CUDA build of torch and the CUDA toolkit), or choose "
            f'backend = "reference"',
            param="backend",
        )
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible GPU"
        raise BackendUnavailable(
            f"{name} needs an NVIDIA GPU with CUDA, but this machine has {build}; run on a "
            f'CUDA machine with a CUDA build of torch, or choose backend = "reference"',
            param="backend",
        )
    need = _MIN_CAPABILITY[name]
    for index in range(torch.cuda.device_count()):
        have = torch.cuda.get_device_capability(index)
        if tuple(have) < need:
            raise BackendUnavailable(
                f"{name} needs compute capability {need[0]}.{need[1]} or newer; GPU {index} "
                f"({torch.cuda.get_device_name(index)}) has {have[0]}.{have[1]}",
                param="backend",
            )


def import_library(
    name: LibraryName,
    *,
    note: Callable[[str], None] | None = None,
    timeout_s: float = IMPORT_TIMEOUT_S,
) -> ModuleType:
    """Import ``name`` after :func:`check_runtime`, turning build failures into clear errors.

    The first import compiles the extension, so it runs in its own thread under a
    deadline; ``note`` (default: the log) hears that a compile may be under way.
    """
    check_runtime(name)
    say = note or log.info
    say(f"importing {name}: compiling the {name} CUDA extension (first run only)")
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"import-{name}")
    future = pool.submit(importlib.import_module, name)
    try:
        module = future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise BackendUnavailable(
            f"importing {name} did not finish within {timeout_s:.0f} s (its CUDA extension is "
            f"still compiling; if an earlier build was interrupted, delete the `lock` file in "
            f"$TORCH_EXTENSIONS_DIR/{name}_ext and retry)",
            param="backend",
        ) from None
    except (ImportError, OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        raise BackendUnavailable(
            f"{name} could not be imported: its CUDA extension failed to build or load "
            f"({type(exc).__name__}: {str(exc).strip()[:400]}). It needs nvcc of the same CUDA "
            f"major version as torch, gcc, ninja and the CUDA headers (set CUDA_HOME)",
            param="backend",
        ) from exc
    finally:
        pool.shutdown(wait=False)
    say(f"{name} imported")
    return module


# -- load-time rules ---------------------------------------------------------------------


@attrs.frozen
class CacheBits:
    """A quantized exllamav3 cache: bits per key and per value element."""

    k_bits: int
    v_bits: int


def parse_cache_mode_v3(mode: str) -> CacheBits | None:
    """``FP16`` → None (the default layer); ``Q4/Q6/Q8`` or ``"k,v"`` (2..8 each) → bits."""
    text = mode.strip().upper()
    if text == "FP16":
        return None
    if text in _QUANT_BITS:
        bits = _QUANT_BITS[text]
        return CacheBits(bits, bits)
    match = _BITS_PAIR.match(text)
    if match is None:
        raise InvalidRequest(
            f"cache_mode {mode!r} is not FP16, Q8, Q6, Q4 or a 'k_bits,v_bits' pair with "
            f"each from 2 to 8",
            param="cache_mode",
        )
    return CacheBits(int(match.group(1)), int(match.group(2)))


def parse_cache_mode_v2(mode: str) -> str:
    """One of FP16/Q8/Q6/Q4; an exllamav3 ``"k,v"`` pair falls back to FP16 (as upstream)."""
    text = mode.strip().upper()
    if text == "FP16" or text in _QUANT_BITS:
        return text
    if _BITS_PAIR.match(text):
        log.warning("cache_mode %r is for exllamav3 only; exllamav2 uses FP16", mode)
        return "FP16"
    raise InvalidRequest(
        f"cache_mode {mode!r} is not one of FP16, Q8, Q6, Q4", param="cache_mode"
    )


def round_up_to_page(tokens: int) -> int:
    return -(-tokens // PAGE_SIZE) * PAGE_SIZE


@attrs.frozen
class ContextSize:
    max_seq_len: int  # longest prompt + output of one job
    cache_size: int  # tokens shared by every live job; a multiple of PAGE_SIZE


def size_context(
    library: LibraryName,
    *,
    max_seq_len: int | None,
    cache_size: int | None,
    native: int | None,
    paged: bool = True,
) -> ContextSize:
    """The context and cache sizes of a load (reference §6.4).

    exllamav3: max_seq_len = given or native or 8192, cache = given or max_seq_len.
    exllamav2 paged: cache = given or max_seq_len or 4096, max_seq_len = given or
    min(native, cache). Unpaged exllamav2 holds one job, so the cache is max_seq_len.
    The cache is rounded up to whole pages and max_seq_len never exceeds it.
    """
    for value, field in ((max_seq_len, "max_seq_len"), (cache_size, "cache_size")):
        if value is not None and value < 1:
            raise InvalidRequest(f"{field} must be positive, got {value}", param=field)
    if library == "exllamav3":
        seq = max_seq_len or native or 8192
        cache = round_up_to_page(cache_size or seq)
    elif paged:
        cache = round_up_to_page(cache_size or max_seq_len or 4096)
        seq = max_seq_len or min(native or cache, cache)
    else:
        seq = max_seq_len or native or 4096
        cache = round_up_to_page(seq)
    return ContextSize(max_seq_len=min(seq, cache), cache_size=cache)


def rope_alpha_auto(target: int, native: int) -> float:
    """NTK alpha for stretching ``native`` context to ``target`` (1.0 when not stretched)."""
    if target <= native:
        return 1.0
    ratio = target / native
    return -0.13436 + 0.80541 * ratio + 0.28833 * ratio * ratio


@attrs.frozen
class Placement:
    """How weights go onto GPUs: ``single``, ``manual`` (GB per GPU), ``auto`` or ``tp``."""

    mode: Literal["single", "manual", "auto", "tp"]
    gpu_split: tuple[float, ...] = ()


def placement(
    *, devices: int, gpu_split: Sequence[float], gpu_split_auto: bool, tensor_parallel: bool
) -> Placement:
    """Reference §6.7: one GPU ignores split options; a split wins over autosplit."""
    split = tuple(float(x) for x in gpu_split)
    if tensor_parallel:
        if devices < 2:
            raise InvalidRequest(
                f"tensor_parallel needs at least 2 GPUs, {devices} visible",
                param="tensor_parallel",
            )
        return Placement("tp", split)
    if devices <= 1:
        return Placement("single")
    if split:
        return Placement("manual", split)
    return Placement("auto") if gpu_split_auto else Placement("single")


def _pad(values: Sequence[float], devices: int) -> list[float]:
    return [*values[:devices], *([0.0] * max(0, devices - len(values)))]


def autosplit_reserve_bytes(reserve_mb: Sequence[float], devices: int) -> list[int]:
    """exllamav2's ``reserve_vram``: bytes per device (the config gives MB; padded with 0)."""
    return [math.ceil(mb * 1024**2) for mb in _pad(reserve_mb, devices)]


def autosplit_reserve_gb(reserve_mb: Sequence[float], devices: int) -> list[float]:
    """exllamav3's ``reserve_per_device``: GB per device (the config gives MB)."""
    return [mb / 1024 for mb in _pad(reserve_mb, devices)]


# -- pre-enqueue rules -------------------------------------------------------------------


@attrs.frozen
class JobLimits:
    max_new_tokens: int  # what the library job gets
    context_bound: bool  # True when max_seq_len, not the request, set that number


def job_limits(job: GenerationJob, *, max_seq_len: int, cache_size: int) -> JobLimits:
    """Check that ``job`` fits before the library asserts; clamp output to the context.

    The prompt must fit max_seq_len; output beyond the context is cut there (the job
    then ends with stop_reason ``context_length``); prompt + output must fit the
    cache in whole pages.
    """
    prompt = len(job.prompt_ids)
    if prompt == 0:
        raise InvalidRequest("the prompt is empty", param="prompt")
    if prompt >= max_seq_len:
        raise ContextLengthExceeded(
            f"the prompt has {prompt} tokens, but this model's context is {max_seq_len} "
            f"tokens (room is needed for at least one new token)",
            param="prompt",
        )
    room = max_seq_len - prompt
    wanted = max(1, job.max_new_tokens)
    new = min(wanted, room)
    pages = -(-(prompt + new) // PAGE_SIZE)
    if pages * PAGE_SIZE > cache_size:
        raise ContextLengthExceeded(
            f"the prompt ({prompt} tokens) and up to {new} new tokens need {pages} cache "
            f"pages of {PAGE_SIZE} tokens, but the cache holds {cache_size // PAGE_SIZE}",
            param="max_tokens",
        )
    return JobLimits(new, context_bound=wanted > room)


def clean_strings(strings: Iterable[str]) -> list[str]:
    """Drop empty strings (an empty needle is held forever) and duplicates, keeping order."""
    return list(dict.fromkeys(s for s in strings if s))


def stop_conditions(job: GenerationJob, eos_ids: Iterable[int]) -> list[int | str]:
    """The library's stop conditions: EOS ids always, the job's ids, its stop strings.

    The libraries never stop on EOS unless it is listed here.
    """
    ids: list[int | str] = list(dict.fromkeys((*eos_ids, *job.stop_token_ids)))
    return ids + list(clean_strings(job.stop_strings))


def common_job_kwargs(
    job: GenerationJob,
    *,
    limits: JobLimits,
    eos_ids: Sequence[int],
    filters: Sequence[object],
    embeddings: Sequence[object],
) -> dict[str, Any]:
    """The library job arguments both libraries take alike (the rest are each adapter's)."""
    import torch

    return {
        "input_ids": torch.tensor([job.prompt_ids], dtype=torch.long),
        "max_new_tokens": limits.max_new_tokens,
        "min_new_tokens": job.min_new_tokens,
        "max_skips": 4,
        "seed": job.seed,
        "stop_conditions": stop_conditions(job, eos_ids),
        "decode_special_tokens": True,
        "return_top_tokens": job.top_logprobs if job.logprobs else 0,
        "return_logits": False,
        "return_probs": job.logprobs,
        "filters": list(filters),
        "token_healing": False,
        "identifier": job.job_id,
        "embeddings": list(embeddings),
    }


_NEUTRAL = SamplerSettings()

# Settings fields a library may lack, each with its "off" test.
_OPTIONAL_SAMPLERS: Mapping[str, Callable[[SamplerSettings], bool]] = {
    "typical": lambda s: s.typical in (0.0, 1.0),
    "tfs": lambda s: s.tfs in (0.0, 1.0),
    "top_a": lambda s: s.top_a == 0.0,
    "smoothing_factor": lambda s: s.smoothing_factor == 0.0,
    "mirostat_mode": lambda s: s.mirostat_mode == 0,
    "dynamic_temperature": lambda s: not s.max_temp > s.min_temp,
    "xtc": lambda s: s.xtc_probability == 0.0,
    "dry": lambda s: s.dry_multiplier == 0.0,
    "allowed_tokens": lambda s: not s.allowed_tokens,
}


def unsupported_samplers(settings: SamplerSettings, supported: Iterable[str]) -> list[str]:
    """Names of samplers in use that the library lacks (ignored, and logged once)."""
    have = set(supported)
    return [
        name for name, off in _OPTIONAL_SAMPLERS.items() if name not in have and not off(settings)
    ]


# -- result dicts → JobResult -------------------------------------------------------------


class PieceSource(Protocol):
    def piece(self, token_id: int) -> str: ...


_FINISH: Mapping[str, tuple[FinishReason, StopReason | None]] = {
    "stop_token": ("stop", "stop_token"),
    "stop_string": ("stop", "stop_string"),
    "max_new_tokens": ("length", "max_new_tokens"),
    "end_filter": ("stop", "constraint"),
    "loop_detected": ("stop", None),
}


def rows_of(value: Any) -> list[Any]:
    """The first row of a ``(1, n[, k])`` tensor (or nested list) as plain Python lists."""
    data = value.tolist() if hasattr(value, "tolist") else value
    return list(data[0]) if data else []


def _logprob(p: float) -> float:
    if p <= 0.0 or math.isnan(p):
        return LOGPROB_FLOOR
    return max(math.log(p), LOGPROB_FLOOR)


def _logprobs(
    result: Mapping[str, Any], ids: list[int], pieces: PieceSource, top_n: int
) -> list[TokenLogprob]:
    if result.get("logits") is not None:
        return logprobs_from_logits(result["logits"], ids, pieces, top_n)
    probs = rows_of(result["token_probs"]) if "token_probs" in result else []
    if not probs:
        return []
    top_ids = rows_of(result["top_k_tokens"]) if "top_k_tokens" in result else []
    top_ps = rows_of(result["top_k_probs"]) if "top_k_probs" in result else []
    out: list[TokenLogprob] = []
    for i, (token, p) in enumerate(zip(ids, probs, strict=False)):
        top: tuple[tuple[int, str, float], ...] = ()
        if i < len(top_ids):
            top = tuple(
                (int(t), pieces.piece(int(t)), _logprob(float(q)))
                for t, q in zip(top_ids[i], top_ps[i], strict=False)
            )
        out.append(TokenLogprob(int(token), pieces.piece(int(token)), _logprob(float(p)), top))
    return out


def logprobs_from_logits(
    logits: Any, ids: Sequence[int], pieces: PieceSource, top_n: int
) -> list[TokenLogprob]:
    """Logprobs of the model's distribution from a ``(1, n, vocab)`` logits tensor.

    As the reference engine reports them: softmax at temperature 1 of the logits after
    bias, penalties and bans (exllamav2 applies those to the tensor it returns), before
    any truncation; so greedy decoding still reports how sure the model was, not the
    sampler's one-hot choice. Banned tokens (-inf) never appear among the alternatives.
    """
    import torch

    rows = logits[0, : len(ids)].float()
    logp = torch.log_softmax(rows, dim=-1)
    chosen = torch.tensor(list(ids), dtype=torch.long).unsqueeze(1)
    picked = logp.gather(1, chosen).squeeze(1).tolist()
    top_ids: list[list[int]] = []
    top_lps: list[list[float]] = []
    if top_n > 0:
        values, indices = logp.topk(min(top_n, logp.shape[-1]), dim=-1)
        top_ids, top_lps = indices.tolist(), values.tolist()
    out: list[TokenLogprob] = []
    for i, token in enumerate(ids):
        top: tuple[tuple[int, str, float], ...] = ()
        if top_n > 0:
            top = tuple(
                (int(t), pieces.piece(int(t)), max(float(v), LOGPROB_FLOOR))
                for t, v in zip(top_ids[i], top_lps[i], strict=True)
                if not math.isinf(v)
            )
        out.append(
            TokenLogprob(
                int(token), pieces.piece(int(token)), _floored(float(picked[i])), top
            )
        )
    return out


def _floored(logprob: float) -> float:
    if math.isnan(logprob):
        return LOGPROB_FLOOR
    return max(logprob, LOGPROB_FLOOR)


@attrs.define
class _Merged:
    job_id: str
    text: str = ""
    token_ids: list[int] = attrs.field(factory=list)
    logprobs: list[TokenLogprob] = attrs.field(factory=list)
    final: Mapping[str, Any] | None = None


def translate_results(
    results: Iterable[Mapping[str, Any]],
    job_id_of: Callable[[Mapping[str, Any]], str | None],
    pieces: PieceSource,
    *,
    context_bound: Callable[[str], bool] = lambda _job_id: False,
    top_logprobs: Callable[[str], int] = lambda _job_id: 0,
) -> list[JobResult]:
    """One ``JobResult`` per job of one ``iterate()`` call, in first-seen order.

    Streaming results of one job (several per step with speculative decoding) are
    merged; ``started``/``prefill`` carry nothing a client sees. ``job_id_of`` maps a
    dict to our job id (None: a job we no longer track, e.g. cancelled). A v3
    ``error`` result fails that job only. ``context_bound(job_id)`` tells whether the
    job's max_new_tokens was cut to the context (its end is then ``context_length``);
    ``top_logprobs(job_id)`` is how many alternatives a job gets when its logprobs are
    computed from returned logits.
    """
    merged: dict[str, _Merged] = {}
    for result in results:
        stage = result.get("stage")
        if stage not in ("streaming", "error"):
            continue
        job_id = job_id_of(result)
        if job_id is None:
            continue
        entry = merged.setdefault(job_id, _Merged(job_id))
        if entry.final is not None:
            continue
        if stage == "error":
            entry.final = result
            continue
        ids = [int(t) for t in rows_of(result["token_ids"])] if "token_ids" in result else []
        entry.text += str(result.get("text", ""))
        entry.token_ids += ids
        if ids:
            entry.logprobs += _logprobs(result, ids, pieces, top_logprobs(job_id))
        if result.get("eos"):
            entry.final = result
    return [_to_job_result(m, context_bound(m.job_id)) for m in merged.values()]


def _to_job_result(m: _Merged, context_bound: bool) -> JobResult:
    base = JobResult(m.job_id, m.text, tuple(m.token_ids), tuple(m.logprobs))
    final = m.final
    if final is None:
        return base
    if final.get("stage") == "error":
        exc = final.get("error")
        detail = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
        return attrs.evolve(base, finished=True, error=f"the job failed in the backend: {detail}")
    reason = str(final.get("eos_reason", "max_new_tokens"))
    finish, stop = _FINISH.get(reason, ("stop", None))
    if reason == "max_new_tokens" and context_bound:
        stop = "context_length"
    text = m.text
    stop_str: str | None = None
    if reason == "stop_token":
        stop_str = _opt_str(final.get("eos_triggering_token_str"))
        # Held text of a stop string that never completed is output: release it.
        held = final.get("held")
        if isinstance(held, Mapping):
            held_text = str(held.get("text", ""))
            # exllamav2 holds the stop token's own piece too: it is not output.
            if stop_str and held_text.endswith(stop_str):
                held_text = held_text[: -len(stop_str)]
            text += held_text
    elif reason == "stop_string":
        stop_str = _opt_str(final.get("eos_triggering_string"))
    stats = JobStats(
        prompt_tokens=int(final.get("prompt_tokens", 0)),
        cached_tokens=int(final.get("cached_tokens", 0)),
        generated_tokens=int(final.get("new_tokens", 0)),
        queue_time=float(final.get("time_enqueued", 0.0)),
        prefill_time=float(final.get("time_prefill", 0.0)),
        decode_time=float(final.get("time_generate", 0.0)),
    )
    return attrs.evolve(
        base,
        text=text,
        finished=True,
        finish_reason=finish,
        stop_reason=stop,
        stop_str=stop_str,
        stats=stats,
    )


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def chunk_size_for(requested: int) -> int:
    """Prefill chunk: a whole number of pages, at least one (the libraries assert it)."""
    return max(PAGE_SIZE, round_up_to_page(requested))


# -- the job bookkeeping of both backends ---------------------------------------------------
