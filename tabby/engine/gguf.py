"""GGUF files: a fast metadata reader, dequantization, and conversion to HF tensor names.

``gguf.GGUFReader`` builds a numpy view per item of every array (about 2 s for the
98k token and merge strings of SmolLM2), so the header is parsed here directly from a
memory map; only dequantization uses the ``gguf`` package.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import gguf
import numpy as np
import numpy.typing as npt
import torch

from tabby.engine.checkpoint import Checkpoint, GenerationDefaults, LoadProgressFn, merge_eos_ids
from tabby.engine.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling
from tabby.engine.gguf_vocab import gguf_tokenizer
from tabby.errors import NotSupported

__all__ = ["SUPPORTED_TENSOR_TYPES", "GGUFFile", "TensorInfo", "load_gguf", "read_gguf"]

Q = gguf.GGMLQuantizationType
SUPPORTED_TENSOR_TYPES = frozenset({
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
})

# Formats whose values an int4 matrix with a scale and zero per 32 inputs holds as they
# are: Q4_1 blocks span 0..15 from their min to their max, which is how the engine
# requantizes. (Q4_0 and Q4_K blocks need not reach both ends.)
FOUR_BIT_TYPES = frozenset({Q.Q4_1})

Fix = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]

_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_NP_TYPES: dict[int, str] = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
    10: "<u8", 11: "<i8", 12: "<f8",
}
_STRING, _ARRAY = 8, 9


@attrs.frozen
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (slowest dimension first)
    type: gguf.GGMLQuantizationType
    offset: int  # absolute, in the file
    nbytes: int


@attrs.frozen
class GGUFFile:
    """A parsed GGUF: metadata values (arrays as lists) and tensor locations."""

    path: Path
    metadata: dict[str, Any] = attrs.field(repr=False)
    tensors: dict[str, TensorInfo] = attrs.field(repr=False)
    _buf: mmap.mmap = attrs.field(repr=False, alias="buf")

    def raw(self, name: str) -> npt.NDArray[np.uint8]:
        t = self.tensors[name]
        return np.frombuffer(self._buf, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def array(self, name: str) -> npt.NDArray[np.float32]:
        """The tensor as a fresh float32 array, in PyTorch shape."""
        t = self.tensors[name]
        if t.type not in SUPPORTED_TENSOR_TYPES:
            raise NotSupported(
                f"{self.path.name}: tensor {name!r} has type {t.type.name}, which the reference "
                f"engine cannot dequantize (supported: "
                f"{', '.join(sorted(q.name for q in SUPPORTED_TENSOR_TYPES))})"
            )
        raw = self.raw(name)
        if t.type == Q.F32:
            return raw.view(np.float32).reshape(t.shape).copy()
        if t.type == Q.F16:
            return raw.view(np.float16).reshape(t.shape).astype(np.float32)
        # Whole tensor in one call: gguf.quants.dequantize's row grouping costs 4x more.
        _, type_size = gguf.GGML_QUANT_SIZES[t.type]
        blocks = getattr(gguf.quants, t.type.name).dequantize_blocks(raw.reshape(-1, type_size))
        return np.ascontiguousarray(blocks, dtype=np.float32).reshape(t.shape)

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return to_torch(self.array(name), dtype)

    def close(self) -> None:
        # A view may still be referenced (say, from a traceback); the map is freed with it.
        with contextlib.suppress(BufferError):
            self._buf.close()


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, vtype: int) -> Any:
        fmt, size = _SCALARS[vtype]
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        (n,) = struct.unpack_from("<Q", self.buf, self.pos)
        start = self.pos + 8
        self.pos = start + n
        return self.buf[start:self.pos].decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = struct.unpack_from("<IQ", self.buf, self.pos)
            self.pos += 12
            if item_type == _STRING:
                return self._strings(count)
            if item_type in _NP_TYPES:
                arr = np.frombuffer(self.buf, dtype=_NP_TYPES[item_type], count=count,
                                    offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(item_type) for _ in range(count)]
        if vtype not in _SCALARS:
            raise NotSupported(f"GGUF metadata value type {vtype} is not supported")
        return self.scalar(vtype)

    def _strings(self, count: int) -> list[str]:
        # The hot loop of the header (one pass per token and merge): keep it tight.
        buf, pos = self.buf, self.pos
        out: list[str] = []
        unpack = struct.Struct("<Q").unpack_from
        append = out.append
        for _ in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            append(buf[pos:pos + n].decode("utf-8", errors="replace"))
            pos += n
        self.pos = pos
        return out


def read_gguf(path: Path) -> GGUFFile:
    """Parse the header, metadata and tensor table of a little-endian GGUF (v2 or v3)."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(buf)
    magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    if magic != b"GGUF":
        raise NotSupported(f"{path.name} is not a GGUF file")
    if version not in (2, 3):
        raise NotSupported(f"{path.name}: GGUF version {version} is not supported (2 and 3 are)")
    cur.pos = 24
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        (vtype,) = struct.unpack_from("<I", buf, cur.pos)
        cur.pos += 4
        metadata[key] = cur.value(vtype)
    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(n_tensors):
        name = cur.string()
        (n_dims,) = struct.unpack_from("<I", buf, cur.pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, cur.pos + 4)
        ttype, offset = struct.unpack_from("<IQ", buf, cur.pos + 4 + 8 * n_dims)
        cur.pos += 4 + 8 * n_dims + 12
        infos.append((name, tuple(reversed(dims)), ttype, offset))
    align = int(metadata.get("general.alignment", 32))
    data_start = -(-cur.pos // align) * align
    tensors: dict[str, TensorInfo] = {}
    for name, shape, ttype, offset in infos:
        try:
            qtype = Q(ttype)
        except ValueError:
            raise NotSupported(f"{path.name}: tensor {name!r} has unknown type {ttype}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n = int(np.prod(shape)) if shape else 1
        tensors[name] = TensorInfo(name, shape, qtype, data_start + offset, n // block * type_size)
    return GGUFFile(path=Path(path), metadata=metadata, tensors=tensors, buf=buf)


def to_torch(a: npt.NDArray[np.float32], dtype: torch.dtype) -> torch.Tensor:
    """float32 array -> torch tensor of ``dtype``, converted in numpy.

    torch's parallel copy kernels thrash when the cores are busy (35x slower for a
    model's worth of small tensors on 2 loaded cores); numpy's single-threaded
    conversion does not. bfloat16 rounds to nearest even, as torch does.
    """
    if dtype == torch.float32:
        return torch.from_numpy(a)
    if dtype == torch.float16:
        return torch.from_numpy(a.astype(np.float16))
    if dtype == torch.bfloat16:
        u = a.view(np.uint32)
        rounded = (u + (((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF))) >> np.uint32(16)
        return torch.from_numpy(rounded.astype(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a).to(dtype)


def _unpermute(w: npt.NDArray[np.float32], n_heads: int) -> npt.NDArray[np.float32]:
    # ggml interleaved pairs -> HF rotate-half, per head. w: [n_heads*head_dim, ...]
    return np.ascontiguousarray(
        w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2)
    ).reshape(w.shape)


_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def gguf_config(g: GGUFFile) -> ModelConfig:
    """ModelConfig from GGUF metadata; refuses architectures outside the Llama family."""
    m = g.metadata
    arch = str(m.get("general.architecture", "unknown"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise NotSupported(
            f"{g.path.name}: architecture {arch!r} is not supported by the reference engine "
            f"(supported: llama, mistral, qwen2)", param="model_name")

    def get(key: str, default: Any = None) -> Any:
        return m.get(f"{arch}.{key}", default)

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv = get("attention.head_count_kv", heads)
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise NotSupported(f"{g.path.name}: partial rotary embeddings are not supported")
    tokens = m.get("tokenizer.ggml.tokens") or []
    vocab = int(get("vocab_size", 0) or g.tensors["token_embd.weight"].shape[0] or len(tokens))
    return ModelConfig(
        arch=SUPPORTED_ARCHITECTURES[arch],  # type: ignore[arg-type]
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(kv[0] if isinstance(kv, list) else kv),
        head_dim=head_dim,
        max_position_embeddings=int(get("context_length", 4096)),
        # stored as float32: 1e-5 would read back as 9.99999975e-06
        rms_norm_eps=float(f'{float(get("attention.layer_norm_rms_epsilon", 1e-5)):.7g}'),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(g, arch, head_dim),
        tie_word_embeddings="output.weight" not in g.tensors,
        attention_bias="blk.0.attn_q.bias" in g.tensors,
        bos_token_id=m.get("tokenizer.ggml.bos_token_id"),
    )


def _rope_scaling(g: GGUFFile, arch: str, head_dim: int) -> RopeScaling:
    m = g.metadata
    kind = str(m.get(f"{arch}.rope.scaling.type", "none"))
    factor = float(m.get(f"{arch}.rope.scaling.factor", m.get(f"{arch}.rope.scale_linear", 1.0)))
    if "rope_freqs.weight" in g.tensors:
        return _llama3_from_freqs(g, arch, head_dim)
    if kind == "linear" or (kind == "none" and factor != 1.0):
        return RopeScaling(kind="linear", factor=factor)
    if kind == "none":
        return RopeScaling()
    raise NotSupported(f"{g.path.name}: rope scaling type {kind!r} is not supported")


def _llama3_from_freqs(g: GGUFFile, arch: str, head_dim: int) -> RopeScaling:
    # GGUF stores llama3 scaling as per-frequency divisors; recover the parameters that
    # reproduce them (Llama 3.1/3.2 use low=1, high=4, original context 8192).
    got = g.tensor("rope_freqs.weight").double()
    base = float(g.metadata.get(f"{arch}.rope.freq_base", 10000.0))
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factor = float(got.max())
    for low, high, orig in ((1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 4.0, 2048)):
        wavelen = 2 * torch.pi / freqs
        smooth = ((orig / wavelen - low) / (high - low)).clamp(0, 1)
        want = 1 / ((1 - smooth) / factor + smooth)
        if torch.allclose(want, got, rtol=1e-3):
            return RopeScaling(kind="llama3", factor=factor, low_freq_factor=low,
                               high_freq_factor=high, original_max_position_embeddings=orig)
    raise NotSupported(f"{g.path.name}: rope_freqs do not match llama3 rope scaling")


def gguf_generation(g: GGUFFile, tokenizer: Any) -> GenerationDefaults:
    m = g.metadata
    templates: dict[str, str] = {}
    if isinstance(m.get("tokenizer.chat_template"), str):
        templates["default"] = m["tokenizer.chat_template"]
    for name in m.get("tokenizer.chat_templates") or []:
        text = m.get(f"tokenizer.chat_template.{name}")
        if isinstance(text, str):
            templates[str(name)] = text
    bos = m.get("tokenizer.ggml.bos_token_id")
    model = m.get("tokenizer.ggml.model")
    return GenerationDefaults(
        eos_token_ids=merge_eos_ids(m.get("tokenizer.ggml.eos_token_id"),
                                    m.get("tokenizer.ggml.eot_token_id"),
                                    m.get("tokenizer.ggml.eom_token_id")),
        bos_token_id=None if bos is None else int(bos),
        add_bos_token=bool(m.get("tokenizer.ggml.add_bos_token", model == "llama")),
        chat_template=templates.get("default") or next(iter(templates.values()), None),
        chat_templates=templates,
        chat_template_source="gguf" if templates else None,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        unk_token=tokenizer.unk_token,
    )


def load_gguf(
    path: Path, *, dtype: torch.dtype = torch.float32, progress: LoadProgressFn | None = None
) -> Checkpoint:
    g = read_gguf(path)
    try:
        config = gguf_config(g)
        tokenizer = gguf_tokenizer(g.metadata, g.path.name)
        generation = gguf_generation(g, tokenizer)
        config = attrs.evolve(config, eos_token_ids=generation.eos_token_ids)
        weights, four_bit = _gguf_weights(g, config, dtype, progress)
    finally:
        g.close()
    return Checkpoint(config=config, weights=weights, tokenizer=tokenizer,
                      generation=generation, path=Path(path), format="gguf",
                      four_bit=four_bit)


def _gguf_weights(
    g: GGUFFile, config: ModelConfig, dtype: torch.dtype, progress: LoadProgressFn | None
) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """HF-named tensors, and the names of those stored with 4 bits."""
    # llama.cpp's converter permutes Q/K rows only for archs whose ggml rope is the
    # interleaved kind ("llama"); qwen2 uses NEOX rope, already HF's layout.
    permuted = g.metadata.get("general.architecture") in ("llama", "mistral")
    total = config.num_layers + 2
    done = 0
    weights: dict[str, torch.Tensor] = {}
    four_bit: set[str] = set()

    def put(hf_name: str, gguf_name: str, fix: Fix | None = None) -> None:
        if gguf_name not in g.tensors:
            raise NotSupported(f"{g.path.name}: tensor {gguf_name!r} is missing")
        a = g.array(gguf_name)
        weights[hf_name] = to_torch(fix(a) if fix else a, dtype)
        if g.tensors[gguf_name].type in FOUR_BIT_TYPES:
            four_bit.add(hf_name)

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    put("model.embed_tokens.weight", "token_embd.weight")
    step()
    for i in range(config.num_layers):
        for gname, hname in _LAYER_NAMES.items():
            full = f"blk.{i}.{gname}"
            if gname.endswith(".bias") and full not in g.tensors:
                continue
            fix: Fix | None = None
            if permuted and gname.startswith("attn_q."):
                fix = lambda t: _unpermute(t, config.num_heads)  # noqa: E731
            elif permuted and gname.startswith("attn_k."):
                fix = lambda t: _unpermute(t, config.num_kv_heads)  # noqa: E731
            put(f"model.layers.{i}.{hname}", full, fix)
        step()
    put("model.norm.weight", "output_norm.weight")
    if not config.tie_word_embeddings:
        put("lm_head.weight", "output.weight")
    step()
    return weights, frozenset(four_bit)
