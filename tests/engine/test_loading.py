"""HF folder loading: weights, config, generation defaults, templates, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tabby.engine.checkpoint import Checkpoint, merge_eos_ids
from tabby.engine.loading import load_checkpoint
from tabby.errors import NotFound, NotSupported
from tabby.testing.tiny import (
    BOS_ID,
    CHATML_TEMPLATE,
    EOS_ID,
    UNK_ID,
    TinySpec,
    make_tiny_hf,
    tiny_weights,
)


def assert_same_weights(a: Checkpoint, b: Checkpoint) -> None:
    assert sorted(a.weights) == sorted(b.weights)
    for name, t in a.weights.items():
        assert torch.equal(t, b.weights[name]), name


def test_single_and_sharded_folders_load_the_same(tmp_path: Path) -> None:
    single = load_checkpoint(make_tiny_hf(tmp_path / "one"), dtype=torch.float32)
    sharded_dir = make_tiny_hf(tmp_path / "three", shards=3)
    assert len(list(sharded_dir.glob("*.safetensors"))) == 3
    sharded = load_checkpoint(sharded_dir, dtype=torch.float32)
    assert_same_weights(single, sharded)
    assert single.config == sharded.config
    # and the weights are the generator's, under HF names
    expected = tiny_weights(TinySpec())
    assert sorted(expected) == sorted(single.weights)
    assert all(torch.equal(t, single.weights[n]) for n, t in expected.items())


def test_config_and_generation_defaults(tmp_path: Path) -> None:
    ck = load_checkpoint(make_tiny_hf(tmp_path / "m"), dtype=torch.float32)
    c = ck.config
    assert (c.arch, c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads,
            c.head_dim, c.intermediate_size) == ("llama", 320, 64, 2, 4, 2, 16, 128)
    assert not c.tie_word_embeddings
    g = ck.generation
    # config.json says 2, generation_config.json [2, 0], the tokenizer's eos is 2
    assert g.eos_token_ids == (EOS_ID, UNK_ID) == c.eos_token_ids
    assert g.bos_token_id == BOS_ID
    assert (g.bos_token, g.eos_token, g.pad_token, g.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert g.add_bos_token is False
    assert g.chat_template == CHATML_TEMPLATE
    assert g.chat_template_source == "tokenizer_config.json"
    assert ck.tokenizer.bos_token_id == BOS_ID
    assert ck.format == "hf"


def test_progress_reports_every_group(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    load_checkpoint(make_tiny_hf(tmp_path / "m", layers=3), progress=lambda d, n: seen.append((d, n)))
    assert seen == [(i, 5) for i in range(1, 6)]


def test_dtype_tied_and_qwen2_bias(tmp_path: Path) -> None:
    ck = load_checkpoint(make_tiny_hf(tmp_path / "q", arch="qwen2", bias=True, tie=True),
                         dtype=torch.bfloat16)
    assert ck.config.arch == "qwen2"
    assert ck.config.attention_bias
    assert ck.config.tie_word_embeddings
    assert "lm_head.weight" not in ck.weights
    assert "model.layers.1.self_attn.k_proj.bias" in ck.weights
    assert "model.layers.1.self_attn.o_proj.bias" not in ck.weights
    assert {t.dtype for t in ck.weights.values()} == {torch.bfloat16}


def test_rope_scaling_from_config(tmp_path: Path) -> None:
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    ck = load_checkpoint(make_tiny_hf(tmp_path / "m", rope_scaling=rs))
    assert ck.config.rope_scaling.kind == "llama3"
    assert ck.config.rope_scaling.factor == 8.0


def test_template_files_and_named_templates(tmp_path: Path) -> None:
    folder = make_tiny_hf(tmp_path / "m")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"},
                            {"name": "default", "template": "D"}]
    cfg_path.write_text(json.dumps(cfg))
    g = load_checkpoint(folder).generation
    assert g.chat_template == "D"
    assert g.chat_templates == {"tool_use": "T", "default": "D"}
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    g = load_checkpoint(folder).generation
    assert (g.chat_template, g.chat_template_source) == ("J", "chat_template.json")
    (folder / "chat_template.jinja").write_text("K")
    g = load_checkpoint(folder).generation
    assert (g.chat_template, g.chat_template_source) == ("K", "chat_template.jinja")


def test_add_bos_from_post_processor_when_not_configured(tmp_path: Path) -> None:
    folder = make_tiny_hf(tmp_path / "m", add_bos_token=True)
    assert load_checkpoint(folder).generation.add_bos_token is True
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["add_bos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_checkpoint(folder).generation.add_bos_token is False  # no post-processor BOS


def test_refusals(tmp_path: Path) -> None:
    folder = make_tiny_hf(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPTNeoXForCausalLM"], "gpt_neox"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotSupported, match="GPTNeoXForCausalLM"):
        load_checkpoint(folder)
    with pytest.raises(NotFound):
        load_checkpoint(tmp_path / "absent")
    broken = make_tiny_hf(tmp_path / "b")
    (broken / "tokenizer.json").unlink()
    with pytest.raises(NotSupported, match=r"tokenizer\.json"):
        load_checkpoint(broken)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = make_tiny_hf(tmp_path / "m")
    w = load_file(str(folder / "model.safetensors"))
    del w["model.layers.1.mlp.up_proj.weight"]
    save_file(w, str(folder / "model.safetensors"))
    with pytest.raises(NotSupported, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(folder)


def test_merge_eos_ids() -> None:
    assert merge_eos_ids(2, [2, 0], None, 7) == (2, 0, 7)
    assert merge_eos_ids(None, []) == ()
