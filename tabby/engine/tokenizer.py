"""The reference engine's tokenizer: a ``tokenizers.Tokenizer`` plus token byte tables.

Every token's exact bytes are computed once at construction (byte-level BPE pieces map
back through GPT-2's byte table; SentencePiece pieces turn ``▁`` into a space and
``<0xNN>`` into that byte). Those bytes give O(1) streaming detokenization that never
splits a UTF-8 character, and readable pieces for logprobs.
"""

from __future__ import annotations

import codecs
import json
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from tokenizers import Tokenizer

from tabby.errors import NotSupported

__all__ = ["DecodeStyle", "EngineTokenizer", "StreamDecoder", "bytes_to_unicode"]

# How token strings become bytes: GPT-2 byte-level, SentencePiece (▁ and <0xNN>), or as is.
DecodeStyle = Literal["byte_level", "sentencepiece", "plain"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable characters."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)}
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class EngineTokenizer:
    """Implements ``tabby.backends.base.Tokenizer`` (thread-safe: no state changes after init)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        decode_style: DecodeStyle | None = None,
        strip_leading: int | None = None,
    ) -> None:
        """``decode_style``/``strip_leading`` skip reading them from the tokenizer's JSON."""
        self._tok = tokenizer
        # A twin whose added tokens are matched as plain text (encode_special=False),
        # made on first use: copying a large vocabulary costs ~0.1 s.
        self._tok_plain: Tokenizer | None = None
        self._plain_lock = threading.Lock()
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.bos_token_id = self._id_of(bos_token)
        self.eos_token_id = self._id_of(eos_token)
        self.pad_token_id = self._id_of(pad_token)
        self.unk_token_id = self._id_of(unk_token)
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        if decode_style is None or strip_leading is None:
            spec = json.loads(tokenizer.to_str())
            decode_style = _decode_style(spec)
            strip_leading = _leading_strip(spec.get("decoder"))
        self.decode_style: DecodeStyle = decode_style
        self._strip_leading = strip_leading
        self._vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True),
                               max(added, default=-1) + 1)
        self._bytes = self._token_bytes_table(added)

    @classmethod
    def from_file(cls, path: Path, tokenizer_config: dict[str, Any] | None = None) -> EngineTokenizer:
        """Load ``tokenizer.json``; special token strings come from ``tokenizer_config.json``."""
        cfg = tokenizer_config or {}
        return cls(
            Tokenizer.from_file(str(path)),
            bos_token=_token_text(cfg.get("bos_token")),
            eos_token=_token_text(cfg.get("eos_token")),
            pad_token=_token_text(cfg.get("pad_token")),
            unk_token=_token_text(cfg.get("unk_token")),
        )

    # -- the Tokenizer protocol ----------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return int(self._vocab_size)

    def encode(self, text: str, *, add_bos: bool = False, encode_special: bool = True) -> list[int]:
        tok = self._tok if encode_special else self._plain()
        ids: list[int] = tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def encode_batch(self, texts: Sequence[str], *, encode_special: bool = True) -> list[list[int]]:
        tok = self._tok if encode_special else self._plain()
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, decode_special: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=not decode_special))

    def piece(self, token_id: int) -> str:
        """The token's text; bytes that are not valid UTF-8 on their own appear as ``\\xNN``."""
        return self.token_bytes(token_id).decode("utf-8", errors="backslashreplace")

    # -- extras --------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token contributes to decoded text (b"" when out of range)."""
        if 0 <= token_id < len(self._bytes):
            return self._bytes[token_id]
        return b""

    def vocab_bytes(self) -> list[bytes]:
        """Every token's bytes, by id (for constraint engines and stop-string matching)."""
        return list(self._bytes)

    def token_to_id(self, token: str) -> int | None:
        tid = self._tok.token_to_id(token)
        return None if tid is None else int(tid)

    def id_to_token(self, token_id: int) -> str | None:
        token = self._tok.id_to_token(token_id)
        return None if token is None else str(token)

    def stream_decoder(self, *, decode_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, decode_special=decode_special)

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (do not mutate it)."""
        return self._tok

    def _plain(self) -> Tokenizer:
        with self._plain_lock:
            if self._tok_plain is None:
                plain = Tokenizer.from_str(self._tok.to_str())
                plain.encode_special_tokens = True
                self._tok_plain = plain
            return self._tok_plain

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        tid = self._tok.token_to_id(token)
        return None if tid is None else int(tid)

    def _token_bytes_table(self, added: dict[int, Any]) -> list[bytes]:
        table = [b""] * self._vocab_size
        vocab = self._tok.get_vocab(with_added_tokens=False)
        if self.decode_style == "byte_level":
            rev = {c: b for b, c in bytes_to_unicode().items()}
            for text, i in vocab.items():
                table[i] = _byte_level_bytes(text, rev)
        elif self.decode_style == "sentencepiece":
            for text, i in vocab.items():
                if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                    table[i] = bytes([int(text[3:5], 16)])
                else:
                    table[i] = text.replace("▁", " ").encode()
        else:
            for i in vocab.values():
                table[i] = str(self._tok.decode([i], skip_special_tokens=False)).encode()
        for i, t in added.items():
            table[i] = str(t.content).encode()
        return table


def _byte_level_bytes(text: str, rev: dict[str, int]) -> bytes:
    try:
        return bytes(rev[c] for c in text)
    except KeyError:
        # Characters outside the byte table pass through as their own UTF-8, as the decoder does.
        return b"".join(bytes([rev[c]]) if c in rev else c.encode() for c in text)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return str(value["content"]) if "content" in value else None
    return None if value is None else str(value)


def _decoder_types(decoder: Any) -> list[dict[str, Any]]:
    if not isinstance(decoder, dict):
        return []
    if decoder.get("type") == "Sequence":
        return [d for sub in decoder.get("decoders", []) for d in _decoder_types(sub)]
    return [decoder]


def _decode_style(spec: dict[str, Any]) -> DecodeStyle:
    kinds = {d.get("type") for d in _decoder_types(spec.get("decoder"))}
    if "ByteLevel" in kinds:
        return "byte_level"
    if "Metaspace" in kinds or "ByteFallback" in kinds or (
        spec.get("model", {}).get("byte_fallback") is True):
        return "sentencepiece"
    if spec.get("model", {}).get("type") not in {"BPE", "Unigram", "WordLevel", "WordPiece"}:
        raise NotSupported(f"tokenizer model {spec.get('model', {}).get('type')!r} is not supported")
    return "plain"


def _leading_strip(decoder: Any) -> int:
    """How many leading spaces the decoder removes from the start of the text."""
    for d in _decoder_types(decoder):
        if d.get("type") == "Strip" and d.get("content", " ") == " ":
            return int(d.get("start", 0))
        if d.get("type") == "Metaspace" and (
            d.get("prepend_scheme", "always") != "never" and d.get("add_prefix_space", True)):
            return 1
    return 0


class StreamDecoder:
    """Incremental detokenization for one job.

    ``push`` returns only complete text: a UTF-8 character split across tokens is held
    until its last byte arrives. The deltas of ``push`` and ``flush`` concatenate to
    ``tokenizer.decode(all_ids, decode_special=...)``.
    """

    def __init__(self, tokenizer: EngineTokenizer, *, decode_special: bool = True) -> None:
        self._tok = tokenizer
        self._skip = frozenset() if decode_special else tokenizer.special_ids
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._to_strip = tokenizer._strip_leading

    def push(self, token_ids: Iterable[int]) -> str:
        data = b"".join(self._tok.token_bytes(t) for t in token_ids if t not in self._skip)
        return self._emit(self._utf8.decode(data))

    def flush(self) -> str:
        return self._emit(self._utf8.decode(b"", final=True))

    def _emit(self, text: str) -> str:
        # SentencePiece decoders drop the space that marks the first word: strip up to
        # that many spaces from the start of the whole text, however it arrives.
        while self._to_strip and text:
            if text[0] != " ":
                self._to_strip = 0
                break
            text = text[1:]
            self._to_strip -= 1
        return text
