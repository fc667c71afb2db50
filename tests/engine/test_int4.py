"""int4 weights (GGUF Q4_1 held as they are stored) against the float math they stand for."""

from __future__ import annotations

import pytest
import torch

from tabby.engine.batch import SeqChunk, build_batch
from tabby.engine.config import ModelConfig
from tabby.engine.model import (
    INT4_GROUP,
    INT8_KERNEL_MAX_ROWS,
    Linear,
    ModelWeights,
    _int4_dequantize,
    build_weights,
    forward,
    int4_supported,
    linear,
    make_linear,
)
from tabby.testing.tiny import TinySpec, _hf_config, tiny_weights

CPU = torch.device("cpu")
BF16 = torch.bfloat16
PAGE = 4

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
    reason="this torch has no CPU int4 kernel",
)


def _q4_1_like(out: int, inp: int, seed: int) -> torch.Tensor:
    """A matrix as GGUF Q4_1 stores one: per group of 32, min + q * d with q spanning 0..15,
    d and min exact in bf16."""
    g = torch.Generator().manual_seed(seed)
    groups = inp // INT4_GROUP
    q = torch.randint(0, 16, (out, groups, INT4_GROUP), generator=g)
    q[..., 0], q[..., 1] = 0, 15  # Q4_1's min and max land on the ends
    d = (torch.rand(out, groups, 1, generator=g) * 0.02 + 0.001).to(BF16).float()
    lo = (-8 * d - torch.rand(out, groups, 1, generator=g) * 0.01).to(BF16).float()
    return (lo + q * d).view(out, inp)


def _int4(w: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
    lin = make_linear(w, dtype=BF16, device=CPU, int4=True, bias=bias)
    assert lin.q4 is not None, "int4 fell back"
    return lin


def test_int4_is_used_only_where_the_kernel_applies() -> None:
    assert int4_supported((128, 64), BF16, CPU)
    assert not int4_supported((128, 64), torch.float32, CPU)  # the fp32 kernel is slow
    assert not int4_supported((100, 64), BF16, CPU)  # not whole 64-row tiles
    assert not int4_supported((128, 96), BF16, CPU)  # not whole groups in each half
    w = torch.randn(100, 64)
    assert make_linear(w, dtype=BF16, device=CPU, int8=True, int4=True).q8 is not None
    assert make_linear(w, dtype=BF16, device=CPU, int4=True).weight is not None


def test_q4_1_values_survive_exactly() -> None:
    w = _q4_1_like(192, 128, seed=1)
    lin = _int4(w)
    assert lin.out_features == 192
    # Scale and zero are bf16 and zero = min + 8 d: the same values up to one rounding.
    torch.testing.assert_close(_int4_dequantize(lin, torch.float32), w, atol=2e-3, rtol=0)


def test_int4_kernel_and_dequantized_paths_match_the_float_math() -> None:
    g = torch.Generator().manual_seed(0)
    w, bias = _q4_1_like(128, 64, seed=2), torch.randn(128, generator=g)
    lin = _int4(w, bias.to(BF16))
    dense = _int4_dequantize(lin, torch.float32)  # [out, in]
    x = torch.randn(INT8_KERNEL_MAX_ROWS + 8, 64, generator=g).to(BF16)
    expected = x.float() @ dense.T + bias.to(BF16).float()
    small = linear(x[:3], lin)  # the int4 kernel
    big = linear(x, lin)  # unpacked, then a bf16 matmul
    # bf16 outputs (8 bits of mantissa) of sums of 64 products.
    torch.testing.assert_close(small.float(), expected[:3], atol=0.05, rtol=0.02)
    torch.testing.assert_close(big.float(), expected, atol=0.05, rtol=0.02)


def _weights(spec: TinySpec, *, int4: bool) -> ModelWeights:
    w = tiny_weights(spec)
    names = sorted(n for n, t in w.items() if t.dim() == 2 and "layers." in n)
    for i, name in enumerate(names):
        w[name] = _q4_1_like(*w[name].shape, seed=i)
    cfg = ModelConfig.from_hf(_hf_config(spec, torch.float32))
    if not int4:
        return build_weights(cfg, w, dtype=BF16, device=CPU, max_positions=128)
    return build_weights(cfg, w, dtype=BF16, device=CPU, max_positions=128, int8=True,
                         int4=names)


def _greedy(mw: ModelWeights, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    c = mw.config
    k = torch.zeros(c.num_layers, 32 * PAGE, c.num_kv_heads, c.head_dim, dtype=BF16)
    v = torch.zeros_like(k)
    pages = list(range(32))
    ids = list(prompt)
    batch, _ = build_batch([SeqChunk(pages, 0, ids, True)], PAGE, CPU)
    first = logits = forward(mw, batch, k, v)
    for _ in range(n):
        ids.append(int(logits[0].argmax()))
        batch, _ = build_batch([SeqChunk(pages, len(ids) - 1, ids[-1:], True)], PAGE, CPU)
        logits = forward(mw, batch, k, v)
    return ids[len(prompt):], first


def test_int4_model_decodes_like_its_float_weights() -> None:
    spec = TinySpec(seed=11)
    q4 = _weights(spec, int4=True)
    ref = _weights(spec, int4=False)  # the same values as bf16 matrices
    assert all(lw.wqkv.q4 is not None and lw.w_gate_up.q4 is not None for lw in q4.layers)
    prompt = [5, 17, 99, 250, 3, 41, 8, 60, 61, 62]
    got, got_logits = _greedy(q4, prompt, 20)
    want, want_logits = _greedy(ref, prompt, 20)
    assert got == want
    # bf16 activations through 2 layers: the kernels round in different places.
    scale = want_logits.abs().max()
    assert (got_logits - want_logits).abs().max() < 0.03 * scale


def test_prompt_in_one_chunk_or_kernel_sized_chunks_agrees() -> None:
    # A long chunk runs the unpacked matrices, a short one the kernel: a prompt read from
    # the prefix cache (only its tail computed) must give the logits of one computed whole.
    mw = _weights(TinySpec(seed=12), int4=True)
    c = mw.config
    ids = [(7 * i + 3) % 300 for i in range(INT8_KERNEL_MAX_ROWS + 9)]

    def kv() -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.zeros(c.num_layers, 32 * PAGE, c.num_kv_heads, c.head_dim, dtype=BF16)
        return k, torch.zeros_like(k)

    pages = list(range(32))
    whole, _ = build_batch([SeqChunk(pages, 0, ids, True)], PAGE, CPU)
    expected = forward(mw, whole, *kv())
    cache = kv()
    split = len(ids) - 5
    head, _ = build_batch([SeqChunk(pages, 0, ids[:split], False)], PAGE, CPU)
    forward(mw, head, *cache)
    tail, _ = build_batch([SeqChunk(pages, split, ids[split:], True)], PAGE, CPU)
    got = forward(mw, tail, *cache)
    assert int(got.argmax()) == int(expected.argmax())
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()


def test_decode_rows_take_the_kernel_whatever_shares_their_batch() -> None:
    # A decode row batched with a long prompt chunk gets what it gets alone.
    mw = _weights(TinySpec(seed=13), int4=True)
    c = mw.config
    k = torch.zeros(c.num_layers, 64 * PAGE, c.num_kv_heads, c.head_dim, dtype=BF16)
    v = torch.zeros_like(k)
    a = [(5 * i + 1) % 300 for i in range(9)]
    b = [(11 * i + 2) % 300 for i in range(INT8_KERNEL_MAX_ROWS + 4)]
    pa, pb = list(range(0, 8)), list(range(8, 24))
    batch, _ = build_batch([SeqChunk(pa, 0, a[:-1], False)], PAGE, CPU)
    forward(mw, batch, k, v)
    alone_batch, _ = build_batch([SeqChunk(pa, 8, a[8:], True)], PAGE, CPU)
    alone = forward(mw, alone_batch, k.clone(), v.clone())
    mixed_batch, index = build_batch(
        [SeqChunk(pb, 0, b, True), SeqChunk(pa, 8, a[8:], True)], PAGE, CPU
    )
    assert mixed_batch.decode_rows == 1
    mixed = forward(mw, mixed_batch, k, v)
    torch.testing.assert_close(mixed[index[1]], alone[0], atol=0, rtol=0)
