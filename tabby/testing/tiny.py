"""Tiny seeded random-weight Llama-family models, as HF folders and as GGUF files.

Both writers derive their weights from the same :class:`TinySpec`, so an HF folder and a
GGUF file made with equal arguments hold the same model. The tokenizer is a small
byte-level BPE (3 ChatML specials, the 256 byte symbols, then merges learnt by a
deterministic in-process trainer on a built-in text) pre-tokenized like SmolLM2
(digits one by one, then the GPT-2 regex).
"""

from __future__ import annotations

import collections
import itertools
import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

import attrs
import gguf
import numpy as np
import numpy.typing as npt
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from tabby.engine.tokenizer import bytes_to_unicode

__all__ = [
    "BOS_ID",
    "CHATML_TEMPLATE",
    "EOS_ID",
    "SPECIAL_TOKENS",
    "UNK_ID",
    "TinyModelArgs",
    "TinySpec",
    "gguf_tensor_name",
    "hf_config",
    "make_tiny_gguf",
    "make_tiny_hf",
    "tiny_tokenizer",
    "tiny_vocab_and_merges",
    "tiny_weights",
]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
TOKENIZER_SIZE = 320  # 3 specials + 256 bytes + 61 merges

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. The capital of France is Paris. "
    "What is the capital of the country? Hello, world! def main():\n    return 42\n"
    "I'm sure they're here; we'll see what you've got. There is the thing in the house, "
    "and then there was another thing that the other one said to the others."
)

_HF_ARCH = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}

Arch = Literal["llama", "mistral", "qwen2"]


@attrs.frozen
class TinySpec:
    """Everything that determines a tiny model's weights and config."""

    seed: int = 0
    arch: Arch = "llama"
    vocab: int = TOKENIZER_SIZE  # may exceed the tokenizer (padded embedding rows)
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    tie: bool = False
    bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # SmolLM2's: digits one by one, then the GPT-2 regex.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


@cache
def tiny_vocab_and_merges() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """The tiny tokenizer's tokens (by id) and merges (by rank); deterministic."""
    symbols = [bytes_to_unicode()[b] for b in range(256)]
    words = collections.Counter(w for w, _ in _pre_tokenizer().pre_tokenize_str(_TRAINING_TEXT))
    split = {w: list(w) for w in words}
    merges: list[tuple[str, str]] = []
    while len(SPECIAL_TOKENS) + len(symbols) + len(merges) < TOKENIZER_SIZE:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for w, n in words.items():
            parts = split[w]
            for a, b in itertools.pairwise(parts):
                pairs[(a, b)] += n
        # ties broken by the pair itself so the result never depends on hash order
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        for w, parts in split.items():
            out: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            split[w] = out
    tokens = (*SPECIAL_TOKENS, *symbols, *(a + b for a, b in merges))
    return tokens, tuple(merges)


def tiny_tokenizer() -> Tokenizer:
    """The tiny byte-level BPE as a ``tokenizers.Tokenizer``."""
    tokens, merges = tiny_vocab_and_merges()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=list(merges)))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def tiny_weights(spec: TinySpec, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded weights under HF LlamaForCausalLM names (rotate-half RoPE layout)."""
    gen = torch.Generator().manual_seed(spec.seed)

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        scale: float = in_f**-0.5
        return scale * torch.randn(out_f, in_f, generator=gen)

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=gen)

    h, hd = spec.hidden, spec.head_dim
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(spec.vocab, h, generator=gen)}
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(h)
        w[p + "self_attn.q_proj.weight"] = linear(spec.heads * hd, h)
        w[p + "self_attn.k_proj.weight"] = linear(spec.kv_heads * hd, h)
        w[p + "self_attn.v_proj.weight"] = linear(spec.kv_heads * hd, h)
        if spec.bias:
            w[p + "self_attn.q_proj.bias"] = 0.1 * torch.randn(spec.heads * hd, generator=gen)
            w[p + "self_attn.k_proj.bias"] = 0.1 * torch.randn(spec.kv_heads * hd, generator=gen)
            w[p + "self_attn.v_proj.bias"] = 0.1 * torch.randn(spec.kv_heads * hd, generator=gen)
        w[p + "self_attn.o_proj.weight"] = linear(h, spec.heads * hd)
        w[p + "post_attention_layernorm.weight"] = norm(h)
        w[p + "mlp.gate_proj.weight"] = linear(spec.intermediate, h)
        w[p + "mlp.up_proj.weight"] = linear(spec.intermediate, h)
        w[p + "mlp.down_proj.weight"] = linear(h, spec.intermediate)
    w["model.norm.weight"] = norm(h)
    if not spec.tie:
        w["lm_head.weight"] = linear(spec.vocab, h)
    return {k: v.to(dtype).contiguous() for k, v in w.items()}


class TinyModelArgs(TypedDict, total=False):
    """The model arguments of ``make_tiny_hf`` and ``make_tiny_gguf``; TinySpec's defaults."""

    seed: int
    arch: Arch
    vocab: int | None  # None: the tokenizer's size
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tie: bool
    rope_scaling: Mapping[str, Any] | None
    rope_theta: float
    bias: bool  # qwen2 only
    max_position_embeddings: int


def _spec(args: TinyModelArgs) -> TinySpec:
    kw: dict[str, Any] = dict(args)
    if kw.get("vocab") is None:
        kw["vocab"] = TOKENIZER_SIZE
    if kw.get("bias") and kw.get("arch", "llama") != "qwen2":
        # HF Llama's attention_bias also adds an o_proj bias, which the engine does not carry.
        raise ValueError("bias=True is only meaningful for arch='qwen2'")
    return TinySpec(**kw)


def make_tiny_hf(
    directory: Path,
    *,
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
    add_bos_token: bool = False,
    chat_template: str | None = CHATML_TEMPLATE,
    **model: Unpack[TinyModelArgs],
) -> Path:
    """Write a tiny HF model folder into ``directory`` (created) and return it."""
    spec = _spec(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = tiny_weights(spec, dtype)
    _write_safetensors(directory, weights, shards)
    _write_json(directory / "config.json", hf_config(spec, dtype))
    _write_json(directory / "generation_config.json",
                {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, UNK_ID]})
    tiny_tokenizer().save(str(directory / "tokenizer.json"))
    tok_cfg: dict[str, Any] = {
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[EOS_ID],
        "unk_token": SPECIAL_TOKENS[UNK_ID],
        "model_max_length": spec.max_position_embeddings,
        "tokenizer_class": "GPT2Tokenizer",
        "added_tokens_decoder": {
            str(i): {"content": t, "special": True, "normalized": False, "lstrip": False,
                     "rstrip": False, "single_word": False}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }
    if chat_template is not None:
        tok_cfg["chat_template"] = chat_template
    _write_json(directory / "tokenizer_config.json", tok_cfg)
    return directory


def hf_config(spec: TinySpec, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` dict of a tiny model."""
    arch_name, model_type = _HF_ARCH[spec.arch]
    cfg: dict[str, Any] = {
        "architectures": [arch_name],
        "model_type": model_type,
        "vocab_size": spec.vocab,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": dict(spec.rope_scaling) if spec.rope_scaling else None,
        "tie_word_embeddings": spec.tie,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if spec.arch == "qwen2":
        cfg["attention_bias"] = spec.bias
    return cfg


def _write_safetensors(directory: Path, weights: dict[str, torch.Tensor], shards: int) -> None:
    if shards <= 1:
        save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(weights)
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[s * per:(s + 1) * per]}
        save_file(part, str(directory / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    _write_json(directory / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


def _permute_for_gguf(w: npt.NDArray[Any], n_heads: int) -> npt.NDArray[Any]:
    # HF rotate-half rows -> ggml interleaved pairs, per head (as llama.cpp's converter does).
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensor_name(hf_name: str) -> str:
    """The GGUF tensor name of an HF Llama state-dict name."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_GGUF_NAMES[rest]}"


def make_tiny_gguf(
    path: Path,
    *,
    tensor_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    add_bos_token: bool = False,
    chat_template: str | None = CHATML_TEMPLATE,
    gguf_arch: str | None = None,
    **model: Unpack[TinyModelArgs],
) -> Path:
    """Write a GGUF of the same model ``make_tiny_hf`` writes with equal arguments.

    Matrices take ``tensor_type``; norms and biases stay F32 (as llama.cpp keeps them).
    ``gguf_arch`` overrides ``general.architecture`` (to test refusals).
    """
    spec = _spec(model)
    name = gguf_arch or ("qwen2" if spec.arch == "qwen2" else "llama")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), name)
    _write_gguf_metadata(writer, spec, name, add_bos_token, chat_template)
    # llama.cpp permutes Q/K only where ggml's rope is the interleaved kind (not qwen2).
    permute = name in ("llama", "mistral")
    for hf_name, t in tiny_weights(spec).items():
        arr = t.numpy()
        if permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            arr = _permute_for_gguf(arr, spec.heads)
        elif permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            arr = _permute_for_gguf(arr, spec.kv_heads)
        qtype = tensor_type if arr.ndim == 2 else gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_tensor_name(hf_name), np.ascontiguousarray(arr))
        else:
            data = gguf.quants.quantize(np.ascontiguousarray(arr), qtype)
            writer.add_tensor(gguf_tensor_name(hf_name), data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_gguf_metadata(writer: gguf.GGUFWriter, spec: TinySpec, name: str,
                         add_bos_token: bool, chat_template: str | None) -> None:
    writer.add_name("tiny")
    writer.add_context_length(spec.max_position_embeddings)
    writer.add_embedding_length(spec.hidden)
    writer.add_block_count(spec.layers)
    writer.add_feed_forward_length(spec.intermediate)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_vocab_size(spec.vocab)
    scaling = dict(spec.rope_scaling or {})
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_freqs(spec, scaling))
    tokens, merges = tiny_vocab_and_merges()
    # The embedding may have more rows than the tokenizer has tokens: pad like converters do.
    pad = [f"[PAD{i}]" for i in range(len(tokens), spec.vocab)]
    types = [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS) + [gguf.TokenType.NORMAL] * (
        len(tokens) - len(SPECIAL_TOKENS)) + [gguf.TokenType.USER_DEFINED] * len(pad)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list([*tokens, *pad])
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges([f"{a} {b}" for a, b in merges])
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_pad_token_id(EOS_ID)
    writer.add_add_bos_token(add_bos_token)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _llama3_rope_freqs(spec: TinySpec, s: Mapping[str, Any]) -> npt.NDArray[Any]:
    # Per-frequency divisors, the form llama.cpp's converter stores for llama3 scaling.
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    orig = float(s.get("original_max_position_embeddings", 8192))
    base = spec.rope_theta
    dim = spec.head_dim
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


_hf_config = hf_config  # older name, kept for callers
