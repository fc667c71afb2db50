"""The exllamav2 backend: EXL2/GPTQ (and unquantized) models on NVIDIA GPUs.

A compatibility backend (the library has had no release since 0.3.2). As in the
exllamav3 adapter, the library is imported only by :func:`load`, and every decision is a
pure function tested without a GPU: ``sampler_settings_fields``, ``build_token_bias``,
``job_kwargs``, ``decide_paging``, ``cache_class_name``. Constraints go through a small
``ExLlamaV2Filter`` subclass whose logic lives in :class:`GuidanceState`, a view of a
masker from the model's :class:`~tabby.backends.constraints.ConstraintCompiler` (made at load,
owned by the backend; testable with llguidance alone); the subclass is made when the
library is loaded.
One module, as the library's job, sampler, filter and loader form one adapter.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import attrs

from tabby.backends.base import (
    Capabilities,
    LoadProgress,
    LoadSpec,
    LoraSpec,
    ModelInfo,
    ProgressCallback,
)
from tabby.backends.constraints import ConstraintCompiler, request_field
from tabby.backends.exllama_backend import LibraryBackend, free_vram, unload_all
from tabby.backends.exllama_common import (
    JobLimits,
    LibraryName,
    autosplit_reserve_bytes,
    check_runtime,
    chunk_size_for,
    clean_strings,
    common_job_kwargs,
    import_library,
    parse_cache_mode_v2,
    placement,
    rope_alpha_auto,
    size_context,
)
from tabby.backends.exllama_tokenizer import LibraryTokenizer, read_tokenizer_facts
from tabby.errors import Conflict, NotSupported
from tabby.jobs import ConstraintSpec, GenerationJob, SamplerSettings

__all__ = [
    "SUPPORTED_SAMPLERS",
    "ExLlamaV2Backend",
    "GuidanceState",
    "build_token_bias",
    "cache_class_name",
    "check",
    "decide_paging",
    "job_kwargs",
    "load",
    "make_filter_class",
    "sampler_settings_fields",
]

log = logging.getLogger(__name__)

NAME: LibraryName = "exllamav2"
SUPPORTED_SAMPLERS = (
    "typical", "tfs", "top_a", "smoothing_factor", "mirostat_mode", "dynamic_temperature",
    "xtc", "dry", "allowed_tokens",
)
# Rows of logits the model returns per forward pass (as upstream).
MAX_OUTPUT_LEN = 16
DRY_MAX_NGRAM = 20


def check() -> None:
    """The registry's availability check: raises BackendUnavailable; imports nothing."""
    check_runtime(NAME)


# -- sampler settings (pure) ---------------------------------------------------------------


def sampler_settings_fields(
    s: SamplerSettings, *, max_seq_len: int, dry_breaker_ids: Iterable[int] = ()
) -> dict[str, Any]:
    """Every ``ExLlamaV2Sampler.Settings`` field, explicit (its defaults are not neutral).

    ``token_bias`` is left None here; :func:`build_token_bias` makes the tensor.
    """
    if s.mirostat_mode not in (0, 2):
        log.warning("mirostat_mode %d is not supported (only 2); ignored", s.mirostat_mode)
    greedy = s.temperature <= 0.0
    dynamic = s.max_temp > s.min_temp
    rep_range = s.penalty_range or max_seq_len
    decay = s.repetition_decay or (rep_range if rep_range > 0 else 0)
    breakers = set(dry_breaker_ids)
    return {
        "token_repetition_penalty": s.repetition_penalty,
        "token_repetition_range": rep_range,
        "token_repetition_decay": decay,
        "token_frequency_penalty": s.frequency_penalty,
        "token_presence_penalty": s.presence_penalty,
        # Greedy as upstream: temperature 1 with top-k 1 (the sampler's own greedy path).
        "temperature": 1.0 if greedy else s.temperature,
        "smoothing_factor": 0.0 if greedy else s.smoothing_factor,
        "min_temp": s.min_temp if dynamic and not greedy else 1.0,
        "max_temp": s.max_temp if dynamic and not greedy else 1.0,
        "temp_exponent": s.temp_exponent if dynamic and not greedy else 1.0,
        "top_k": 1 if greedy else s.top_k,
        "top_p": 0.0 if greedy else s.top_p,
        "top_a": 0.0 if greedy else s.top_a,
        "min_p": 0.0 if greedy else s.min_p,
        "tfs": 0.0 if greedy else s.tfs,
        "typical": 0.0 if greedy else s.typical,
        "skew": 0.0,
        "temperature_last": s.temperature_last,
        "mirostat": s.mirostat_mode == 2 and not greedy,
        "mirostat_tau": s.mirostat_tau,
        "mirostat_eta": s.mirostat_eta,
        "mirostat_mu": None,
        "token_bias": None,
        "cfg_scale": None,
        "post_sampling_hooks": [],
        "dry_allowed_length": s.dry_allowed_length,
        "dry_base": s.dry_base,
        "dry_multiplier": s.dry_multiplier,
        "dry_sequence_breakers": breakers,
        "dry_range": s.dry_range or max_seq_len,
        "dry_max_ngram": DRY_MAX_NGRAM,
        "xtc_probability": 0.0 if greedy else s.xtc_probability,
        "xtc_threshold": s.xtc_threshold,
        "xtc_ignore_tokens": None,
    }


def build_token_bias(
    s: SamplerSettings, *, eos_ids: Sequence[int], vocab_size: int
) -> Any | None:
    """The additive ``token_bias`` tensor (size padded to 32) or None when nothing is set.

    Logit bias, banned tokens, a banned EOS and an allow-list all land here.
    """
    if not (s.logit_bias or s.banned_tokens or s.ban_eos_token or s.allowed_tokens):
        return None
    import torch

    padded = -(-vocab_size // 32) * 32
    bias = torch.zeros(padded, dtype=torch.float)
    for token, value in s.logit_bias:
        if 0 <= token < padded:
            bias[token] += value
    banned = list(s.banned_tokens) + (list(eos_ids) if s.ban_eos_token else [])
    for token in banned:
        if 0 <= token < padded:
            bias[token] = float("-inf")
    if s.allowed_tokens:
        keep = torch.zeros(padded, dtype=torch.bool)
        keep[[t for t in s.allowed_tokens if 0 <= t < padded]] = True
        bias[~keep] = float("-inf")
    return bias


def job_kwargs(
    job: GenerationJob,
    *,
    limits: JobLimits,
    eos_ids: Sequence[int],
    gen_settings: object,
    filters: Sequence[object] = (),
    embeddings: Sequence[object] = (),
) -> dict[str, Any]:
    """Every ``ExLlamaV2DynamicJob(...)`` argument, explicit."""
    banned = clean_strings(job.banned_strings)
    if banned and filters:
        raise NotSupported(
            "the exllamav2 backend cannot combine banned strings with a constraint",
            param="banned_strings",
        )
    return {
        **common_job_kwargs(
            job, limits=limits, eos_ids=eos_ids, filters=filters, embeddings=embeddings
        ),
        "gen_settings": gen_settings,
        "filter_prefer_eos": True,
        "banned_strings": banned or None,
        # The library's probabilities are those of the truncated distribution it sampled
        # from (greedy: one-hot, 0 / -1000); logprobs are computed from the logits instead
        # (``exllama_common.logprobs_from_logits``).
        "return_probs": False,
        "return_top_tokens": 0,
        "return_logits": job.logprobs,
    }


def decide_paging(*, flash_attn_paged: bool, no_flash_attn: bool, max_batch_size: int) -> tuple[bool, int]:
    """Paged (batched) attention needs flash-attn ≥ 2.5.7; otherwise one job at a time."""
    if flash_attn_paged and not no_flash_attn:
        return True, max_batch_size
    return False, 1


def cache_class_name(mode: str) -> str:
    """The exllamav2 cache class for a cache mode (FP16/Q8/Q6/Q4)."""
    return {"FP16": "ExLlamaV2Cache", "Q8": "ExLlamaV2Cache_Q8", "Q6": "ExLlamaV2Cache_Q6",
            "Q4": "ExLlamaV2Cache_Q4"}[parse_cache_mode_v2(mode)]


# -- constraints over llguidance (pure; the library filter class wraps this) -----------------


class GuidanceState:
    """One job's constraint: the begin/feed/next protocol of ``ExLlamaV2Filter``.

    A thin view of a :class:`~tabby.backends.constraints.LLGuidanceMasker` from the model's
    compiler; an invalid spec raises ``ConstraintError`` (400) here, before the job.
    """

    def __init__(
        self, compiler: ConstraintCompiler, spec: ConstraintSpec, eos_ids: Sequence[int]
    ) -> None:
        self._compiler = compiler
        self._spec = spec
        self._eos = tuple(eos_ids)
        self._masker = compiler.masker(spec)
        self._fed: list[int] = []  # what the masker consumed, to rebuild it in a clone

    def begin(self) -> None:
        if self._fed:  # a used state starts over on a fresh matcher
            self._masker = self._compiler.masker(self._spec)
            self._fed.clear()

    def feed(self, token_id: int) -> None:
        # The generator feeds the token that ended the job too; a stopped matcher has
        # nothing left to match it against.
        if not self._masker.is_finished():
            self._masker.consume(token_id)
            self._fed.append(token_id)

    def error(self) -> str | None:
        return self._masker.error

    def finished(self) -> bool:
        """Nothing is left to match: only EOS may follow."""
        return self._masker.is_finished()

    def next(self) -> tuple[set[int], set[int]]:
        """(tokens allowed next, tokens that complete the constraint)."""
        mask = self._masker.allowed()
        allowed: set[int] = set() if mask is None else set(mask.nonzero().flatten().tolist())
        # The masker allows EOS exactly while the constraint is satisfied.
        return allowed, {t for t in self._eos if t in allowed}

    def clone(self) -> GuidanceState:
        """The same constraint at the same point, on its own matcher."""
        twin = GuidanceState(self._compiler, self._spec, self._eos)
        for token_id in self._fed:
            twin.feed(token_id)
        return twin


def make_filter_class(base: type) -> type:
    """An ``ExLlamaV2Filter`` subclass over :class:`GuidanceState` (``base`` needs the import)."""

    class GuidanceFilter(base):  # type: ignore[misc]
        def __init__(self, model: Any, tokenizer: Any, state: GuidanceState) -> None:
            super().__init__(model, tokenizer)
            self.state = state

        def clone(self, c: Any = None) -> Any:
            # The library copies a job's filters this way; each copy needs its own matcher.
            return type(self)(self.model, self.tokenizer, self.state.clone())

        def begin(self, prefix_str: str = "") -> None:
            self.state.begin()

        def feed(self, token: Any) -> None:
            self.state.feed(int(token))

        def next(self) -> tuple[set[int], set[int]]:
            return self.state.next()

        def use_background_worker(self) -> bool:
            return True

    return GuidanceFilter


# -- the backend -----------------------------------------------------------------------------


@attrs.define
class _Parts:
    lib: ModuleType
    gen: ModuleType  # exllamav2.generator
    bias_size: int  # the model's vocabulary (logit rows), for token_bias
    model: Any
    cache: Any
    generator: Any
    filter_class: type
    # Made once per loaded model; None when the folder has no tokenizer.json.
    constraints: ConstraintCompiler | None
    draft_model: Any = None
    vision: Any = None
    loras: list[Any] = attrs.field(factory=list)


class ExLlamaV2Backend(LibraryBackend[_Parts]):
    """Implements ``tabby.backends.base.Backend``; used from one worker thread."""

    library = NAME
    supported_samplers = SUPPORTED_SAMPLERS

    def _library_job(
        self, parts: _Parts, job: GenerationJob, limits: JobLimits, dry_breaker_ids: list[int]
    ) -> object:
        settings = parts.gen.ExLlamaV2Sampler.Settings()
        for field, value in sampler_settings_fields(
            job.sampler, max_seq_len=self._info.max_seq_len, dry_breaker_ids=dry_breaker_ids
        ).items():
            setattr(settings, field, value)
        settings.token_bias = build_token_bias(
            job.sampler, eos_ids=self._eos, vocab_size=parts.bias_size
        )
        filters = []
        if job.constraint is not None:
            if parts.constraints is None:
                raise NotSupported(
                    "constraints need the model's tokenizer.json", param=request_field(job.constraint)
                )
            state = GuidanceState(parts.constraints, job.constraint, self._eos)
            filters.append(parts.filter_class(parts.model, self._tokenizer.library, state))
        kwargs = job_kwargs(
            job, limits=limits, eos_ids=self._eos, gen_settings=settings, filters=filters,
            embeddings=job.embeddings,
        )
        return parts.gen.ExLlamaV2DynamicJob(**kwargs)

    def _constraint_finished(self, library_job: object) -> bool:
        # exllamav2 checks stop tokens before its filters, so a constraint that ends on
        # EOS reports "stop_token"; the filter's matcher says whether it was complete.
        filters = getattr(library_job, "filters", None) or ()
        return any(
            isinstance(getattr(f, "state", None), GuidanceState) and f.state.finished()
            for f in filters
        )

    def set_loras(self, loras: Sequence[LoraSpec]) -> None:
        """Replace the active LoRAs; only while no job is queued (the generator asserts)."""
        parts = self._require()
        if parts.generator.num_remaining_jobs():
            raise Conflict("LoRAs can only change while no generation is running")
        for lora in parts.loras:
            lora.unload()
        parts.loras = [
            parts.lib.ExLlamaV2Lora.from_directory(parts.model, str(s.path), lora_scaling=s.scaling)
            for s in loras
        ]
        parts.generator.set_loras(parts.loras)

    def image_embedding(self, image: object) -> object:
        """An ``ExLlamaV2MMEmbedding`` for a PIL image."""
        parts = self._require()
        if parts.vision is None:
            raise NotSupported("this model was loaded without a vision tower (set vision = true)")
        return parts.vision.get_image_embeddings(
            model=parts.model, tokenizer=self._tokenizer.library, image=image
        )

    def _release(self, parts: _Parts) -> None:
        unload_all(parts.loras)
        unload_all((parts.model, parts.draft_model, parts.vision))


# -- loading -----------------------------------------------------------------------------------


def _configure(lib: ModuleType, path: str, spec_max: int | None, cache: int | None,
               chunk: int, rope_scale: float | None, rope_alpha: float | None,
               paged_possible: bool) -> tuple[Any, int, int, bool]:
    config = lib.ExLlamaV2Config()
    config.model_dir = path
    config.prepare()
    config.arch_compat_overrides()
    native = int(config.max_seq_len)
    paged = paged_possible and not config.no_flash_attn
    size = size_context(NAME, max_seq_len=spec_max, cache_size=cache, native=native, paged=paged)
    config.max_seq_len = size.max_seq_len
    config.max_input_len = chunk
    config.max_attention_size = chunk**2
    config.max_output_len = MAX_OUTPUT_LEN
    if rope_scale is not None:
        config.scale_pos_emb = rope_scale
    config.scale_alpha_value = (
        rope_alpha if rope_alpha is not None else rope_alpha_auto(size.max_seq_len, native)
    )
    if not paged:
        config.no_flash_attn = True
    return config, size.max_seq_len, size.cache_size, paged


def _load_weights(lib: ModuleType, model: Any, cache_cls: Any, cache_size: int, spec: LoadSpec,
                  kind: Literal["model", "draft"], progress: ProgressCallback) -> Any:
    """Load weights with per-module progress; returns the cache (made where the mode needs)."""
    import torch

    def report(done: int, total: int) -> None:
        progress(LoadProgress(kind, done, total))

    devices = torch.cuda.device_count()
    where = placement(devices=devices, gpu_split=spec.gpu_split,
                      gpu_split_auto=spec.gpu_split_auto, tensor_parallel=spec.tensor_parallel)
    if where.mode == "tp":
        for _ in model.load_tp_gen(gpu_split=list(where.gpu_split) or None, callback=report,
                                   expect_cache_tokens=cache_size, expect_cache_base=cache_cls):
            pass
        return lib.ExLlamaV2Cache_TP(model, base=cache_cls, max_seq_len=cache_size)
    if where.mode == "auto":
        cache = cache_cls(model, max_seq_len=cache_size, lazy=True)
        reserve = autosplit_reserve_bytes(spec.autosplit_reserve, devices)
        for _ in model.load_autosplit_gen(cache, reserve_vram=reserve, last_id_only=True,
                                          callback=report):
            pass
        return cache
    split = list(where.gpu_split) or None
    for _ in model.load_gen(gpu_split=split, callback=report):
        pass
    return cache_cls(model, max_seq_len=cache_size)


def _eos_ids(config: Any) -> tuple[int, ...]:
    """The config's EOS id plus generation_config.json's (an int or a list there)."""
    extra = (getattr(config, "generation_config", None) or {}).get("eos_token_id")
    listed = extra if isinstance(extra, list) else [extra]
    ids = [config.eos_token_id, *listed]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _constraint_compiler(
    model_dir: Path, eos_ids: Sequence[int], vocab_size: int
) -> ConstraintCompiler | None:
    """The model's constraint compiler (older SentencePiece-only folders have none)."""
    try:
        text = (model_dir / "tokenizer.json").read_text(encoding="utf-8")
    except FileNotFoundError:
        log.warning("%s has no tokenizer.json: constrained generation is off", model_dir)
        return None
    return ConstraintCompiler.from_tokenizer_json(text, eos_ids=eos_ids, vocab_size=vocab_size)


def load(spec: LoadSpec, progress: ProgressCallback) -> ExLlamaV2Backend:
    """Load an exllamav2 model folder (blocking; run it in a worker thread)."""
    lib = import_library(NAME)
    gen_mod = importlib.import_module("exllamav2.generator")
    filters_mod = importlib.import_module("exllamav2.generator.filters")
    attn = importlib.import_module("exllamav2.attn")

    chunk = chunk_size_for(spec.chunk_size)
    config, max_seq_len, cache_size, paged = _configure(
        lib, str(spec.path), spec.max_seq_len, spec.cache_size, chunk, spec.rope_scale,
        spec.rope_alpha, bool(getattr(attn, "has_flash_attn_with_paged", False)),
    )
    # The generator's default: as many jobs as fit one chunk at max_q_size (8) tokens each.
    paged, batch = decide_paging(flash_attn_paged=paged, no_flash_attn=False,
                                 max_batch_size=spec.max_batch_size or max(1, chunk // 8))
    # The generator asserts batch * max_q_size <= config.max_batch_size * max_input_len.
    config.max_batch_size = max(1, -(-batch * 8 // chunk))
    cache_cls = getattr(lib, cache_class_name(spec.cache_mode))
    loaded: list[Any] = []
    try:
        draft_model = draft_cache = None
        if spec.draft is not None:
            dconfig, _, _, _ = _configure(lib, str(spec.draft.path), max_seq_len, cache_size, chunk,
                                          spec.draft.rope_scale, spec.draft.rope_alpha, paged)
            draft_model = lib.ExLlamaV2(dconfig)
            draft_spec = attrs.evolve(spec, gpu_split=spec.draft.gpu_split,
                                      gpu_split_auto=not spec.draft.gpu_split,
                                      tensor_parallel=False)
            draft_cache = _load_weights(lib, draft_model,
                                        getattr(lib, cache_class_name(spec.draft.cache_mode)),
                                        cache_size, draft_spec, "draft", progress)
            loaded.append(draft_model)
        model = lib.ExLlamaV2(config)
        cache = _load_weights(lib, model, cache_cls, cache_size, spec, "model", progress)
        loaded.append(model)
        progress(LoadProgress("model", 1, 1, "finished"))
        vision = None
        if spec.vision:
            if getattr(config, "vision_model_type", None) is None:
                raise NotSupported(f"{spec.name} has no vision tower", param="vision")
            vision = lib.ExLlamaV2VisionTower(config)
            vision.load(callback=lambda d, t: progress(LoadProgress("vision", d, t)))
            loaded.append(vision)
        tokenizer = lib.ExLlamaV2Tokenizer(config)
        generator = gen_mod.ExLlamaV2DynamicGenerator(
            model=model, cache=cache, tokenizer=tokenizer, max_batch_size=batch,
            max_seq_len=max_seq_len, max_chunk_size=chunk, draft_model=draft_model,
            draft_cache=draft_cache, num_draft_tokens=(spec.draft.num_tokens or 4) if spec.draft else 4,
            paged=paged,
        )
    except BaseException:
        unload_all(loaded)
        free_vram()
        raise
    eos = _eos_ids(config)
    compiler = _constraint_compiler(spec.path, eos, int(config.vocab_size))
    facts = read_tokenizer_facts(spec.path)
    adapter = LibraryTokenizer(tokenizer)
    info = ModelInfo(
        name=spec.name, backend=NAME, max_seq_len=max_seq_len, vocab_size=adapter.vocab_size,
        bos_token_id=config.bos_token_id, eos_token_ids=eos, bos_token=facts.bos_token,
        eos_token=facts.eos_token, pad_token=facts.pad_token, unk_token=facts.unk_token,
        add_bos_token=facts.add_bos_token, chat_template=facts.chat_template,
        cache_size=cache_size, cache_mode=parse_cache_mode_v2(spec.cache_mode),
        max_batch_size=batch, chunk_size=chunk,
        capabilities=Capabilities(vision=vision is not None, lora=True,
                                  draft=draft_model is not None),
        path=str(spec.path),
    )
    parts = _Parts(lib, gen_mod, int(config.vocab_size), model, cache, generator,
                   make_filter_class(filters_mod.ExLlamaV2Filter), compiler, draft_model, vision)
    backend = ExLlamaV2Backend(parts, adapter, info)
    if spec.loras:
        backend.set_loras(spec.loras)
    return backend
