"""Request and response bodies of the admin routes (models, LoRAs, templates, sampler
overrides, tokenization).

Requests are validated with :func:`tabby.http.body.parse_body`; responses are built
as these classes and sent with :func:`to_json`, so the OpenAPI document (generated from
the same classes) describes exactly what goes over the wire. The model load request is
:class:`tabby.serving.model_settings.ModelLoadRequest`, shared with the ModelManager.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from tabby.config.validation import check
from tabby.http.openai.requests import ChatMessage
from tabby.serving.model_settings import LoraRequest

__all__ = [
    "DraftInfo",
    "GenerationSettings",
    "LoadProgressEvent",
    "LoadWaitingEvent",
    "LoraCard",
    "LoraList",
    "LoraLoadRequest",
    "LoraLoadResponse",
    "ModelCard",
    "ModelList",
    "ModelParameters",
    "ModelUnloadRequest",
    "NameList",
    "OverrideEntry",
    "PropsResponse",
    "SamplingOverrideSwitchRequest",
    "SamplingOverridesResponse",
    "StatusResponse",
    "TemplateSwitchRequest",
    "TokenDecodeRequest",
    "TokenDecodeResponse",
    "TokenEncodeRequest",
    "TokenEncodeResponse",
    "to_json",
]

OWNER = "tabby"


def _doc(text: str, *aliases: str) -> dict[str, Any]:
    return {"doc": text, "aliases": aliases} if aliases else {"doc": text}


def to_json(value: Any) -> dict[str, Any]:
    """JSON-ready data of a response object."""
    data: dict[str, Any] = attrs.asdict(value, recurse=True)
    return data


# -- models -----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class DraftInfo:
    """The draft model used for speculative decoding."""

    id: str = attrs.field(metadata=_doc("The draft model's name in draft_model_dir."))
    rope_scale: float | None = attrs.field(default=None, metadata=_doc("Linear RoPE scale."))
    rope_alpha: float | None = attrs.field(default=None, metadata=_doc("NTK RoPE alpha."))
    cache_mode: str = attrs.field(default="FP16", metadata=_doc("Draft KV cache precision."))


@attrs.frozen(kw_only=True)
class ModelParameters:
    """How the loaded model is served."""

    backend: str = attrs.field(metadata=_doc("reference, exllamav2 or exllamav3."))
    max_seq_len: int = attrs.field(metadata=_doc("Context length in tokens."))
    cache_size: int = attrs.field(metadata=_doc("KV cache size in tokens."))
    cache_mode: str = attrs.field(metadata=_doc("KV cache precision."))
    rope_scale: float | None = attrs.field(metadata=_doc("Linear RoPE scale (null: model's)."))
    rope_alpha: float | None = attrs.field(metadata=_doc("NTK RoPE alpha (null: model's)."))
    max_batch_size: int = attrs.field(metadata=_doc("Jobs generated together."))
    chunk_size: int = attrs.field(metadata=_doc("Prompt tokens processed per step."))
    prompt_template: str | None = attrs.field(metadata=_doc("Chat template name (null: none)."))
    prompt_template_content: str | None = attrs.field(metadata=_doc("Its Jinja source."))
    use_vision: bool = attrs.field(metadata=_doc("Whether image inputs are accepted."))
    loras: list[str] = attrs.field(metadata=_doc("Active LoRAs."))
    draft: DraftInfo | None = attrs.field(metadata=_doc("The draft model, if any."))


@attrs.frozen(kw_only=True)
class ModelCard:
    id: str = attrs.field(metadata=_doc("The name a request's model field uses."))
    object: Literal["model"] = attrs.field(default="model", metadata=_doc("Always model."))
    created: int = attrs.field(metadata=_doc("Unix time."))
    owned_by: str = attrs.field(default=OWNER, metadata=_doc("Always tabby."))
    parameters: ModelParameters | None = attrs.field(
        default=None, metadata=_doc("Serving parameters (GET /v1/model only).")
    )


@attrs.frozen(kw_only=True)
class ModelList:
    """Models: for the admin key every loadable one, else the loaded one."""

    object: Literal["list"] = attrs.field(default="list", metadata=_doc("Always list."))
    data: list[ModelCard] = attrs.field(metadata=_doc("The models."))


@attrs.frozen(kw_only=True)
class LoadProgressEvent:
    """One SSE event of POST /v1/model/load."""

    model_type: Literal["model", "draft", "vision"] = attrs.field(
        metadata=_doc("The component being loaded.")
    )
    module: int = attrs.field(metadata=_doc("Modules loaded so far."))
    modules: int = attrs.field(metadata=_doc("Modules in all."))
    status: Literal["processing", "finished"] = attrs.field(
        metadata=_doc("finished once module == modules.")
    )


@attrs.frozen(kw_only=True)
class LoadWaitingEvent:
    """The first SSE event of POST /v1/model/load when running jobs must finish first."""

    model_type: Literal["model"] = attrs.field(
        default="model", metadata=_doc("The component being loaded.")
    )
    status: Literal["waiting"] = attrs.field(
        default="waiting", metadata=_doc("The load has not started yet.")
    )
    running_jobs: int = attrs.field(metadata=_doc("Jobs of the current model it waits for."))
    message: str = attrs.field(metadata=_doc("The same, in words."))


@attrs.frozen(kw_only=True)
class ModelUnloadRequest:
    skip_queue: bool = attrs.field(
        default=True,
        metadata=_doc("Cancel running jobs (default) instead of waiting for them to finish."),
    )


@attrs.frozen(kw_only=True)
class GenerationSettings:
    n_ctx: int = attrs.field(metadata=_doc("Context length in tokens."))


@attrs.frozen(kw_only=True)
class PropsResponse:
    """Server properties in the shape llama.cpp clients read."""

    total_slots: int = attrs.field(metadata=_doc("Jobs generated together (max_batch_size)."))
    chat_template: str = attrs.field(metadata=_doc('The chat template source ("" if none).'))
    default_generation_settings: GenerationSettings = attrs.field(
        metadata=_doc("Context settings.")
    )


@attrs.frozen(kw_only=True)
class StatusResponse:
    status: str = attrs.field(metadata=_doc("What happened, e.g. unloaded."))


# -- LoRAs ------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class LoraCard:
    id: str = attrs.field(metadata=_doc("The LoRA folder's name in lora_dir."))
    object: Literal["lora"] = attrs.field(default="lora", metadata=_doc("Always lora."))
    created: int = attrs.field(metadata=_doc("Unix time."))
    owned_by: str = attrs.field(default=OWNER, metadata=_doc("Always tabby."))
    scaling: float | None = attrs.field(
        default=None, metadata=_doc("Its strength when active (null in directory listings).")
    )


@attrs.frozen(kw_only=True)
class LoraList:
    object: Literal["list"] = attrs.field(default="list", metadata=_doc("Always list."))
    data: list[LoraCard] = attrs.field(metadata=_doc("The LoRAs."))


@attrs.frozen(kw_only=True)
class LoraLoadRequest:
    loras: tuple[LoraRequest, ...] = attrs.field(
        metadata=_doc("LoRAs to activate; the active ones are replaced.")
    )
    skip_queue: bool = attrs.field(
        default=False, metadata=_doc("Cancel running jobs instead of waiting for them.")
    )


@attrs.frozen(kw_only=True)
class LoraLoadResponse:
    success: list[str] = attrs.field(metadata=_doc("LoRAs now active."))
    failure: list[str] = attrs.field(metadata=_doc("LoRAs not found."))


# -- templates and sampler overrides ----------------------------------------------------


@attrs.frozen(kw_only=True)
class NameList:
    object: Literal["list"] = attrs.field(default="list", metadata=_doc("Always list."))
    data: list[str] = attrs.field(metadata=_doc("The names."))


@attrs.frozen(kw_only=True)
class TemplateSwitchRequest:
    prompt_template_name: str = attrs.field(
        validator=check(bool, "a template name"),
        metadata=_doc("A template in templates_dir (without .jinja).", "name"),
    )


@attrs.frozen(kw_only=True)
class OverrideEntry:
    override: Any = attrs.field(metadata=_doc("The value."))
    force: bool = attrs.field(metadata=_doc("Replaces what the client sent."))
    additive: bool = attrs.field(metadata=_doc("Prepended to the client's list."))


@attrs.frozen(kw_only=True)
class SamplingOverridesResponse:
    selected_preset: str | None = attrs.field(
        metadata=_doc("The selected preset (null: none, or inline overrides).")
    )
    overrides: dict[str, OverrideEntry] = attrs.field(metadata=_doc("The active overrides."))
    presets: list[str] = attrs.field(
        metadata=_doc("Presets in overrides_dir (admin key only; else empty).")
    )


@attrs.frozen(kw_only=True)
class SamplingOverrideSwitchRequest:
    """A preset name, or inline overrides ({field: {override, force, additive}})."""

    preset: str | None = attrs.field(
        default=None, metadata=_doc("A preset in overrides_dir; wins over overrides.")
    )
    overrides: dict[str, Any] | None = attrs.field(
        default=None, metadata=_doc("Inline overrides, in the preset file's format.")
    )


# -- tokens -----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class TokenEncodeRequest:
    text: str | tuple[ChatMessage, ...] = attrs.field(
        validator=check(lambda t: isinstance(t, str) or len(t) > 0, "text or messages"),
        metadata=_doc(
            "Text, or chat messages rendered with the chat template "
            "(add_generation_prompt false).",
            "messages",
        ),
    )
    add_bos_token: bool = attrs.field(default=True, metadata=_doc("Prepend the BOS token."))
    encode_special_tokens: bool = attrs.field(
        default=True, metadata=_doc("Parse special tokens written in the text.")
    )
    decode_special_tokens: bool = attrs.field(
        default=True, metadata=_doc("Accepted for symmetry with decode; no effect here.")
    )
    template_vars: dict[str, Any] = attrs.field(
        factory=dict,
        metadata=_doc("Extra chat template variables.", "chat_template_kwargs"),
    )


@attrs.frozen(kw_only=True)
class TokenEncodeResponse:
    tokens: list[int] = attrs.field(metadata=_doc("Token ids."))
    length: int = attrs.field(metadata=_doc("How many."))


@attrs.frozen(kw_only=True)
class TokenDecodeRequest:
    tokens: tuple[int, ...] = attrs.field(metadata=_doc("Token ids."))
    add_bos_token: bool = attrs.field(default=True, metadata=_doc("Accepted; no effect."))
    encode_special_tokens: bool = attrs.field(default=True, metadata=_doc("Accepted; no effect."))
    decode_special_tokens: bool = attrs.field(
        default=True, metadata=_doc("Write special tokens (BOS, EOS, ...) as text.")
    )


@attrs.frozen(kw_only=True)
class TokenDecodeResponse:
    text: str = attrs.field(metadata=_doc("The decoded text."))
