"""The model functions against transformers and against themselves (cached vs. full)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tabby.engine.batch import SeqChunk, build_batch
from tabby.engine.config import ModelConfig
from tabby.engine.model import (
    INT8_KERNEL_MAX_ROWS,
    ModelWeights,
    build_weights,
    forward,
    linear,
    make_linear,
)
from tabby.testing.tiny import TinySpec, _hf_config, tiny_weights

CPU = torch.device("cpu")
PAGE = 4


def _model(spec: TinySpec) -> tuple[ModelWeights, dict[str, torch.Tensor], dict[str, Any]]:
    w = tiny_weights(spec)
    hf = _hf_config(spec, torch.float32)
    cfg = ModelConfig.from_hf(hf)
    return build_weights(cfg, w, dtype=torch.float32, device=CPU, max_positions=256), w, hf


def _cache(mw: ModelWeights, pages: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    c = mw.config
    k = torch.zeros(c.num_layers, pages * PAGE, c.num_kv_heads, c.head_dim)
    return k, torch.zeros_like(k)


def _run(mw: ModelWeights, chunks: list[SeqChunk], kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    batch, index = build_batch(chunks, PAGE, CPU)
    logits = forward(mw, batch, *kv)
    return logits[[i for i in index if i >= 0]]


def _full(mw: ModelWeights, ids: list[int]) -> torch.Tensor:
    """Logits of every position, from scratch (no earlier cache)."""
    pages = list(range(-(-len(ids) // PAGE)))
    batch, _ = build_batch([SeqChunk(pages, 0, ids, True)], PAGE, CPU)
    batch = type(batch)(batch.tokens, batch.positions, batch.write_slots, batch.groups,
                        torch.arange(len(ids)))
    return forward(mw, batch, *_cache(mw))


SPECS = [
    pytest.param(TinySpec(), id="llama"),
    pytest.param(TinySpec(tie=True, seed=3), id="tied"),
    pytest.param(TinySpec(arch="qwen2", bias=True, seed=4), id="qwen2-bias"),
    pytest.param(TinySpec(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 32}), id="llama3-rope"),
    pytest.param(TinySpec(rope_scaling={"type": "linear", "factor": 2.0}, seed=5), id="linear-rope"),
]


@pytest.mark.parametrize("spec", SPECS)
def test_logits_match_transformers(spec: TinySpec) -> None:
    transformers = pytest.importorskip("transformers")
    mw, w, hf = _model(spec)
    cls = transformers.Qwen2ForCausalLM if spec.arch == "qwen2" else transformers.LlamaForCausalLM
    conf_cls = transformers.Qwen2Config if spec.arch == "qwen2" else transformers.LlamaConfig
    ref_model = cls(conf_cls(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")}))
    ref_model.load_state_dict(w, strict=not spec.tie)
    ref_model.eval()
    ids = torch.randint(0, spec.vocab, (1, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref_model(ids).logits[0]
    # The same positions through the paged path: a prefill, a chunk on top, then decodes.
    kv = _cache(mw)
    pages = list(range(30))
    seq = ids[0].tolist()
    got = [_run(mw, [SeqChunk(pages, 0, seq[:40], True)], kv),
           _run(mw, [SeqChunk(pages, 40, seq[40:61], True)], kv)]
    got += [_run(mw, [SeqChunk(pages, p, [seq[p]], True)], kv) for p in range(61, 70)]
    rows = [39, 60, *range(61, 70)]
    torch.testing.assert_close(torch.cat(got), expected[rows], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_full(mw, seq), expected, atol=1e-4, rtol=1e-4)


def test_cached_greedy_equals_full_recomputation() -> None:
    mw, _, _ = _model(TinySpec(seed=7))
    prompt = [5, 17, 99, 250, 3, 41, 8]
    kv = _cache(mw)
    pages = list(range(16))
    ids = list(prompt)
    logits = _run(mw, [SeqChunk(pages, 0, ids, True)], kv)
    for _ in range(30):
        nxt = int(logits[0].argmax())
        full = _full(mw, ids)[-1]
        assert int(full.argmax()) == nxt
        torch.testing.assert_close(logits[0], full, atol=1e-5, rtol=1e-5)
        ids.append(nxt)
        logits = _run(mw, [SeqChunk(pages, len(ids) - 1, [nxt], True)], kv)


def test_mixed_flat_batch_equals_separate_passes() -> None:
    mw, _, _ = _model(TinySpec(seed=2))
    a, b, c = [1, 2, 3, 4, 5, 6, 7, 8, 9], [40, 41, 42], [300, 200, 100, 50, 25, 12]
    kv = _cache(mw)
    pa, pb, pc = [0, 1, 2, 3], [4, 5], [6, 7, 8]
    # a and b are already in cache up to their last token; c starts prefill in the same pass.
    _run(mw, [SeqChunk(pa, 0, a[:-1], False), SeqChunk(pb, 0, b[:-1], False)], kv)
    mixed = _run(mw, [SeqChunk(pc, 0, c[:4], True), SeqChunk(pa, 8, a[8:], True),
                      SeqChunk(pb, 2, b[2:], True)], kv)
    # build_batch puts decode rows first: [a, b, c] in logit order of the chunks given.
    expected = torch.stack([_full(mw, c[:4])[-1], _full(mw, a)[-1], _full(mw, b)[-1]])
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
    # The chunk on top of cached context sees everything before it.
    rest = _run(mw, [SeqChunk(pc, 4, c[4:], True)], kv)
    torch.testing.assert_close(rest[0], _full(mw, c)[-1], atol=1e-5, rtol=1e-5)


def test_bf16_stays_close_to_fp32() -> None:
    spec = TinySpec(seed=9)
    w = tiny_weights(spec)
    cfg = ModelConfig.from_hf(_hf_config(spec, torch.float32))
    ids = list(range(10, 40))
    f32 = _full(build_weights(cfg, w, dtype=torch.float32, device=CPU, max_positions=64), ids)
    mw16 = build_weights(cfg, w, dtype=torch.bfloat16, device=CPU, max_positions=64)
    pages = list(range(8))
    c = mw16.config
    k = torch.zeros(c.num_layers, 64 * PAGE, c.num_kv_heads, c.head_dim, dtype=torch.bfloat16)
    batch, _ = build_batch([SeqChunk(pages, 0, ids, True)], PAGE, CPU)
    got = forward(mw16, batch, k, torch.zeros_like(k))
    assert got.dtype == torch.float32
    assert (got[0] - f32[-1]).abs().max() < 0.1 * f32[-1].abs().max()


def test_int8_weights_track_float_weights() -> None:
    spec = TinySpec(seed=9)
    w = tiny_weights(spec)
    cfg = ModelConfig.from_hf(_hf_config(spec, torch.float32))
    ids = list(range(10, 50))
    f32 = _full(build_weights(cfg, w, dtype=torch.float32, device=CPU, max_positions=64), ids)
    q8 = _full(build_weights(cfg, w, dtype=torch.float32, device=CPU, max_positions=64,
                             int8=True), ids)
    assert q8.shape == f32.shape
    assert (q8 - f32).abs().max() < 0.05 * f32.abs().max()
    assert (q8.argmax(-1) == f32.argmax(-1)).float().mean() > 0.9


def test_int8_kernel_and_dequantized_paths_agree() -> None:
    g = torch.Generator().manual_seed(0)
    lin = make_linear(torch.randn(48, 64, generator=g), dtype=torch.bfloat16, device=CPU,
                      int8=True, bias=torch.randn(48, generator=g))
    assert lin.weight is None
    assert lin.q8 is not None
    assert lin.scale is not None
    assert lin.bias is not None
    x = torch.randn(INT8_KERNEL_MAX_ROWS + 8, 64, generator=g).to(torch.bfloat16)
    small = linear(x[:4], lin)  # the int8 kernel
    big = linear(x, lin)  # dequantize, then a float matmul
    torch.testing.assert_close(small.float(), big[:4].float(), atol=0.05, rtol=0.02)
    dense = x.float() @ (lin.q8.float() * lin.scale.float().unsqueeze(1)).T + lin.bias.float()
    torch.testing.assert_close(big.float(), dense, atol=0.1, rtol=0.02)
