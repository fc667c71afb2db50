"""The exllamav3 backend: EXL3 (and unquantized) models on NVIDIA GPUs.

Nothing here imports exllamav3 at module import time: the library is imported by
:func:`load` only, after the runtime checks of ``exllama_common`` (its first import
compiles a CUDA extension for minutes). Everything that decides what the library is
asked to do is a pure function of our own types (``build_sampler_steps``,
``cache_kwargs``, ``load_kwargs``, ``filter_kwargs``, ``job_kwargs``), so it is tested
on machines without a GPU; the library objects are made from them at the last moment.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any, Literal

import attrs

from tabby.backends.base import Capabilities, LoadProgress, LoadSpec, ModelInfo, ProgressCallback
from tabby.backends.constraints import llguidance_grammar
from tabby.backends.exllama_backend import LibraryBackend, free_vram, unload_all
from tabby.backends.exllama_common import (
    CacheBits,
    JobLimits,
    LibraryName,
    Placement,
    autosplit_reserve_gb,
    check_runtime,
    chunk_size_for,
    clean_strings,
    common_job_kwargs,
    import_library,
    parse_cache_mode_v3,
    placement,
    size_context,
)
from tabby.backends.exllama_tokenizer import LibraryTokenizer, read_tokenizer_facts
from tabby.errors import ConstraintError, NotSupported
from tabby.jobs import ConstraintSpec, GenerationJob, SamplerSettings

__all__ = [
    "DEFAULT_DRAFT_TOKENS",
    "SUPPORTED_SAMPLERS",
    "ExLlamaV3Backend",
    "build_sampler_steps",
    "cache_kwargs",
    "check",
    "filter_kwargs",
    "job_kwargs",
    "load",
    "load_kwargs",
    "materialise_sampler",
    "requeue_budget",
]

log = logging.getLogger(__name__)

NAME: LibraryName = "exllamav3"
# Samplers of SamplerSettings that exllamav3 has (the rest are warned about and ignored).
SUPPORTED_SAMPLERS = ("xtc", "dry", "allowed_tokens")
DEFAULT_DRAFT_TOKENS = 4
# Batch slots when the user gives none (upstream: 4 for recurrent models).
DEFAULT_MAX_BATCH_SIZE = 128
RECURRENT_MAX_BATCH_SIZE = 4
# A penalty range "whole context" in the library's terms.
WHOLE_CONTEXT = int(10e7)
# Samplers that take the library tokenizer (XTC's protected tokens, DRY's defaults).
_NEEDS_TOKENIZER = frozenset({"SS_XTC", "SS_DRY"})

Step = tuple[str, dict[str, Any]]


def check() -> None:
    """The registry's availability check: raises BackendUnavailable; imports nothing."""
    check_runtime(NAME)


# -- translation of our types (pure) ------------------------------------------------------


def build_sampler_steps(
    s: SamplerSettings,
    *,
    eos_ids: Sequence[int],
    vocab_size: int,
    dry_breaker_ids: Iterable[int] = (),
) -> list[Step]:
    """The ``CustomSampler`` stack for ``s``, as (step class name, kwargs) pairs.

    Order as upstream: bias, penalties, bans, then temperature/top-k/top-p/min-p
    (temperature last when asked), XTC, and a sampling step; temperature 0 keeps only
    bias, penalties and bans and ends with argmax.
    """
    steps: list[Step] = []
    bias: dict[int, float] = {}
    for token, value in s.logit_bias:
        bias[token] = bias.get(token, 0.0) + value
    if bias:
        steps.append(("SS_LogitBias", {"logit_bias": bias}))
    sustain = s.penalty_range if s.penalty_range > 0 else WHOLE_CONTEXT
    decay = max(s.repetition_decay, 1)
    steps.append(
        ("SS_RepP", {"rep_p": s.repetition_penalty, "sustain_range": sustain, "decay_range": decay})
    )
    steps.append(
        (
            "SS_PresFreqP",
            {
                "pres_p": s.presence_penalty,
                "freq_p": s.frequency_penalty,
                "sustain_range": sustain,
                "decay_range": decay,
            },
        )
    )
    if s.dry_multiplier > 0:
        steps.append(
            (
                "SS_DRY",
                {
                    "dry_multiplier": s.dry_multiplier,
                    "dry_base": s.dry_base,
                    "dry_allowed_length": s.dry_allowed_length,
                    "dry_range": s.dry_range,
                    "dry_sequence_breakers": sorted(set(dry_breaker_ids)),
                },
            )
        )
    banned = set(s.banned_tokens)
    if s.ban_eos_token:
        banned.update(eos_ids)
    if s.allowed_tokens:
        allowed = set(s.allowed_tokens)
        banned.update(t for t in range(vocab_size) if t not in allowed)
    if banned:
        steps.append(("SS_BanTokens", {"token_ids": sorted(banned)}))
    if s.temperature <= 0.0:
        steps.append(("SS_Argmax", {}))
        return steps
    if not s.temperature_last:
        steps.append(("SS_Temperature", {"temperature": s.temperature}))
    steps.append(("SS_TopK", {"top_k": s.top_k}))
    steps.append(("SS_TopP", {"top_p": s.top_p}))
    steps.append(("SS_MinP", {"min_p": s.min_p}))
    if s.temperature_last:
        steps.append(("SS_Temperature", {"temperature": s.temperature}))
    if s.xtc_probability > 0:
        steps.append(
            ("SS_XTC", {"probability": s.xtc_probability, "threshold": s.xtc_threshold})
        )
    steps.append(("SS_Sample", {}))
    return steps


def materialise_sampler(steps: Sequence[Step], lib: ModuleType, tokenizer: object) -> object:
    """A fresh ``CustomSampler`` (samplers hold per-job state: never share one)."""
    made = []
    for name, kwargs in steps:
        extra = {"tokenizer": tokenizer} if name in _NEEDS_TOKENIZER else {}
        made.append(getattr(lib, name)(**kwargs, **extra))
    return lib.CustomSampler(made)


def filter_kwargs(constraint: ConstraintSpec) -> dict[str, Any]:
    """``LLGuidanceFilter`` arguments besides the tokenizer; completion ends the job.

    The grammar is compiled by tabby's own constraint compiler, so JSON is bounded the
    same way on every backend (the library's defaults let whitespace fill the budget).
    """
    return {"eos_after_completed": True, "llg_grammar": llguidance_grammar(constraint)}


def requeue_budget(max_new_tokens: int, chunk_size: int) -> int | None:
    """``max_rq_tokens``: how many new tokens the library reserves cache pages for at once.

    The library reserves pages for prompt + this budget (rounded up to whole pages) before
    a job may start, so a budget far above what the job can generate keeps other jobs
    waiting: a chunk of 2048 for a 256-token answer took 9 pages instead of 2, and only 3
    of 16 jobs fit a 32-page cache. None reserves exactly the answer; only an answer
    longer than a chunk is generated chunk by chunk (its pages are requeued per chunk).
    """
    return chunk_size if max_new_tokens > chunk_size else None


def job_kwargs(
    job: GenerationJob,
    *,
    limits: JobLimits,
    eos_ids: Sequence[int],
    chunk_size: int,
    sampler: object,
    filters: Sequence[object] = (),
    embeddings: Sequence[object] = (),
) -> dict[str, Any]:
    """Every ``Job(...)`` argument, explicit (the library defaults are not neutral)."""
    return {
        **common_job_kwargs(
            job, limits=limits, eos_ids=eos_ids, filters=filters, embeddings=embeddings
        ),
        "sampler": sampler,
        "banned_strings": clean_strings(job.banned_strings),
        "max_rq_tokens": requeue_budget(limits.max_new_tokens, chunk_size),
    }


def cache_kwargs(
    bits: CacheBits | None, *, cache_size: int, max_batch_size: int, max_history: int
) -> dict[str, Any]:
    """``Cache(model, ...)`` arguments; ``layer_type`` is a class name of the library."""
    out: dict[str, Any] = {
        "max_num_tokens": cache_size,
        "max_batch_size": max_batch_size,
        "max_history": max_history,
    }
    if bits is None:
        out["layer_type"] = "CacheLayer_fp16"
    else:
        out.update(layer_type="CacheLayer_quant", k_bits=bits.k_bits, v_bits=bits.v_bits)
    return out


def load_kwargs(place: Placement, *, reserve_mb: Sequence[float], devices: int) -> dict[str, Any]:
    """Where ``model.load_gen`` puts the weights (GB per device in the library's terms)."""
    if place.mode == "single":
        return {"device": "cuda:0"}
    if place.mode == "manual":
        return {"use_per_device": list(place.gpu_split)}
    if place.mode == "tp":
        out: dict[str, Any] = {"tensor_p": True, "tp_backend": "native"}
        if place.gpu_split:
            out["use_per_device"] = list(place.gpu_split)
        return out
    return {"reserve_per_device": autosplit_reserve_gb(reserve_mb, devices)}


# -- the backend ---------------------------------------------------------------------------


@attrs.frozen
class _Parts:
    """Library objects of one load, freed together."""

    model: Any
    cache: Any
    generator: Any
    draft_model: Any = None
    draft_cache: Any = None
    vision: Any = None


class ExLlamaV3Backend(LibraryBackend[_Parts]):
    """Implements ``tabby.backends.base.Backend``; used from one worker thread."""

    library = NAME
    supported_samplers = SUPPORTED_SAMPLERS

    def __init__(
        self,
        lib: ModuleType,
        parts: _Parts,
        tokenizer: LibraryTokenizer,
        info: ModelInfo,
    ) -> None:
        super().__init__(parts, tokenizer, info)
        self._lib = lib

    def _library_job(
        self, parts: _Parts, job: GenerationJob, limits: JobLimits, dry_breaker_ids: list[int]
    ) -> object:
        steps = build_sampler_steps(
            job.sampler,
            eos_ids=self._eos,
            vocab_size=self._tokenizer.vocab_size,
            dry_breaker_ids=dry_breaker_ids,
        )
        sampler = materialise_sampler(steps, self._lib, self._tokenizer.library)
        filters = [self._make_filter(job.constraint)] if job.constraint is not None else []
        kwargs = job_kwargs(
            job,
            limits=limits,
            eos_ids=self._eos,
            chunk_size=self._info.chunk_size,
            sampler=sampler,
            filters=filters,
            embeddings=job.embeddings,
        )
        return self._lib.Job(**kwargs)

    def _make_filter(self, constraint: ConstraintSpec) -> object:
        try:
            return self._lib.LLGuidanceFilter(self._tokenizer.library, **filter_kwargs(constraint))
        except ValueError as exc:
            raise ConstraintError(f"invalid {constraint.kind}: {exc}", param="constraint") from None

    def _job_counts(self) -> tuple[int, int]:
        gen = self._parts.generator if self._parts is not None else None
        active = int(gen.num_active_jobs()) if gen is not None else 0
        pending = int(gen.num_pending_jobs()) if gen is not None else 0
        return active, pending

    def image_embedding(self, image: object) -> object:
        """An ``MMEmbedding`` for a PIL image (its ``text_alias`` goes into the prompt)."""
        parts = self._require()
        if parts.vision is None:
            raise NotSupported("this model was loaded without a vision tower (set vision = true)")
        return parts.vision.get_image_embeddings(tokenizer=self._tokenizer.library, image=image)

    def _release(self, parts: _Parts) -> None:
        unload_all((parts.model, parts.draft_model, parts.vision))
        parts.generator.close()


# -- loading ---------------------------------------------------------------------------------


def _load_component(
    model: Any,
    kwargs: Mapping[str, Any],
    kind: Literal["model", "draft", "vision"],
    progress: ProgressCallback,
) -> None:
    """Run ``model.load_gen`` to the end, one LoadProgress per module."""
    modules = list(getattr(model, "modules", None) or ())
    total = len(modules)
    if "device" in kwargs:
        # Onto one device, load_gen loads every module without yielding: count the
        # modules' own loads instead.
        def report(done: int) -> None:
            progress(LoadProgress(kind, done, total))

        with _counting_loads(modules, report):
            for _ in model.load_gen(**kwargs):
                pass
    else:
        for item in model.load_gen(**kwargs):
            if isinstance(item, tuple) and len(item) == 2:
                done, total = int(item[0]), int(item[1])
                progress(LoadProgress(kind, done, total))
    progress(LoadProgress(kind, total, total, "finished"))


@contextlib.contextmanager
def _counting_loads(modules: Sequence[Any], report: Callable[[int], None]) -> Iterator[None]:
    """Call ``report(n)`` after each of ``modules`` has loaded (n loads so far).

    Each module's ``load`` is shadowed on the instance for the duration only.
    """
    done = 0

    def counted(original: Callable[..., Any]) -> Callable[..., Any]:
        def load(*args: Any, **kwargs: Any) -> Any:
            nonlocal done
            result = original(*args, **kwargs)
            done += 1
            report(done)
            return result

        return load

    wrapped = []
    for module in modules:
        try:
            module.load = counted(module.load)
        except AttributeError:  # no per-instance attributes: no progress for it
            continue
        wrapped.append(module)
    try:
        yield
    finally:
        for module in wrapped:
            del module.load


def _warm_up(model: Any, cache: Any, *, chunk: int, batch: int) -> None:
    """Pay the library's first-use costs (Triton compiles, GEMM autotuning, graph
    workspaces) at load rather than in the first requests' time to first token. Must run
    before a Generator uses the cache (its passes write the leading pages)."""
    warmup = getattr(model, "warmup", None)  # exllamav3 >= 1.6
    if warmup is None:
        return
    failed = warmup(cache, max_chunk_size=chunk, max_batch_size=batch)
    if failed:
        log.warning("exllamav3 warm-up passes failed (they run on first use instead): %s", failed)


def _make_cache(lib: ModuleType, model: Any, kwargs: Mapping[str, Any]) -> Any:
    args = dict(kwargs)
    args["layer_type"] = getattr(lib, args["layer_type"])
    return lib.Cache(model, **args)


def load(spec: LoadSpec, progress: ProgressCallback) -> ExLlamaV3Backend:
    """Load an exllamav3 model folder (blocking; run it in a worker thread)."""
    lib = import_library(NAME)
    import torch

    path = str(spec.path)
    config = lib.Config.from_directory(path)
    size = size_context(
        NAME,
        max_seq_len=spec.max_seq_len,
        cache_size=spec.cache_size,
        native=getattr(config, "max_position_embeddings", None),
    )
    if spec.rope_scale not in (None, 1.0) or spec.rope_alpha not in (None, 1.0):
        log.warning("exllamav3 takes RoPE settings from config.json; rope_scale/rope_alpha ignored")
    if spec.loras:
        raise NotSupported("LoRAs are not supported by the exllamav3 backend", param="loras")
    chunk = chunk_size_for(spec.chunk_size)
    bits = parse_cache_mode_v3(spec.cache_mode)
    devices = torch.cuda.device_count()
    where = load_kwargs(
        placement(
            devices=devices,
            gpu_split=spec.gpu_split,
            gpu_split_auto=spec.gpu_split_auto,
            tensor_parallel=spec.tensor_parallel,
        ),
        reserve_mb=spec.autosplit_reserve,
        devices=devices,
    )
    side = {k: v for k, v in where.items() if k not in ("tensor_p", "tp_backend")}
    loaded: list[Any] = []
    try:
        vision = None
        if spec.vision:
            if "vision" in getattr(config, "model_classes", {}):
                vision = lib.Model.from_config(config, component="vision")
                _load_component(vision, side, "vision", progress)
                loaded.append(vision)
            else:
                log.warning("vision = true, but %s has no vision tower", spec.name)
        model = lib.Model.from_config(config)
        caps = getattr(model, "caps", {}) or {}
        batch = spec.max_batch_size or (
            RECURRENT_MAX_BATCH_SIZE if caps.get("recurrent_states") else DEFAULT_MAX_BATCH_SIZE
        )
        draft_model = draft_cache = None
        num_draft = 0
        if spec.draft is not None:
            num_draft = spec.draft.num_tokens or int(
                caps.get("default_draft_size") or DEFAULT_DRAFT_TOKENS
            )
            draft_config = lib.Config.from_directory(str(spec.draft.path))
            draft_model = lib.Model.from_config(draft_config)
            draft_cache = _make_cache(
                lib,
                draft_model,
                cache_kwargs(
                    parse_cache_mode_v3(spec.draft.cache_mode),
                    cache_size=size.cache_size,
                    max_batch_size=batch,
                    max_history=0,
                ),
            )
            draft_where = (
                {"use_per_device": list(spec.draft.gpu_split)} if spec.draft.gpu_split else side
            )
            _load_component(draft_model, draft_where, "draft", progress)
            loaded.append(draft_model)
        # The cache must exist before model.load: loading allocates it.
        cache = _make_cache(
            lib,
            model,
            cache_kwargs(bits, cache_size=size.cache_size, max_batch_size=batch, max_history=num_draft),
        )
        _load_component(
            model, {**where, "max_chunk_size": chunk, "max_batch_size": batch}, "model", progress
        )
        loaded.append(model)
        _warm_up(model, cache, chunk=chunk, batch=batch)
        tokenizer = lib.Tokenizer.from_config(config)
        generator = lib.Generator(
            model=model,
            cache=cache,
            tokenizer=tokenizer,
            max_batch_size=batch,
            max_chunk_size=chunk,
            draft_model=draft_model,
            draft_cache=draft_cache,
            num_draft_tokens=num_draft or None,
        )
    except BaseException:
        unload_all(loaded)
        free_vram()
        raise
    # Creating the Tokenizer completed the config's EOS list (generation_config etc.).
    eos = tuple(dict.fromkeys(int(i) for i in (config.eos_token_id_list or [])))
    facts = read_tokenizer_facts(spec.path)
    adapter = LibraryTokenizer(tokenizer)
    info = ModelInfo(
        name=spec.name,
        backend=NAME,
        max_seq_len=size.max_seq_len,
        vocab_size=adapter.vocab_size,
        bos_token_id=getattr(config, "bos_token_id", None),
        eos_token_ids=eos,
        bos_token=facts.bos_token,
        eos_token=facts.eos_token,
        pad_token=facts.pad_token,
        unk_token=facts.unk_token,
        add_bos_token=facts.add_bos_token,
        chat_template=facts.chat_template,
        cache_size=size.cache_size,
        cache_mode=spec.cache_mode,
        max_batch_size=batch,
        chunk_size=chunk,
        capabilities=Capabilities(vision=vision is not None, draft=draft_model is not None),
        path=path,
    )
    parts = _Parts(model, cache, generator, draft_model, draft_cache, vision)
    return ExLlamaV3Backend(lib, parts, adapter, info)
