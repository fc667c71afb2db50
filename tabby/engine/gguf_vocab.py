"""Build a ``tokenizers.Tokenizer`` from a GGUF's vocabulary, as llama.cpp tokenizes.

``tokenizer.ggml.model == "gpt2"``: byte-level BPE from tokens + merges, pre-tokenized
by the rules named in ``tokenizer.ggml.pre``. ``"llama"``: SentencePiece-style BPE from
tokens + scores with byte fallback (Llama 2, Mistral).
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from tabby.engine.tokenizer import EngineTokenizer
from tabby.errors import NotSupported

__all__ = ["PRE_TOKENIZERS", "gguf_tokenizer"]

# llama.cpp's regexes for the pre-tokenizer types we support (see llama-vocab.cpp).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe", "llama3", "qwen2")

_CONTROL, _USER_DEFINED, _BYTE = 3, 4, 6


def _byte_level_pre(pre: str, name: str) -> pre_tokenizers.PreTokenizer:
    if pre in ("default", "gpt2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # Every \p{N} on its own first, then the GPT-2 regex.
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    regex = {"llama-bpe": _LLAMA3_REGEX, "llama3": _LLAMA3_REGEX, "qwen2": _QWEN2_REGEX}.get(pre)
    if regex is None:
        raise NotSupported(
            f"{name}: GGUF pre-tokenizer {pre!r} is not supported "
            f"(supported: {', '.join(PRE_TOKENIZERS)})")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _gpt2_tokenizer(m: dict[str, Any], tokens: list[str], name: str) -> Tokenizer:
    merges = [tuple(x.split(" ", 1)) for x in m.get("tokenizer.ggml.merges") or []]
    pre = str(m.get("tokenizer.ggml.pre", "default"))
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=merges,
        # llama.cpp takes a whole pre-token that is in the vocab as is for Llama 3.
        ignore_merges=pre in ("llama-bpe", "llama3"),
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _byte_level_pre(pre, name)
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    # llama.cpp merges the adjacent pair whose union has the best score; as BPE merges
    # that is every split of a vocab piece into two vocab pieces, ranked by the score.
    ids = {t: i for i, t in enumerate(tokens) if types[i] not in (_CONTROL, _BYTE)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, pid in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[pid], pid, ids[left], left, right))
    ranked.sort()
    return [(a, b) for *_, a, b in ranked]


def _spm_tokenizer(m: dict[str, Any], tokens: list[str], types: list[int]) -> Tokenizer:
    scores = [float(s) for s in m.get("tokenizer.ggml.scores") or [0.0] * len(tokens)]
    unk_id = m.get("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=_spm_merges(tokens, scores, types),
        unk_token=None if unk_id is None else tokens[int(unk_id)],
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(bpe)
    prefix = bool(m.get("tokenizer.ggml.add_space_prefix", True))
    steps: list[normalizers.Normalizer] = [normalizers.Prepend("▁")] if prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    dec: list[decoders.Decoder] = [decoders.Replace("▁", " "), decoders.ByteFallback(),
                                   decoders.Fuse()]
    if prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def gguf_tokenizer(m: dict[str, Any], name: str = "model.gguf") -> EngineTokenizer:
    """An ``EngineTokenizer`` from GGUF metadata (``name`` only labels errors)."""
    model = m.get("tokenizer.ggml.model")
    tokens: list[str] = list(m.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise NotSupported(f"{name}: the GGUF has no tokenizer vocabulary")
    types = [int(t) for t in m.get("tokenizer.ggml.token_type") or [1] * len(tokens)]
    if model == "gpt2":
        tok = _gpt2_tokenizer(m, tokens, name)
    elif model == "llama":
        tok = _spm_tokenizer(m, tokens, types)
    else:
        raise NotSupported(f"{name}: GGUF tokenizer model {model!r} is not supported "
                           "(supported: gpt2, llama)")
    tok.add_tokens([AddedToken(tokens[i], special=ty == _CONTROL, normalized=False)
                    for i, ty in enumerate(types) if ty in (_CONTROL, _USER_DEFINED)])

    def text(key: str) -> str | None:
        i = m.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    spm_prefix = model == "llama" and bool(m.get("tokenizer.ggml.add_space_prefix", True))
    return EngineTokenizer(
        tok, bos_token=text("bos_token_id"), eos_token=text("eos_token_id"),
        pad_token=text("padding_token_id"), unk_token=text("unknown_token_id"),
        decode_style="byte_level" if model == "gpt2" else "sentencepiece",
        strip_leading=1 if spm_prefix else 0,
    )
