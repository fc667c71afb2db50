"""The configuration schema: one frozen attrs class per ``tabby.toml`` table.

Every field carries ``metadata={"doc": ...}`` (the one-line comment written by
``export_config``) and, where the value is range-checked, ``"expected"``: the
phrase used in error messages both for out-of-range values and for values of the
wrong type, so ``port = "abc"`` reads ``expected an integer in 0..65535``.

Null: TOML has no null, so a key whose default is null is simply left out of the
file. For optional string keys an empty string also means null (``model_name = ""``
loads nothing at startup). In ``[model_defaults]`` a key that is absent is
:data:`UNSET` (distinct from null): only keys that are present override anything.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import attrs

from tabby.config.validation import check

__all__ = [
    "LOAD_KEYS",
    "UNSET",
    "Backend",
    "DeveloperConfig",
    "DraftModelConfig",
    "Dtype",
    "EmbeddingsConfig",
    "EmbeddingsDevice",
    "LoggingConfig",
    "LoraConfig",
    "LoraEntry",
    "ModelConfigSection",
    "ModelDefaults",
    "ModelSettings",
    "NetworkConfig",
    "RopeAlpha",
    "SamplingConfig",
    "TabbyConfig",
    "Unset",
]


class Unset(enum.Enum):
    """Marks a ``[model_defaults]`` key the operator did not set."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


UNSET = Unset.UNSET

Backend = Literal["reference", "exllamav2", "exllamav3"]
Dtype = Literal["auto", "int8", "float32", "bfloat16", "float16"]
EmbeddingsDevice = Literal["cpu", "auto", "cuda"]
RopeAlpha = float | Literal["auto"] | None

API_SERVERS = ("OAI", "Kobold")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_CACHE_MODE_RE = re.compile(r"^(FP16|Q8|Q6|Q4|[2-8],[2-8])$")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def _doc(doc: str, expected: str | None = None) -> dict[str, Any]:
    return {"doc": doc} if expected is None else {"doc": doc, "expected": expected}


def _int_range(lo: int, hi: int | None = None) -> tuple[Callable[..., None], str]:
    """A validator and its 'expected' phrase for an integer range."""
    if hi is None:
        return check(lambda v: v >= lo, f"an integer >= {lo}"), f"an integer >= {lo}"
    return check(lambda v: lo <= v <= hi, f"an integer in {lo}..{hi}"), f"an integer in {lo}..{hi}"


def _num_min(lo: float, *, strict: bool = False) -> tuple[Callable[..., None], str]:
    if strict:
        return check(lambda v: v > lo, f"a number > {lo:g}"), f"a number > {lo:g}"
    return check(lambda v: v >= lo, f"a number >= {lo:g}"), f"a number >= {lo:g}"


def _int_field(default: int | None, doc: str, lo: int, hi: int | None = None) -> Any:
    validator, expected = _int_range(lo, hi)
    return attrs.field(default=default, validator=validator, metadata=_doc(doc, expected))


def _num_field(default: float | None, doc: str, lo: float, *, strict: bool = False) -> Any:
    validator, expected = _num_min(lo, strict=strict)
    return attrs.field(default=default, validator=validator, metadata=_doc(doc, expected))


def _empty_to_none(value: str | None) -> str | None:
    # TOML cannot spell null; an empty string is how an operator says "none".
    return None if value == "" else value


def _opt_str(default: str | None, doc: str) -> Any:
    return attrs.field(default=default, converter=_empty_to_none, metadata=_doc(doc))


def _normalise_servers(value: Iterable[str]) -> tuple[str, ...]:
    canonical = {name.lower(): name for name in API_SERVERS}
    out: list[str] = []
    for item in value:
        name = canonical.get(item.lower(), item) if isinstance(item, str) else item
        if name not in out:
            out.append(name)
    return tuple(out)


def _normalise_level(value: str) -> str:
    return value.upper() if isinstance(value, str) else value


def _each(predicate: Callable[[Any], bool], expected: str) -> Callable[..., None]:
    return check(lambda seq: all(predicate(v) for v in seq), expected)


_CACHE_MODE_EXPECTED = 'one of "FP16", "Q8", "Q6", "Q4" or a "k,v" bit pair such as "8,8"'
_cache_mode_ok = check(lambda v: bool(_CACHE_MODE_RE.match(v)), _CACHE_MODE_EXPECTED)
_DEVICE_EXPECTED = 'one of "auto", "cpu", "cuda" or "cuda:N"'
_device_ok = check(lambda v: bool(_DEVICE_RE.match(v)), _DEVICE_EXPECTED)
_rope_alpha_ok = check(lambda v: v == "auto" or v > 0, 'a number > 0 or "auto"')
_SPLIT_EXPECTED = "a list of numbers >= 0"
_split_ok = _each(lambda v: v >= 0, _SPLIT_EXPECTED)


@attrs.frozen
class NetworkConfig:
    """HTTP server, authentication and API surface."""

    host: str = attrs.field(
        default="127.0.0.1", metadata=_doc("Bind address; 0.0.0.0 listens on every interface.")
    )
    port: int = _int_field(
        5000, "TCP port; 0 picks a free port (tests). A busy port is an error.", 0, 65535
    )
    disable_auth: bool = attrs.field(
        default=False, metadata=_doc("Skip API-key checks: every caller is admin.")
    )
    allow_open_network: bool = attrs.field(
        default=False,
        metadata=_doc(
            "Allow disable_auth with a host other than loopback: anyone who reaches the port "
            "is admin."
        ),
    )
    disable_fetch_requests: bool = attrs.field(
        default=False,
        metadata=_doc("Refuse to fetch remote image URLs (base64 data URLs still work)."),
    )
    send_tracebacks: bool = attrs.field(
        default=False,
        metadata=_doc("Include the Python traceback in error responses (debugging only)."),
    )
    api_servers: tuple[str, ...] = attrs.field(
        default=("OAI",),
        converter=_normalise_servers,
        validator=_each(lambda v: v in API_SERVERS, 'a list of "OAI" and "Kobold"'),
        metadata=_doc(
            'APIs to serve: "OAI" (OpenAI) and/or "Kobold" (case-insensitive).',
            'a list of "OAI" and "Kobold"',
        ),
    )
    sse_ping_interval: float = _num_field(
        15.0, "Seconds between keep-alive comments on SSE streams; 0 disables them.", 0
    )
    cors_origins: tuple[str, ...] = attrs.field(
        default=(),
        metadata=_doc(
            'Web origins allowed to call the API from a browser (e.g. ["http://localhost:3000"],'
            ' or ["*"] for any); [] sends no CORS headers.'
        ),
    )
    max_body_size: int = _int_field(16777216, "Largest accepted request body, in bytes.", 1)
    body_timeout: float = _num_field(
        60.0, "Seconds a client gets to send a request body before a 408.", 0, strict=True
    )
    max_requests_per_client: int = _int_field(
        256,
        "Requests one client address may have in flight at once (429 beyond); 0 = no limit.",
        0,
    )
    backlog: int = _int_field(
        2048,
        "Connections the kernel queues before they are accepted (capped by the system's "
        "somaxconn); a burst larger than this is refused.",
        1,
    )
    shutdown_grace: float = _num_field(
        5.0, "Seconds live requests get to finish on shutdown before they are cancelled.", 0
    )
    max_queued_requests: int = _int_field(
        64, "Generation requests waiting beyond this many are refused with 429.", 1
    )
    api_tokens_file: str = attrs.field(
        default="api_tokens.toml",
        metadata=_doc("API and admin keys (created with mode 0600 when missing)."),
    )


@attrs.frozen
class LoggingConfig:
    """Console logging."""

    log_level: str = attrs.field(
        default="INFO",
        converter=_normalise_level,
        validator=check(
            lambda v: v in LOG_LEVELS, "one of " + ", ".join(f'"{lv}"' for lv in LOG_LEVELS)
        ),
        metadata=_doc("DEBUG, INFO, WARNING, ERROR or CRITICAL (env: TABBY_LOG_LEVEL)."),
    )
    log_prompt: bool = attrs.field(default=False, metadata=_doc("Log every rendered prompt."))
    log_generation_params: bool = attrs.field(
        default=False, metadata=_doc("Log the sampler settings of every generation.")
    )
    log_requests: bool = attrs.field(
        default=False,
        metadata=_doc("Log method, path and body of every request (key headers are redacted)."),
    )




@attrs.frozen
class ModelSettings:
    """How a model is loaded and served: the load keys of ``[model]``, typed.

    One value per load, made by :func:`tabby.config.model_settings.merge_model_settings`
    (request > the model's ``tabby_config.toml`` > ``[model_defaults]`` > ``[model]``).
    """

    backend: Backend | None = attrs.field(
        default=None,
        metadata=_doc('"reference", "exllamav2" or "exllamav3"; unset = detect from the model.'),
    )
    max_seq_len: int | None = _int_field(None, "Context length; unset = the model's own.", 1)
    cache_size: int | None = _int_field(None, "KV cache size in tokens; unset = max_seq_len.", 1)
    cache_mode: str = attrs.field(
        default="FP16",
        validator=_cache_mode_ok,
        metadata=_doc(
            'KV cache precision: FP16, Q8, Q6, Q4 or a k,v bit pair such as "8,8" (exllama).',
            _CACHE_MODE_EXPECTED,
        ),
    )
    chunk_size: int = _int_field(512, "Prompt tokens processed per forward pass.", 1)
    default_max_tokens: int = _int_field(
        4096,
        "Tokens a request that sets no max_tokens (or 0) may generate; 0 = fill the context.",
        0,
    )
    max_batch_size: int | None = _int_field(
        None, "Most jobs generated at once; unset = the backend's default.", 1
    )
    prompt_template: str | None = _opt_str(
        None, "Chat template name in templates_dir; unset = the model's own."
    )
    dtype: Dtype = attrs.field(
        default="auto",
        metadata=_doc(
            "Weights of the reference engine: auto (int8 weights + bf16 activations on AVX-512"
            " CPUs, bf16 on CUDA, else float32), int8, float32, bfloat16 or float16."
        ),
    )
    threads: int = _int_field(
        0, "CPU threads for the reference engine; 0 = one per core, less one for the server.", 0
    )
    device: str = attrs.field(
        default="auto",
        validator=_device_ok,
        metadata=_doc('"auto", "cpu", "cuda" or "cuda:N".', _DEVICE_EXPECTED),
    )
    tensor_parallel: bool = attrs.field(
        default=False,
        metadata=_doc("Split every layer across GPUs (exllama; ignores gpu_split_auto)."),
    )
    gpu_split_auto: bool = attrs.field(
        default=True, metadata=_doc("Spread the model across GPUs automatically.")
    )
    gpu_split: tuple[float, ...] = attrs.field(
        default=(),
        validator=_split_ok,
        metadata=_doc("GB per GPU for a manual split (turns autosplit off)."),
    )
    autosplit_reserve: tuple[int, ...] = attrs.field(
        default=(96,),
        validator=_each(lambda v: v >= 0, "a list of integers >= 0"),
        metadata=_doc("MB kept free on each GPU by autosplit."),
    )
    rope_scale: float | None = _num_field(
        None, "Linear RoPE scaling factor; unset = the model's own.", 0, strict=True
    )
    rope_alpha: RopeAlpha = attrs.field(
        default=None,
        validator=_rope_alpha_ok,
        metadata=_doc('NTK RoPE alpha, or "auto"; unset = none.'),
    )
    vision: bool = attrs.field(
        default=False, metadata=_doc("Load the vision tower when the model has one.")
    )
    tool_format: str | None = _opt_str(
        None,
        "Tool-call format (hermes, llama3, mistral, ...); unset = every known one, by its tags.",
    )
    reasoning: bool = attrs.field(
        default=False, metadata=_doc("Split output into reasoning_content and content.")
    )
    reasoning_start_token: str = attrs.field(
        default="<think>", metadata=_doc("Tag that opens reasoning.")
    )
    reasoning_end_token: str = attrs.field(
        default="</think>", metadata=_doc("Tag that closes reasoning.")
    )


# The [model] keys that describe how a model is loaded; [model_defaults] holds the same.
LOAD_KEYS: tuple[str, ...] = tuple(a.name for a in attrs.fields(ModelSettings))


@attrs.frozen
class ModelConfigSection(ModelSettings):
    """The model loaded at startup, model discovery, and load settings.

    The load settings are the fields of :class:`ModelSettings`; a ``tabby.toml``
    writes them in the same ``[model]`` table.
    """

    model_dir: str = attrs.field(
        default="models", metadata=_doc("Folder holding model folders and .gguf files.")
    )
    model_name: str | None = _opt_str(
        "SmolLM2-135M-Instruct",
        'Model to load at startup, inside model_dir ("" loads nothing; the default is the embedded model).',
    )
    inline_model_loading: bool = attrs.field(
        default=False,
        metadata=_doc(
            "Let the request's model field load another model (admin key, or any key if allowed)."
        ),
    )
    use_dummy_models: bool = attrs.field(
        default=False, metadata=_doc("List dummy_model_names in /v1/models.")
    )
    dummy_model_names: tuple[str, ...] = attrs.field(
        default=("gpt-3.5-turbo",),
        metadata=_doc("Names accepted in the model field that never switch models."),
    )
    switch_wait_timeout: float = _num_field(
        60.0,
        "Seconds a generation request waits for a model that is loading before it is "
        "answered 503 (0 = answer at once).",
        0,
    )
    templates_dir: str = attrs.field(
        default="templates", metadata=_doc("Folder of chat templates (*.jinja).")
    )


@attrs.frozen
class ModelDefaults:
    """Load settings applied to every load (startup, API or inline) under the request's own.

    A key left out is :data:`UNSET`; set keys (including an explicit "" = null for
    optional strings) are returned by :meth:`explicit`.
    """

    backend: Backend | Unset | None = UNSET
    max_seq_len: int | Unset | None = UNSET
    cache_size: int | Unset | None = UNSET
    cache_mode: str | Unset = UNSET
    chunk_size: int | Unset = UNSET
    default_max_tokens: int | Unset = UNSET
    max_batch_size: int | Unset | None = UNSET
    prompt_template: str | Unset | None = UNSET
    dtype: Dtype | Unset = UNSET
    threads: int | Unset = UNSET
    device: str | Unset = UNSET
    tensor_parallel: bool | Unset = UNSET
    gpu_split_auto: bool | Unset = UNSET
    gpu_split: tuple[float, ...] | Unset = UNSET
    autosplit_reserve: tuple[int, ...] | Unset = UNSET
    rope_scale: float | Unset | None = UNSET
    rope_alpha: RopeAlpha | Unset = UNSET
    vision: bool | Unset = UNSET
    tool_format: str | Unset | None = UNSET
    reasoning: bool | Unset = UNSET
    reasoning_start_token: str | Unset = UNSET
    reasoning_end_token: str | Unset = UNSET

    def explicit(self) -> dict[str, Any]:
        """Only the keys the operator set, by name."""
        return {key: getattr(self, key) for key in LOAD_KEYS if getattr(self, key) is not UNSET}


@attrs.frozen
class DraftModelConfig:
    """Speculative decoding with a small draft model."""

    draft_model_dir: str = attrs.field(
        default="models", metadata=_doc("Folder holding draft models.")
    )
    draft_model_name: str | None = _opt_str(
        None, "Draft model to load with the startup model; unset = no drafting."
    )
    draft_rope_scale: float | None = _num_field(
        None, "Linear RoPE scaling of the draft model; unset = its own.", 0, strict=True
    )
    draft_rope_alpha: RopeAlpha = attrs.field(
        default=None,
        validator=_rope_alpha_ok,
        metadata=_doc('NTK RoPE alpha of the draft model, or "auto".'),
    )
    draft_cache_mode: str = attrs.field(
        default="FP16",
        validator=_cache_mode_ok,
        metadata=_doc("KV cache precision of the draft model.", _CACHE_MODE_EXPECTED),
    )
    draft_gpu_split: tuple[float, ...] = attrs.field(
        default=(),
        validator=_split_ok,
        metadata=_doc("GB per GPU for the draft model; [] = autosplit."),
    )
    draft_num_tokens: int | None = _int_field(
        None, "Tokens drafted per step; unset = the backend's default.", 1
    )


@attrs.frozen
class LoraEntry:
    """One LoRA to load after the startup model."""

    name: str = attrs.field(metadata=_doc("LoRA folder inside lora_dir."))
    scaling: float = _num_field(1.0, "Strength of the LoRA.", 0)


@attrs.frozen
class LoraConfig:
    """LoRA adapters."""

    lora_dir: str = attrs.field(default="loras", metadata=_doc("Folder holding LoRA folders."))
    loras: tuple[LoraEntry, ...] = attrs.field(
        default=(),
        metadata=_doc('LoRAs loaded after the startup model: [{name = "x", scaling = 1.0}].'),
    )


@attrs.frozen
class EmbeddingsConfig:
    """The embedding model (infinity-emb) behind /v1/embeddings."""

    embedding_model_dir: str = attrs.field(
        default="models", metadata=_doc("Folder holding embedding models.")
    )
    embedding_model_name: str | None = _opt_str(
        "all-MiniLM-L6-v2",
        'Embedding model to load at startup ("" loads none; the default is the embedded model).',
    )
    embeddings_device: EmbeddingsDevice = attrs.field(
        default="cpu", metadata=_doc("cpu, auto or cuda.")
    )
    max_batch: int = _int_field(256, "Most texts embedded in one batch.", 1)


@attrs.frozen
class SamplingConfig:
    """Sampler presets."""

    override_preset: str | None = _opt_str(
        "safe_defaults", 'Preset in overrides_dir applied to every request ("" = none).'
    )
    overrides_dir: str = attrs.field(
        default="sampler_overrides", metadata=_doc("Folder of sampler presets (*.toml).")
    )


@attrs.frozen
class DeveloperConfig:
    """Options for development and tuning."""

    disable_request_streaming: bool = attrs.field(
        default=False, metadata=_doc("Answer stream=true requests with one complete response.")
    )
    realtime_process_priority: bool = attrs.field(
        default=False, metadata=_doc("Raise the process priority (may need privileges).")
    )
    cuda_malloc_async: bool = attrs.field(
        default=True,
        metadata=_doc("Use PyTorch's cudaMallocAsync allocator (set before torch loads)."),
    )
    unsafe_launch: bool = attrs.field(
        default=False, metadata=_doc("Skip the backend version checks.")
    )


@attrs.frozen
class TabbyConfig:
    """The whole configuration.

    Relative paths in it (``model_dir``, ``templates_dir``, ``api_tokens_file``, ...)
    are kept as written; :meth:`resolve` turns them into absolute paths against
    ``base_dir``: the config file's folder when a file was read, else the current
    directory at load time.
    """

    network: NetworkConfig = attrs.field(factory=NetworkConfig)
    logging: LoggingConfig = attrs.field(factory=LoggingConfig)
    model: ModelConfigSection = attrs.field(factory=ModelConfigSection)
    model_defaults: ModelDefaults = attrs.field(factory=ModelDefaults)
    draft_model: DraftModelConfig = attrs.field(factory=DraftModelConfig)
    lora: LoraConfig = attrs.field(factory=LoraConfig)
    embeddings: EmbeddingsConfig = attrs.field(factory=EmbeddingsConfig)
    sampling: SamplingConfig = attrs.field(factory=SamplingConfig)
    developer: DeveloperConfig = attrs.field(factory=DeveloperConfig)
    base_dir: Path = attrs.field(factory=Path.cwd)
    config_file: Path | None = None  # the file that was read, if any

    def resolve(self, path: str | Path) -> Path:
        """``path`` made absolute against :attr:`base_dir` (``~`` is expanded)."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def resolve_shipped(self, path: str | Path) -> Path:
        """Like :meth:`resolve`, for folders tabby ships (templates, sampler presets).

        A relative folder missing under :attr:`base_dir` falls back to the one beside
        the installed package, so ``tabby serve`` works from any directory.
        """
        resolved = self.resolve(path)
        if resolved.exists() or Path(path).expanduser().is_absolute():
            return resolved
        shipped = _PROJECT_ROOT / path
        return shipped if shipped.exists() else resolved


# The folder holding the tabby package: the shipped templates/ and sampler_overrides/.
_PROJECT_ROOT = Path(__file__).resolve().parents[2]

# The tables of tabby.toml in file order (base_dir and config_file are not keys).
SECTIONS: tuple[tuple[str, type], ...] = (
    ("network", NetworkConfig),
    ("logging", LoggingConfig),
    ("model", ModelConfigSection),
    ("model_defaults", ModelDefaults),
    ("draft_model", DraftModelConfig),
    ("lora", LoraConfig),
    ("embeddings", EmbeddingsConfig),
    ("sampling", SamplingConfig),
    ("developer", DeveloperConfig),
)
