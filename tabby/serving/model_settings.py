"""Model-load requests, the merge of their settings, backend detection.

Settings precedence, highest first: the request, ``<model>/tabby_config.toml``,
``[model_defaults]``, ``[model]``, merged by
:func:`tabby.config.merge_model_settings`. A request field left out (or null) does not
override anything; ``tabby_config.toml`` holds the load keys of ``[model]`` at its top
level and only the keys it names override.

Backend detection reads ``config.json`` ``quantization_config.quant_method``: ``exl3``
means exllamav3, ``exl2`` exllamav2; a GGUF file or an unquantized Llama-family folder
means the reference engine. The ``backend`` setting overrides the detection.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import tomlkit

from tabby.backends.base import DraftSpec, LoadSpec, LoraSpec
from tabby.config import LOAD_KEYS, ConfigError, ModelDefaults, ModelSettings
from tabby.config.loader import structure_config
from tabby.engine.config import SUPPORTED_ARCHITECTURES
from tabby.errors import InvalidRequest, NotSupported

__all__ = [
    "MODEL_CONFIG_FILE",
    "DraftModelRequest",
    "LoraLoadResult",
    "LoraRequest",
    "ModelLoadRequest",
    "build_load_spec",
    "detect_backend",
    "read_model_config",
    "rope_alpha_for",
]

# Per-model overrides, read from the model folder (or next to a .gguf file: <stem>.tabby_config.toml).
MODEL_CONFIG_FILE = "tabby_config.toml"


def _doc(text: str) -> dict[str, Any]:
    return {"doc": text}


@attrs.frozen(kw_only=True)
class DraftModelRequest:
    """The ``draft_model`` object of a load request."""

    draft_model_name: str = attrs.field(metadata=_doc("Draft model inside draft_model_dir."))
    draft_rope_scale: float | None = attrs.field(default=None, metadata=_doc("Linear RoPE scale."))
    draft_rope_alpha: float | str | None = attrs.field(
        default=None, metadata=_doc('NTK RoPE alpha or "auto".')
    )
    draft_cache_mode: str | None = attrs.field(default=None, metadata=_doc("Draft KV cache mode."))
    draft_gpu_split: tuple[float, ...] | None = attrs.field(
        default=None, metadata=_doc("GB per GPU for the draft model.")
    )


@attrs.frozen(kw_only=True)
class LoraRequest:
    name: str = attrs.field(metadata=_doc("LoRA folder inside lora_dir."))
    scaling: float = attrs.field(default=1.0, metadata=_doc("Strength of the LoRA."))


@attrs.frozen
class LoraLoadResult:
    """Which requested LoRAs were loaded and which were not found."""

    success: tuple[str, ...]
    failure: tuple[str, ...]


@attrs.frozen(kw_only=True)
class ModelLoadRequest:
    """A model load (``POST /v1/model/load``, inline loads and the startup load).

    Every setting is optional; None means "not given here" (the next source decides).
    """

    model_name: str = attrs.field(metadata=_doc("Model folder or .gguf file inside model_dir."))
    backend: str | None = attrs.field(default=None, metadata=_doc("Force a backend."))
    max_seq_len: int | None = attrs.field(default=None, metadata=_doc("Context length."))
    cache_size: int | None = attrs.field(default=None, metadata=_doc("KV cache tokens."))
    cache_mode: str | None = attrs.field(default=None, metadata=_doc("KV cache precision."))
    chunk_size: int | None = attrs.field(default=None, metadata=_doc("Prefill chunk."))
    max_batch_size: int | None = attrs.field(default=None, metadata=_doc("Concurrent jobs."))
    tensor_parallel: bool | None = attrs.field(default=None, metadata=_doc("Tensor parallel."))
    gpu_split_auto: bool | None = attrs.field(default=None, metadata=_doc("Autosplit."))
    autosplit_reserve: tuple[int, ...] | None = attrs.field(
        default=None, metadata=_doc("MB reserved per GPU.")
    )
    gpu_split: tuple[float, ...] | None = attrs.field(default=None, metadata=_doc("GB per GPU."))
    rope_scale: float | None = attrs.field(default=None, metadata=_doc("Linear RoPE scale."))
    rope_alpha: float | str | None = attrs.field(
        default=None, metadata=_doc('NTK RoPE alpha or "auto".')
    )
    prompt_template: str | None = attrs.field(default=None, metadata=_doc("Template name."))
    vision: bool | None = attrs.field(default=None, metadata=_doc("Load the vision tower."))
    draft_model: DraftModelRequest | None = attrs.field(
        default=None, metadata=_doc("Speculative decoding draft model.")
    )
    skip_queue: bool = attrs.field(
        default=False, metadata=_doc("Cancel running jobs instead of waiting for them.")
    )

    def explicit(self) -> dict[str, Any]:
        """The load keys this request sets."""
        values = {key: getattr(self, key, None) for key in LOAD_KEYS}
        return {key: value for key, value in values.items() if value is not None}


# -- settings ---------------------------------------------------------------------------


def model_config_path(model_path: Path) -> Path:
    if model_path.is_dir():
        return model_path / MODEL_CONFIG_FILE
    return model_path.with_name(f"{model_path.stem}.{MODEL_CONFIG_FILE}")


def read_model_config(model_path: Path) -> ModelDefaults:
    """The load keys set by the model's own ``tabby_config.toml`` (validated; the keys it
    leaves out stay unset)."""
    path = model_config_path(model_path)
    if not path.is_file():
        return ModelDefaults()
    try:
        raw = tomlkit.parse(path.read_text(encoding="utf-8")).unwrap()
        config = structure_config({"model_defaults": raw})
    except (ConfigError, tomlkit.exceptions.TOMLKitError) as exc:
        raise InvalidRequest(f"{path}: {exc}", param="model_name") from None
    return config.model_defaults


def rope_alpha_for(alpha: object, target: int | None, native: int | None) -> float | None:
    """NTK alpha: a number as given; ``"auto"`` from the ratio of target to native context."""
    if alpha is None or isinstance(alpha, int | float):
        return None if alpha is None else float(alpha)
    if target is None or native is None or target <= native:
        return 1.0
    ratio = target / native
    return -0.13436 + 0.80541 * ratio + 0.28833 * ratio * ratio


def _native_context(model_path: Path) -> int | None:
    if not model_path.is_dir():
        return None
    config = _config_json(model_path)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    value = text.get("max_position_embeddings") if isinstance(text, dict) else None
    return int(value) if isinstance(value, int) else None


def build_load_spec(
    *,
    name: str,
    path: Path,
    settings: ModelSettings,
    draft: DraftSpec | None = None,
    loras: tuple[LoraSpec, ...] = (),
) -> LoadSpec:
    """The backend's view of a load: merged settings, a draft model, LoRAs."""
    return LoadSpec(
        path=path,
        name=name,
        max_seq_len=settings.max_seq_len,
        cache_size=settings.cache_size,
        cache_mode=settings.cache_mode or "FP16",
        chunk_size=settings.chunk_size or 2048,
        max_batch_size=settings.max_batch_size,
        dtype=settings.dtype or "auto",
        threads=settings.threads or 0,
        device=settings.device or "auto",
        gpu_split_auto=settings.gpu_split_auto,
        gpu_split=settings.gpu_split,
        autosplit_reserve=settings.autosplit_reserve or (96,),
        tensor_parallel=settings.tensor_parallel,
        rope_scale=settings.rope_scale,
        rope_alpha=rope_alpha_for(
            settings.rope_alpha, settings.max_seq_len, _native_context(path)
        ),
        vision=settings.vision,
        draft=draft,
        loras=loras,
    )


# -- backend detection ------------------------------------------------------------------


def _config_json(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"cannot read {path}: {exc}", param="model_name") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"{path} is not a JSON object", param="model_name")
    return data


def detect_backend(model_path: Path, override: str | None) -> str:
    """Which backend runs the model at ``model_path`` (``override`` wins when set)."""
    if override:
        return override
    if model_path.is_file():
        return "reference"  # a GGUF file
    config = _config_json(model_path)
    quant = config.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method == "exl3":
        return "exllamav3"
    if method == "exl2":
        return "exllamav2"
    if method is not None:
        raise NotSupported(
            f"models quantized with {method!r} are not supported (use exl2, exl3, GGUF or "
            f"an unquantized model)",
            param="model_name",
        )
    architectures = config.get("architectures") or [config.get("model_type")]
    arch = str(architectures[0]) if architectures else "unknown"
    if arch in SUPPORTED_ARCHITECTURES or str(config.get("model_type")) in SUPPORTED_ARCHITECTURES:
        return "reference"
    raise NotSupported(
        f"architecture {arch!r} is not supported by the reference engine (Llama, Mistral, "
        f"Qwen2); an exl2 or exl3 quantization of it runs on the exllama backends",
        param="model_name",
    )
