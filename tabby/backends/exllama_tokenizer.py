"""Our ``Tokenizer`` over an exllama library tokenizer, and the model folder's token facts."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from tabby.backends.exllama_common import rows_of

__all__ = ["LibraryTokenizer", "TokenizerFacts", "read_tokenizer_facts"]


class LibraryTokenizer:
    """Our ``Tokenizer`` over an exllama tokenizer (the two share these methods).

    ``encode(text, add_bos=, encode_special_tokens=)`` returns a ``(1, n)`` tensor;
    ``decode(ids_2d, decode_special_tokens=)`` returns a string or a one-element list;
    ``get_id_to_piece_list(True)`` gives every token's text.
    """

    def __init__(self, library_tokenizer: Any, *, vocab_size: int | None = None) -> None:
        self.library = library_tokenizer
        self._pieces: list[str] = list(library_tokenizer.get_id_to_piece_list(True))
        self._vocab_size = vocab_size if vocab_size is not None else len(self._pieces)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str, *, add_bos: bool = False, encode_special: bool = True) -> list[int]:
        ids = self.library.encode(text, add_bos=add_bos, encode_special_tokens=encode_special)
        return [int(t) for t in rows_of(ids)]

    def decode(self, ids: Sequence[int], *, decode_special: bool = True) -> str:
        if not ids:
            return ""
        import torch

        out = self.library.decode(
            torch.tensor([list(ids)], dtype=torch.long), decode_special_tokens=decode_special
        )
        return str(out[0] if isinstance(out, list) else out)

    def piece(self, token_id: int) -> str:
        if 0 <= token_id < len(self._pieces):
            return self._pieces[token_id]
        return ""


# -- model folder facts the libraries do not expose uniformly -----------------------------


@attrs.frozen
class TokenizerFacts:
    """Special-token texts, BOS policy and chat template from ``tokenizer_config.json``."""

    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos_token: bool = True
    chat_template: str | None = None


def _token_text(value: object) -> str | None:
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer_facts(model_dir: Path) -> TokenizerFacts:
    """What ``tokenizer_config.json`` says (defaults when it is missing or unreadable)."""
    path = model_dir / "tokenizer_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return TokenizerFacts()
    if not isinstance(data, Mapping):
        return TokenizerFacts()
    template = data.get("chat_template")
    if isinstance(template, list):
        # Several named templates: the one called "default" is the chat template.
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return TokenizerFacts(
        bos_token=_token_text(data.get("bos_token")),
        eos_token=_token_text(data.get("eos_token")),
        pad_token=_token_text(data.get("pad_token")),
        unk_token=_token_text(data.get("unk_token")),
        add_bos_token=bool(data.get("add_bos_token", True)),
        chat_template=template if isinstance(template, str) else None,
    )
