"""The Llama-family transformer as small pure functions over a paged KV cache.

One forward pass takes a flat batch of tokens from several sequences at once: the
single decode token of every running sequence plus prefill chunks of others. The
matrix multiplications run over the whole flat batch; attention runs per group
(all decode rows together, each prefill chunk on its own) against the pages that
hold each sequence's keys and values. Logits are computed only for the rows that
are sampled.

Weights arrive under Hugging Face ``LlamaForCausalLM`` names in rotate-half RoPE
layout and are fused here: q/k/v into one matrix, gate/up into another.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, MutableMapping

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from tabby.engine.config import ModelConfig, RopeScaling

__all__ = [
    "INT4_GROUP",
    "INT8_KERNEL_MAX_ROWS",
    "AttentionGroup",
    "ForwardBatch",
    "LayerWeights",
    "Linear",
    "ModelWeights",
    "build_weights",
    "forward",
    "int4_supported",
    "linear",
    "make_linear",
    "rms_norm",
    "rope_tables",
]

# Up to this many rows the int8 matrix-vector kernel beats dequantizing the weight and
# running a float matmul (measured on AVX-512 bf16: ~2x at 1 row, even at ~48).
INT8_KERNEL_MAX_ROWS = 32

# Inputs per int4 scale/zero pair: the block size of GGUF's Q4_0/Q4_1 and of Q4_K's
# sub-blocks, so a matrix read from those formats keeps its values.
INT4_GROUP = 32
# The CPU int4 kernel packs output rows in tiles of this many.
_INT4_TILE = 64


@attrs.frozen
class Linear:
    """A weight matrix [out, in]: floats, int8 rows with one scale per row, or int4
    with a scale and zero per group of ``INT4_GROUP`` inputs."""

    weight: Tensor | None  # [out, in] compute dtype; None when quantized
    q8: Tensor | None = None  # [out, in] int8
    scale: Tensor | None = None  # [out] compute dtype
    bias: Tensor | None = None  # [out]
    # int4 values q in 0..15 and w = (q - 8) * scale + zero, held twice: packed for the
    # kernel (its layout is torch's own) and two to a byte in row order for prefill.
    q4: Tensor | None = None  # [out, in / 2] uint8, the kernel's layout
    q4_sz: Tensor | None = None  # [in / G, out, 2] bf16: scale, zero
    q4_rows: Tensor | None = None  # [out, in / 2] uint8: inputs k (low), in / 2 + k (high)
    q4_scale: Tensor | None = None  # [out, in / G, 1] fp32
    q4_base: Tensor | None = None  # [out, in / G, 1] fp32: zero - 8 * scale

    @property
    def out_features(self) -> int:
        if self.weight is not None:
            return int(self.weight.shape[0])
        if self.q8 is not None:
            return int(self.q8.shape[0])
        assert self.q4_sz is not None
        return int(self.q4_sz.shape[1])


def int4_supported(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a [out, in] matrix can be held as int4: the kernel is bf16 on CPU only."""
    out, inp = shape
    # Whole groups in each half of a row, for the prefill copy's nibble order.
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and out % _INT4_TILE == 0
        and inp % (2 * INT4_GROUP) == 0
    )


def _int4_dequantize(lin: Linear, dtype: torch.dtype) -> Tensor:
    """The int4 matrix as floats [out, in], for many-row products (prefill)."""
    assert lin.q4_rows is not None
    assert lin.q4_scale is not None
    assert lin.q4_base is not None
    out, half = lin.q4_rows.shape
    groups = lin.q4_scale.shape[1]
    q = torch.empty(out, 2, half, dtype=torch.uint8, device=lin.q4_rows.device)  # [out, 2, in/2]
    # Four bytes at a time: each nibble of a byte masked out in one int32 operation.
    packed = lin.q4_rows.view(torch.int32)  # [out, in/8]
    low, high = q[:, 0].view(torch.int32), q[:, 1].view(torch.int32)
    torch.bitwise_and(packed, 0x0F0F0F0F, out=low)
    torch.bitwise_right_shift(packed, 4, out=high).bitwise_and_(0x0F0F0F0F)
    # In fp32, as the kernel computes, and rounded to ``dtype`` once: the prompt's rows
    # here and a cached prompt's last rows in the kernel must pick the same tokens.
    w = q.view(out, groups, INT4_GROUP).float()  # [out, in/G, G]
    w.mul_(lin.q4_scale).add_(lin.q4_base)
    return w.view(out, half * 2).to(dtype)


def _quantize_int4(wf: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Asymmetric int4 per group: values [out, in] int32 0..15 and scale/zero [in/G, out, 2].

    Min and max of each group land on 0 and 15, which is how GGUF's Q4_1 is made: such
    a matrix comes back with the values it was stored with, up to the bf16 scales.
    """
    out, inp = wf.shape
    g = wf.view(out, inp // INT4_GROUP, INT4_GROUP)  # [out, in/G, G]
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # [out, in/G]
    # Scales rounded to the kernel's dtype first, so the values are chosen against them.
    scale = ((hi - lo) / 15).clamp(min=1e-12).to(dtype)
    zero = (lo + 8 * scale.float()).to(dtype)
    base = zero.float() - 8 * scale.float()
    q = ((g - base.unsqueeze(-1)) / scale.float().unsqueeze(-1)).round_().clamp_(0, 15)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [in/G, out, 2]
    return q.view(out, inp).to(torch.int32), sz


def make_linear(
    w: Tensor,
    *,
    dtype: torch.dtype,
    device: torch.device,
    int8: bool = False,
    int4: bool = False,
    bias: Tensor | None = None,
) -> Linear:
    """``int4`` (where :func:`int4_supported`) wins over ``int8``; a matrix the int4
    kernel cannot take falls back to int8 when ``int8`` is set, floats otherwise."""
    b = None if bias is None else bias.to(device=device, dtype=dtype)
    if int4 and int4_supported(tuple(w.shape), dtype, device):
        q, sz = _quantize_int4(w.to(device=device, dtype=torch.float32), dtype)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        half = q.shape[1] // 2
        rows = (q[:, :half] | (q[:, half:] << 4)).to(torch.uint8)  # [out, in/2]
        scale, zero = sz.transpose(0, 1).float().unbind(-1)  # [out, in/G] each
        return Linear(
            None,
            bias=b,
            q4=packed,
            q4_sz=sz,
            q4_rows=rows.contiguous(),
            q4_scale=scale.unsqueeze(-1),
            q4_base=(zero - 8 * scale).unsqueeze(-1),
        )
    if not int8:
        return Linear(w.to(device=device, dtype=dtype).contiguous(), bias=b)
    wf = w.to(device=device, dtype=torch.float32)
    # Round the scale to the compute dtype first so the int8 values are chosen
    # against the scale the kernel will actually use.
    scale = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(dtype)  # [out]
    q8 = (wf / scale.float().unsqueeze(1)).round_().clamp_(-127, 127).to(torch.int8)
    return Linear(None, q8.contiguous(), scale.contiguous(), b)


def linear(x: Tensor, lin: Linear, kernel_rows: int | None = None) -> Tensor:
    """x [T, in] -> [T, out].

    ``kernel_rows``: for quantized weights, how many leading rows (the decode rows) go
    through the int4/int8 kernel; the rest (prompt rows) through the unpacked matrix.
    A row's path then depends on what the row is, never on what shares its batch, so a
    stream decodes the same tokens alone or batched, and a prompt the same whole or in
    chunks. None: the kernel for up to ``INT8_KERNEL_MAX_ROWS`` rows.
    """
    if lin.weight is not None:
        return F.linear(x, lin.weight, lin.bias)
    t = x.shape[0]
    k = (t if t <= INT8_KERNEL_MAX_ROWS else 0) if kernel_rows is None else min(kernel_rows, t)
    parts = []
    if k:
        parts.append(_kernel(x[:k].contiguous(), lin))
    if k < t or not parts:
        parts.append(F.linear(x[k:], _dequantize(lin, x.dtype)))
    y = parts[0] if len(parts) == 1 else torch.cat(parts)
    return y if lin.bias is None else y + lin.bias


def _kernel(x: Tensor, lin: Linear) -> Tensor:
    """The weight-only int4 or int8 kernel: x [T, in] -> [T, out], no bias."""
    if lin.q4 is not None:
        assert lin.q4_sz is not None
        y: Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(x, lin.q4, INT4_GROUP, lin.q4_sz)
        return y
    assert lin.q8 is not None
    assert lin.scale is not None
    return torch._weight_int8pack_mm(x, lin.q8, lin.scale)


def _dequantize(lin: Linear, dtype: torch.dtype) -> Tensor:
    """The quantized matrix as floats [out, in]."""
    if lin.q4 is not None:
        return _int4_dequantize(lin, dtype)
    assert lin.q8 is not None
    assert lin.scale is not None
    return lin.q8.to(dtype) * lin.scale.unsqueeze(1).to(dtype)


@attrs.frozen
class LayerWeights:
    attn_norm: Tensor  # [hidden]
    wqkv: Linear  # [(H + 2*KV) * D, hidden], q/k/v bias for Qwen2
    wo: Linear  # [hidden, H * D]
    mlp_norm: Tensor  # [hidden]
    w_gate_up: Linear  # [2 * I, hidden]
    w_down: Linear  # [hidden, I]


@attrs.frozen
class ModelWeights:
    config: ModelConfig
    embed: Tensor  # [V, hidden]
    layers: tuple[LayerWeights, ...]
    norm: Tensor  # [hidden]
    lm_head: Linear  # [V, hidden]; the embedding's values when tied
    cos: Tensor  # [max_pos, D]
    sin: Tensor  # [max_pos, D], sign of rotate-half folded in: [-sin, +sin]


@attrs.frozen
class AttentionGroup:
    """Rows of the flat batch that attend together.

    ``rows`` is a contiguous range [start, start + n_seq * q_len) of the flat batch.
    Decode groups have ``q_len == 1`` and several sequences; a prefill group is one
    sequence with ``q_len`` tokens. ``gather`` holds the cache slots of each
    sequence's keys, padded; ``mask`` marks which of them each query may see
    (None = plain causal attention over the group's own fresh keys).
    """

    start: int
    n_seq: int
    q_len: int
    gather: Tensor | None  # [n_seq, L] cache slot per key position
    # decode: [n_seq, 1, L] fp32 additive (0 or -inf);
    # prefill: [1, 1, q_len, L] bool, True = attend
    mask: Tensor | None
    # Decode only, filled in by ``forward``: row of the cache viewed as [slots*KV, D]
    # for each (sequence, kv head, position), so one gather yields [n*KV, L, D].
    head_gather: Tensor | None = None


@attrs.frozen
class ForwardBatch:
    tokens: Tensor  # [T] token ids
    positions: Tensor  # [T] absolute positions
    write_slots: Tensor  # [T] cache slot each token's k/v goes to
    groups: tuple[AttentionGroup, ...]
    logit_rows: Tensor  # [R] rows of the flat batch whose logits are wanted

    @property
    def decode_rows(self) -> int:
        """How many leading rows are single-token (decode) rows."""
        g = self.groups[0] if self.groups else None
        return g.n_seq if g is not None and g.q_len == 1 and g.start == 0 else 0


def _take(weights: Mapping[str, Tensor], consume: bool) -> Callable[[str], Tensor]:
    def take(name: str) -> Tensor:
        try:
            t = weights[name]
        except KeyError:
            raise KeyError(f"checkpoint is missing tensor {name!r}") from None
        if consume and isinstance(weights, MutableMapping):
            # Each source tensor goes as soon as it is converted: about half the peak memory.
            del weights[name]
        return t

    return take


def build_weights(
    config: ModelConfig,
    weights: Mapping[str, Tensor],
    *,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    int8: bool = False,
    int4: Collection[str] = (),
    consume: bool = False,
    on_layer: Callable[[int], None] | None = None,
) -> ModelWeights:
    """Fuse and convert HF-named tensors into the engine's layout.

    ``consume``: remove each tensor from ``weights`` (a dict) once converted.

    ``int8``: hold every matrix as weight-only int8 (per-row scales); activations
    stay in ``dtype``. With it, the matrices whose every source tensor is named in
    ``int4`` (those the checkpoint stores with 4 bits) are held as int4 where the
    kernel allows: half the bytes to read per token, and no precision lost.
    """

    _w = _take(weights, consume)
    four_bit = frozenset(int4) if int8 else frozenset()

    def cvt(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    def lin(t: Tensor, bias: Tensor | None = None, *names: str) -> Linear:
        q4 = bool(names) and four_bit.issuperset(names)
        return make_linear(t, dtype=dtype, device=device, int8=int8, int4=q4, bias=bias)

    # The attention scale is folded into the query rows (exact for power-of-two head
    # sizes, and one multiply fewer per layer at run time).
    scale = config.head_dim**-0.5
    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        qkv_names = [p + f"self_attn.{n}_proj.weight" for n in ("q", "k", "v")]
        gate_up_names = [p + f"mlp.{n}_proj.weight" for n in ("gate", "up")]
        qkv = [_w(n).float() for n in qkv_names]
        wqkv = torch.cat([qkv[0] * scale, qkv[1], qkv[2]], dim=0)
        bqkv = None
        if config.attention_bias:
            b = [_w(p + f"self_attn.{n}_proj.bias").float() for n in ("q", "k", "v")]
            bqkv = torch.cat([b[0] * scale, b[1], b[2]])
        gate_up = torch.cat([_w(n) for n in gate_up_names], dim=0)
        wo, down = p + "self_attn.o_proj.weight", p + "mlp.down_proj.weight"
        layers.append(
            LayerWeights(
                attn_norm=cvt(_w(p + "input_layernorm.weight")),
                # The 1/sqrt(D) folded into q is a power of two for the usual head
                # sizes: q's 4-bit values survive it.
                wqkv=lin(wqkv, bqkv, *qkv_names),
                wo=lin(_w(wo), None, wo),
                mlp_norm=cvt(_w(p + "post_attention_layernorm.weight")),
                w_gate_up=lin(gate_up, None, *gate_up_names),
                w_down=lin(_w(down), None, down),
            )
        )
        if on_layer is not None:
            on_layer(i)
    raw_embed = _w("model.embed_tokens.weight")
    embed = cvt(raw_embed)
    if config.tie_word_embeddings or "lm_head.weight" not in weights:
        lm_head = lin(raw_embed, None, "model.embed_tokens.weight") if int8 else Linear(embed)
    else:
        lm_head = lin(_w("lm_head.weight"), None, "lm_head.weight")
    del raw_embed
    cos, sin = rope_tables(config, max_positions, device=device)
    return ModelWeights(
        config=config,
        embed=embed,
        layers=tuple(layers),
        norm=cvt(_w("model.norm.weight")),
        lm_head=lm_head,
        cos=cos.to(dtype),
        sin=sin.to(dtype),
    )


def _inv_freq(config: ModelConfig) -> Tensor:
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs: RopeScaling = config.rope_scaling
    if rs.kind == "linear":
        return inv / rs.factor
    if rs.kind == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between
        # blended smoothly (the Llama 3.1 recipe).
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        blended = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled)
    return inv


def rope_tables(
    config: ModelConfig, max_positions: int, *, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """cos and sign-folded sin tables, fp32, each [max_positions, D]."""
    inv = _inv_freq(config)  # [D/2]
    t = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = torch.outer(t, inv)  # [P, D/2]
    cos = torch.cat([freqs.cos(), freqs.cos()], dim=-1)  # [P, D]
    sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1)  # [P, D]
    return cos.to(device), sin.to(device)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # One kernel that normalises in fp32 whatever the activation dtype (as the reference
    # models do) where the spelled-out version took eight: a decode step runs 61 of them.
    return F.rms_norm(x, weight.shape, weight, eps)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [T, heads, D]; cos/sin: [T, 1, D]. roll by D/2 swaps the halves, and the
    # sign folded into `sin` turns that into rotate_half.
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def _gather(cache: Tensor, g: AttentionGroup) -> Tensor:
    """Keys or values of the group's sequences from their pages: [n, L, KV, D]."""
    assert g.gather is not None
    flat = g.gather.reshape(-1)  # [n * L]
    return cache.index_select(0, flat).view(g.n_seq, g.gather.shape[1], *cache.shape[1:])


def _attend_decode(q: Tensor, kc: Tensor, vc: Tensor, g: AttentionGroup) -> Tensor:
    """One query per sequence. q: [n, H, D] -> [n, H, D].

    Batched matmuls over (sequence, kv head) with the query heads that share a kv
    head stacked, in fp32: on CPU these small products run several times faster
    than SDPA's masked path or bf16 matmuls.
    """
    assert g.head_gather is not None
    n, h, d = q.shape
    kvh = kc.shape[1]
    length = g.head_gather.numel() // (n * kvh)
    f32 = torch.float32
    kb = kc.view(-1, d).index_select(0, g.head_gather).view(n * kvh, length, d).to(f32)
    vb = vc.view(-1, d).index_select(0, g.head_gather).view(n * kvh, length, d).to(f32)
    qb = q.to(f32).reshape(n * kvh, h // kvh, d)  # [n*KV, G, D]
    scores = torch.bmm(qb, kb.transpose(1, 2)).view(n, h, length)  # [n, H, L]
    if g.mask is not None:
        scores.add_(g.mask)  # [n, 1, L] additive
    probs = torch.softmax(scores, dim=-1)  # [n, H, L]
    out = torch.bmm(probs.view(n * kvh, h // kvh, length), vb)  # [n*KV, G, D]
    return out.view(n, h, d).to(q.dtype)


def _attend_prefill(
    q: Tensor, k_new: Tensor, v_new: Tensor, kc: Tensor, vc: Tensor, g: AttentionGroup
) -> Tensor:
    """One sequence's chunk. q: [q_len, H, D] -> [q_len, H, D]."""
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
    if g.gather is None:
        # No earlier context: the chunk's own keys, causal (SDPA's flash path).
        kh = k_new.transpose(0, 1).unsqueeze(0)  # [1, KV, q_len, D]
        vh = v_new.transpose(0, 1).unsqueeze(0)  # [1, KV, q_len, D]
        out = F.scaled_dot_product_attention(
            qh, kh, vh, is_causal=True, scale=1.0, enable_gqa=True
        )
    else:
        kh = _gather(kc, g)[0].transpose(0, 1).unsqueeze(0)  # [1, KV, L, D]
        vh = _gather(vc, g)[0].transpose(0, 1).unsqueeze(0)  # [1, KV, L, D]
        out = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=g.mask, scale=1.0, enable_gqa=True
        )
    return out[0].transpose(0, 1)  # [q_len, H, D]


def _attend(
    q: Tensor, k_new: Tensor, v_new: Tensor, kc: Tensor, vc: Tensor, g: AttentionGroup
) -> Tensor:
    """Attention of one group. q: [n*q_len, H, D]; kc/vc: [slots, KV, D] -> [n*q_len, H, D]."""
    if g.q_len == 1:
        return _attend_decode(q, kc, vc, g)
    return _attend_prefill(q, k_new, v_new, kc, vc, g)


def _layer(
    x: Tensor,
    lw: LayerWeights,
    cfg: ModelConfig,
    batch: ForwardBatch,
    groups: tuple[AttentionGroup, ...],
    rope: tuple[Tensor, Tensor],
    kc: Tensor,
    vc: Tensor,
) -> Tensor:
    t = x.shape[0]
    h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    hn = rms_norm(x, lw.attn_norm, cfg.rms_norm_eps)
    dec = batch.decode_rows
    qkv = linear(hn, lw.wqkv, dec)  # [T, (H + 2KV) * D]
    qk = _rope(qkv[:, : (h + kvh) * d].view(t, h + kvh, d), *rope)  # [T, H+KV, D]
    q, k = qk[:, :h], qk[:, h:]  # [T, H, D], [T, KV, D]
    v = qkv[:, (h + kvh) * d :].view(t, kvh, d)  # [T, KV, D]
    kc.index_copy_(0, batch.write_slots, k)
    vc.index_copy_(0, batch.write_slots, v)
    if len(groups) == 1:
        attn = _attend(q, k, v, kc, vc, groups[0])
    else:
        attn = torch.cat(
            [
                _attend(
                    q[g.start : g.start + g.n_seq * g.q_len],
                    k[g.start : g.start + g.n_seq * g.q_len],
                    v[g.start : g.start + g.n_seq * g.q_len],
                    kc,
                    vc,
                    g,
                )
                for g in groups
            ]
        )
    x = x + linear(attn.reshape(t, h * d), lw.wo, dec)
    hn = rms_norm(x, lw.mlp_norm, cfg.rms_norm_eps)
    gate, up = linear(hn, lw.w_gate_up, dec).chunk(2, dim=-1)  # [T, I] each
    return x + linear(F.silu(gate) * up, lw.w_down, dec)


def _with_head_gather(g: AttentionGroup, kv_heads: int) -> AttentionGroup:
    if g.q_len != 1 or g.gather is None:
        return g
    heads = torch.arange(kv_heads, device=g.gather.device).view(1, kv_heads, 1)  # [1, KV, 1]
    rows = g.gather.unsqueeze(1) * kv_heads + heads  # [n, KV, L]
    return attrs.evolve(g, head_gather=rows.reshape(-1))


def forward(
    w: ModelWeights,
    batch: ForwardBatch,
    k_cache: Tensor,
    v_cache: Tensor,
    before_head: Callable[[], None] | None = None,
) -> Tensor:
    """Run the flat batch; returns fp32 logits [R, V] for ``batch.logit_rows``.

    ``k_cache``/``v_cache``: [layers, slots, KV, D]; this pass writes the new keys
    and values of every token in the batch into their slots. ``before_head`` is called
    right before the LM head, the pass's longest kernel (a fifth of the weights).
    """
    cfg = w.config
    x = F.embedding(batch.tokens, w.embed)  # [T, hidden]
    cos = w.cos.index_select(0, batch.positions).unsqueeze(1)  # [T, 1, D]
    sin = w.sin.index_select(0, batch.positions).unsqueeze(1)  # [T, 1, D]
    groups = tuple(_with_head_gather(g, cfg.num_kv_heads) for g in batch.groups)
    for i, lw in enumerate(w.layers):
        x = _layer(x, lw, cfg, batch, groups, (cos, sin), k_cache[i], v_cache[i])
    x = x.index_select(0, batch.logit_rows)  # [R, hidden]
    x = rms_norm(x, w.norm, cfg.rms_norm_eps)
    if before_head is not None:
        before_head()
    # Decode rows lead the flat batch and so the logit rows: each wants its logits.
    return linear(x, w.lm_head, batch.decode_rows).float()  # [R, V]
