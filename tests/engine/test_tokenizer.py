"""The engine tokenizer: SmolLM2 from its GGUF against an independent implementation of
llama.cpp's ``smollm`` rules, special-token handling, pieces and streaming detokenization."""

from __future__ import annotations

import itertools
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import regex

from tabby.engine.gguf_vocab import gguf_tokenizer
from tabby.engine.loading import load_checkpoint
from tabby.engine.tokenizer import EngineTokenizer, StreamDecoder
from tabby.errors import NotSupported
from tabby.testing.tiny import make_tiny_hf, tiny_vocab_and_merges

CORPUS = [
    "Hello world! The year 2024 had 365 days; $3.50 each, 1,234,567.89 in total.",
    "Café naïve résumé — Zürich, São Paulo, Ελληνικά, русский текст.",
    "日本語のテキストと中文字符，한국어도 있습니다。",
    "Emoji: 🙂👍🏽🇫🇷 👨‍👩‍👧‍👦 and ✓ ✗ ★",
    "lots   of    spaces\t\ttabs\n\n\nnewlines \n \r\n trailing   ",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 0x1F\n",
    "I'm sure they're here, we'll see what you've got. DON'T 'quote' it'd",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
    "Arabic-Indic ٠١٢٣ and fractions ½ ⅓ ² x²",
    "a" * 50 + " " + "ab" * 20,
    "",
    " ",
]


# -- an independent implementation of llama.cpp's smollm byte-level BPE ---------------------

_GPT2 = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
_NUMBER = regex.compile(r"\p{N}")


def _byte_chars() -> dict[int, str]:
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


def _split_keep(pattern: regex.Pattern[str], text: str) -> list[str]:
    # llama.cpp keeps both the matches and the text between them as pieces.
    pieces, last = [], 0
    for m in pattern.finditer(text):
        if m.start() > last:
            pieces.append(text[last:m.start()])
        pieces.append(m.group())
        last = m.end()
    if last < len(text):
        pieces.append(text[last:])
    return pieces


class ReferenceSmolLM:
    def __init__(self, tokens: list[str], merges: list[str], specials: list[str]) -> None:
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        self.specials = specials
        self.bytes = _byte_chars()

    def _bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            ranked = [(self.ranks.get((a, b), 1 << 30), i)
                      for i, (a, b) in enumerate(itertools.pairwise(parts))]
            rank, i = min(ranked)
            if rank == 1 << 30:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def encode(self, text: str) -> list[int]:
        alternation = "|".join(regex.escape(s) for s in sorted(self.specials, key=len, reverse=True))
        out: list[int] = []
        for fragment in _split_keep(regex.compile(alternation), text):
            if fragment in self.specials:
                out.append(self.ids[fragment])
                continue
            for piece in _split_keep(_NUMBER, fragment):
                for word in _GPT2.findall(piece):
                    encoded = "".join(self.bytes[b] for b in word.encode())
                    out.extend(self.ids[p] for p in self._bpe(encoded))
        return out


@pytest.fixture(scope="module")
def smollm(
    tokenizer: EngineTokenizer, smollm2_metadata: dict[str, Any]
) -> tuple[EngineTokenizer, ReferenceSmolLM]:
    """SmolLM2's tokenizer (from conftest) and the independent implementation on its vocab."""
    m = smollm2_metadata
    specials = [t for t, ty in zip(m["tokenizer.ggml.tokens"], m["tokenizer.ggml.token_type"],
                                   strict=True) if ty == 3]
    return tokenizer, ReferenceSmolLM(m["tokenizer.ggml.tokens"], m["tokenizer.ggml.merges"],
                                      specials)


@pytest.mark.parametrize("text", CORPUS)
def test_smollm_matches_independent_implementation(
    smollm: tuple[EngineTokenizer, ReferenceSmolLM], text: str
) -> None:
    tok, ref = smollm
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.decode(ids) == text


def test_smollm_special_tokens(smollm: tuple[EngineTokenizer, ReferenceSmolLM]) -> None:
    tok, _ = smollm
    assert tok.encode("<|im_end|>") == [2]
    as_text = tok.encode("<|im_end|>", encode_special=False)
    assert len(as_text) > 1
    assert 2 not in as_text
    assert tok.decode(as_text) == "<|im_end|>"
    assert tok.encode("x", add_bos=True)[0] == tok.bos_token_id == 1
    assert (tok.eos_token, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (
        "<|im_end|>", 2, 0, 2)
    assert {0, 1, 2} <= tok.special_ids
    assert tok.decode([1, 44, 2], decode_special=False) == tok.decode([44])
    assert tok.vocab_size == 49152


def test_pieces(smollm: tuple[EngineTokenizer, ReferenceSmolLM]) -> None:
    tok, _ = smollm
    ids = tok.encode(" hello🙂")
    assert tok.piece(ids[0]) == " hello"
    # the emoji's four bytes come in parts that are not UTF-8 on their own
    assert "".join(tok.piece(i) for i in ids[1:]).startswith("\\x")
    assert b"".join(tok.token_bytes(i) for i in ids) == " hello🙂".encode()
    assert tok.piece(2) == "<|im_end|>"


def _stream(tok: EngineTokenizer, ids: list[int], *, decode_special: bool = True,
            chunk: int = 1) -> list[str]:
    dec = StreamDecoder(tok, decode_special=decode_special)
    deltas = [dec.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return [*deltas, dec.flush()]


@pytest.mark.parametrize("chunk", [1, 3])
def test_stream_deltas_concatenate_to_decode(
    smollm: tuple[EngineTokenizer, ReferenceSmolLM], chunk: int
) -> None:
    tok, _ = smollm
    for text in CORPUS:
        ids = tok.encode(text)
        deltas = _stream(tok, ids, chunk=chunk)
        assert "".join(deltas) == tok.decode(ids)
        assert not any("\ufffd" in d for d in deltas)
        plain = _stream(tok, ids, decode_special=False, chunk=chunk)
        assert "".join(plain) == tok.decode(ids, decode_special=False)


def test_stream_holds_a_split_character(smollm: tuple[EngineTokenizer, ReferenceSmolLM]) -> None:
    tok, _ = smollm
    ids = tok.encode("🙂")
    assert len(ids) > 1  # the emoji is split across byte tokens
    deltas = _stream(tok, ids)
    assert deltas[:-2] == [""] * (len(ids) - 1)
    assert deltas[-2:] == ["🙂", ""]


def test_stream_invalid_utf8_matches_decode(smollm: tuple[EngineTokenizer, Any]) -> None:
    tok, _ = smollm
    ids = tok.encode("🙂 ok")
    broken = ids[1:]  # starts mid-character
    assert "".join(_stream(tok, broken)) == tok.decode(broken)


def test_tiny_hf_tokenizer_round_trip(tmp_path: Path) -> None:
    tok = load_checkpoint(make_tiny_hf(tmp_path / "m")).tokenizer
    assert tok.decode_style == "byte_level"
    for text in CORPUS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert "".join(_stream(tok, ids)) == text


# -- SentencePiece-style GGUF vocabularies (Llama 2, Mistral) --------------------------------


def _spm_metadata() -> dict[str, Any]:
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁he", "ll", "llo", "▁hello", "▁w",
              "or", "▁wor", "ld", "▁world", "lo", "el"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces)]
    # scores: longer pieces first, as SentencePiece ranks them
    scores = [0.0] * 259 + [-100.0 + 10 * len(p) - i * 0.01 for i, p in enumerate(pieces)]
    return {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


def _reference_spm(m: dict[str, Any], text: str) -> list[int]:
    # llama.cpp's SPM: chars as symbols, merge the best-scoring pair (leftmost on ties),
    # then byte fallback for symbols outside the vocabulary.
    ids = {t: i for i, t in enumerate(m["tokenizer.ggml.tokens"])}
    scores = m["tokenizer.ggml.scores"]
    syms = list("▁" + text.replace(" ", "▁"))
    while True:
        best: tuple[float, int] | None = None
        for i in range(len(syms) - 1):
            j = ids.get(syms[i] + syms[i + 1])
            if j is not None and (best is None or scores[j] > best[0]):
                best = (scores[j], i)
        if best is None:
            break
        i = best[1]
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    out: list[int] = []
    for s in syms:
        out.extend([ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()])
    return out


@pytest.mark.parametrize("text", ["hello world", "hello", "held wold", "hé 🙂 world", "  hello"])
def test_spm_gguf_tokenizer(text: str) -> None:
    m = _spm_metadata()
    tok = gguf_tokenizer(m)
    assert tok.decode_style == "sentencepiece"
    ids = tok.encode(text)
    assert ids == _reference_spm(m, text)
    assert tok.decode(ids) == text
    deltas = _stream(tok, ids)
    assert "".join(deltas) == text
    assert tok.encode(text, add_bos=True)[0] == 1
    assert tok.piece(tok.encode("hello")[0]) == " hello"


@cache
def _gpt2_metadata() -> dict[str, Any]:
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"],
            "tokenizer.ggml.merges": [], "tokenizer.ggml.pre": "jais"}


def test_unsupported_pre_tokenizer_and_model_are_named() -> None:
    with pytest.raises(NotSupported, match="jais"):
        gguf_tokenizer(dict(_gpt2_metadata()))
    with pytest.raises(NotSupported, match="rwkv"):
        gguf_tokenizer({**_gpt2_metadata(), "tokenizer.ggml.model": "rwkv"})


@pytest.mark.parametrize(
    ("pre", "words"),
    [("llama-bpe", ["123", "45", "Ġabc", "'s"]), ("qwen2", ["1", "2", "3", "4", "5", "Ġabc", "'s"]),
     ("smollm", ["1", "2", "3", "4", "5", "Ġabc", "'s"]), ("default", ["12345", "Ġabc", "'s"])],
)
def test_byte_level_pre_tokenizer_rules(pre: str, words: list[str]) -> None:
    tokens, merges = tiny_vocab_and_merges()
    tok = gguf_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": list(tokens),
                          "tokenizer.ggml.merges": [f"{a} {b}" for a, b in merges],
                          "tokenizer.ggml.pre": pre})
    pre_tok = tok.backend_tokenizer.pre_tokenizer
    assert pre_tok is not None
    assert [w for w, _ in pre_tok.pre_tokenize_str("12345 abc's")] == words
    assert tok.decode(tok.encode("12345 abc's")) == "12345 abc's"
