"""Model hyper-parameters of the Llama family, independent of the file format.

Weights are always held under Hugging Face ``LlamaForCausalLM`` state-dict names
(``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.q_proj.weight``, ...,
``model.norm.weight``, ``lm_head.weight`` when untied), in HF's rotate-half RoPE
layout; the GGUF loader converts to that.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from tabby.errors import NotSupported

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelConfig", "RopeScaling"]

# config.json "architectures" / GGUF general.architecture values we can run.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
}


@attrs.frozen
class RopeScaling:
    kind: Literal["none", "linear", "llama3"] = "none"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@attrs.frozen
class ModelConfig:
    arch: Literal["llama", "mistral", "qwen2"]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None  # accepted, not applied (full attention)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a ``config.json`` dict; refuses anything but the Llama family."""
        archs = cfg.get("architectures") or [cfg.get("model_type", "unknown")]
        name = str(archs[0])
        arch = SUPPORTED_ARCHITECTURES.get(name) or SUPPORTED_ARCHITECTURES.get(
            str(cfg.get("model_type", ""))
        )
        if arch is None:
            raise NotSupported(
                f"architecture {name!r} is not supported by the reference engine "
                f"(supported: Llama, Mistral, Qwen2, SmolLM2)",
                param="model_name",
            )
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (
            (int(eos),) if eos is not None else ()
        )
        return cls(
            arch=arch,  # type: ignore[arg-type]
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(cfg.get("rope_scaling")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window") else None,
        )


def _rope_scaling(raw: Any) -> RopeScaling:
    if not raw:
        return RopeScaling()
    kind = str(raw.get("rope_type") or raw.get("type") or "none")
    if kind == "default":
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(raw["factor"]))
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(raw["factor"]),
            low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
            high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                raw.get("original_max_position_embeddings", 8192)
            ),
        )
    raise NotSupported(f"rope scaling type {kind!r} is not supported by the reference engine")
