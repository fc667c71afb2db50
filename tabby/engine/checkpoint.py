"""What loading a checkpoint yields, whatever its format (HF folder or GGUF file)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import torch

from tabby.engine.config import ModelConfig
from tabby.engine.tokenizer import EngineTokenizer

__all__ = ["Checkpoint", "GenerationDefaults", "LoadProgressFn", "merge_eos_ids"]

# Called after each group of tensors (embedding, each layer, final norm/head): done of total.
LoadProgressFn = Callable[[int, int], None]


@attrs.frozen
class GenerationDefaults:
    """What the checkpoint says about generation, merged from all of its files."""

    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    add_bos_token: bool = False
    chat_template: str | None = None
    # Every named template the folder has ("default" included when there is one).
    chat_templates: dict[str, str] = attrs.field(factory=dict)
    # Which file the template came from, e.g. "tokenizer_config.json" or "gguf".
    chat_template_source: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    # Raw sampling defaults from generation_config.json (temperature, top_p, ...).
    sampling: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor] = attrs.field(repr=False)
    tokenizer: EngineTokenizer = attrs.field(repr=False)
    generation: GenerationDefaults
    path: Path
    format: str  # "hf" or "gguf"
    # Names of the weights the file stores with 4 bits per value (GGUF Q4_1):
    # these can be held as int4 without losing anything.
    four_bit: frozenset[str] = frozenset()


def merge_eos_ids(*sources: Iterable[int | None] | int | None) -> tuple[int, ...]:
    """Union of EOS ids in first-seen order; each source is an id, a list of ids or None."""
    out: list[int] = []
    for src in sources:
        items = [src] if src is None or isinstance(src, int) else list(src)
        for i in items:
            if i is not None and int(i) not in out:
                out.append(int(i))
    return tuple(out)
