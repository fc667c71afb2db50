"""Load a Llama-family checkpoint (HF folder or GGUF file) into HF-named torch tensors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import safe_open

from tabby.engine.checkpoint import Checkpoint, GenerationDefaults, LoadProgressFn, merge_eos_ids
from tabby.engine.config import ModelConfig
from tabby.engine.tokenizer import EngineTokenizer
from tabby.errors import NotFound, NotSupported

__all__ = ["load_checkpoint", "load_hf_folder"]

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def load_checkpoint(
    path: Path, *, dtype: torch.dtype = torch.float32, progress: LoadProgressFn | None = None
) -> Checkpoint:
    """Load an HF model folder or a ``.gguf`` file (a folder holding one GGUF works too)."""
    path = Path(path)
    if not path.exists():
        raise NotFound(f"model path {str(path)!r} does not exist", param="model_name")
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise NotSupported(f"{path.name}: only .gguf files can be loaded as a single file")
        from tabby.engine.gguf import load_gguf  # keeps HF-only loads light

        return load_gguf(path, dtype=dtype, progress=progress)
    return load_hf_folder(path, dtype=dtype, progress=progress)


def load_hf_folder(
    folder: Path, *, dtype: torch.dtype = torch.float32, progress: LoadProgressFn | None = None
) -> Checkpoint:
    cfg_raw = _read_json(folder / "config.json")
    if cfg_raw is None:
        raise NotFound(f"{folder}: no config.json", param="model_name")
    config = ModelConfig.from_hf(cfg_raw)
    tokenizer, tok_cfg = _hf_tokenizer(folder)
    gen_cfg = _read_json(folder / "generation_config.json") or {}
    generation = _hf_generation(folder, cfg_raw, gen_cfg, tok_cfg, tokenizer)
    config = attrs.evolve(config, eos_token_ids=generation.eos_token_ids,
                          bos_token_id=generation.bos_token_id)
    weights = _load_safetensors(folder, config, dtype, progress)
    if "lm_head.weight" not in weights and not config.tie_word_embeddings:
        # Some exports omit the head and rely on tying without saying so.
        config = attrs.evolve(config, tie_word_embeddings=True)
    return Checkpoint(config=config, weights=weights, tokenizer=tokenizer,
                      generation=generation, path=folder, format="hf")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _hf_tokenizer(folder: Path) -> tuple[EngineTokenizer, dict[str, Any]]:
    tok_cfg = _read_json(folder / "tokenizer_config.json") or {}
    if not (folder / "tokenizer.json").is_file():
        raise NotSupported(
            f"{folder}: no tokenizer.json (only fast tokenizers are supported by the reference engine)"
        )
    return EngineTokenizer.from_file(folder / "tokenizer.json", tok_cfg), tok_cfg


def _hf_add_bos(tok_cfg: dict[str, Any], folder: Path) -> bool:
    if "add_bos_token" in tok_cfg:
        return bool(tok_cfg["add_bos_token"])
    # No explicit flag: the tokenizer's post-processor says whether it prepends BOS.
    spec = _read_json(folder / "tokenizer.json") or {}
    post = spec.get("post_processor") or {}
    procs = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for p in procs:
        if p.get("type") == "TemplateProcessing":
            first = (p.get("single") or [{}])[0]
            return "SpecialToken" in first
    return False


def _hf_templates(folder: Path, tok_cfg: dict[str, Any]) -> tuple[dict[str, str], str | None]:
    """Named templates and the file they came from; later files in this order win."""
    templates: dict[str, str] = {}
    source: str | None = None
    raw = tok_cfg.get("chat_template")
    if isinstance(raw, str):
        templates["default"], source = raw, "tokenizer_config.json"
    elif isinstance(raw, list):
        for item in raw:
            templates[str(item["name"])] = str(item["template"])
        source = "tokenizer_config.json"
    tj = _read_json(folder / "chat_template.json")
    if isinstance(tj, dict) and isinstance(tj.get("chat_template"), str):
        templates["default"], source = tj["chat_template"], "chat_template.json"
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        templates["default"], source = jinja.read_text(encoding="utf-8"), "chat_template.jinja"
    return templates, source


def _hf_generation(
    folder: Path,
    cfg: dict[str, Any],
    gen_cfg: dict[str, Any],
    tok_cfg: dict[str, Any],
    tokenizer: EngineTokenizer,
) -> GenerationDefaults:
    templates, source = _hf_templates(folder, tok_cfg)
    template = templates.get("default") or next(iter(templates.values()), None)
    bos_id = gen_cfg.get("bos_token_id", cfg.get("bos_token_id"))
    if bos_id is None:
        bos_id = tokenizer.bos_token_id
    sampling_keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                     "do_sample", "max_new_tokens", "max_length")
    return GenerationDefaults(
        eos_token_ids=merge_eos_ids(cfg.get("eos_token_id"), gen_cfg.get("eos_token_id"),
                                    tokenizer.eos_token_id),
        bos_token_id=None if bos_id is None else int(bos_id),
        add_bos_token=_hf_add_bos(tok_cfg, folder),
        chat_template=template,
        chat_templates=templates,
        chat_template_source=source,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        unk_token=tokenizer.unk_token,
        sampling={k: gen_cfg[k] for k in sampling_keys if k in gen_cfg},
    )


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the shard index or the single file(s)."""
    index = _read_json(folder / "model.safetensors.index.json")
    if index is not None:
        return {name: folder / f for name, f in index["weight_map"].items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise NotSupported(f"{folder}: no .safetensors weights found")
    names: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            names.update(dict.fromkeys(sf.keys(), f))
    return names


def expected_names(config: ModelConfig) -> list[list[str]]:
    """Tensor names the engine needs, grouped as progress is reported."""
    groups = [["model.embed_tokens.weight"]]
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        g = [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
             *(p + f"self_attn.{x}_proj.weight" for x in "qkvo"),
             *(p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down"))]
        if config.attention_bias:
            g += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        groups.append(g)
    groups.append(["model.norm.weight"] + ([] if config.tie_word_embeddings else ["lm_head.weight"]))
    return groups


def _load_safetensors(
    folder: Path, config: ModelConfig, dtype: torch.dtype, progress: LoadProgressFn | None
) -> dict[str, torch.Tensor]:
    files = _tensor_files(folder)
    groups = expected_names(config)
    if not config.tie_word_embeddings and "lm_head.weight" not in files:
        groups[-1].remove("lm_head.weight")
    handles: dict[Path, Any] = {}
    weights: dict[str, torch.Tensor] = {}
    try:
        for done, group in enumerate(groups, start=1):
            for name in group:
                f = files.get(name)
                if f is None:
                    raise NotSupported(f"{folder}: tensor {name!r} is missing from the checkpoint")
                if f not in handles:
                    handles[f] = safe_open(str(f), framework="pt")
                weights[name] = handles[f].get_tensor(name).to(dtype).contiguous()
            if progress is not None:
                progress(done, len(groups))
    finally:
        handles.clear()
    return weights
