"""Structured-output constraints: request fields → ``ConstraintSpec`` → llguidance token masks.

The chat/completions endpoints turn the request's constraint fields into one spec and
check it before a job is submitted::

    spec = constraint_from_request(params.json_schema, params.regex_pattern,
                                   params.grammar_string, body.response_format)
    if spec is not None:
        validate(spec, compiler)          # ConstraintError (400) naming the field, or nothing

* ``json_schema``: ``{}`` (sent by some frontends by default) or null means no
  constraint; an OpenAI-style wrapper ``{"name", "schema", "strict"}`` is unwrapped; a
  JSON string holding a schema is accepted.
* ``regex_pattern``: Rust regex syntax (no look-around, no back-references).
* ``grammar_string``: GBNF when it contains ``::=``, otherwise Lark (llguidance dialect).
* ``response_format``: ``{"type": "text"}`` → none; ``{"type": "json_object"}`` and
  upstream's ``{"type": "json"}`` → any JSON object; ``{"type": "json_schema",
  "json_schema": {"name", "schema", "strict"}}`` → that schema.
* Two or more of them → ``ConstraintError`` naming the second.

The reference engine gets one :class:`ConstraintCompiler` per loaded model (made at load;
the llguidance tokenizer is built on first use, ~0.5 s for a 49k vocabulary, then
reused) and one masker per job::

    compiler = ConstraintCompiler(engine_tokenizer, eos_ids=info.eos_token_ids,
                                  vocab_size=info.vocab_size)
    masker = compiler.masker(spec)                          # the answer is constrained
    masker = compiler.masker(spec, reasoning_end="</think>")  # only after the tag
    job = GenerationJob(..., constraint=spec, masker=masker)

A backend whose tokenizer is not a Hugging Face one makes its compiler from the model's
``tokenizer.json`` text: ``ConstraintCompiler.from_tokenizer_json(text, eos_ids=...,
vocab_size=...)``.

:class:`LLGuidanceMasker` implements ``tabby.backends.base.TokenMasker``; ``allowed()``
returns a bool tensor over the logits (True = may be sampled), which the engine's
sampler applies with one ``masked_fill_``. EOS is allowed only while the constraint is
satisfied; ``is_finished()`` turns true once nothing but EOS may follow (or the matcher
failed: ``error`` then says why). ``rollback(n)`` undoes the last ``n`` consumed tokens
(for the engine's banned-string rewind).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import jsonschema
import llguidance
import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer

from tabby.engine.tokenizer import EngineTokenizer
from tabby.errors import ConstraintError
from tabby.jobs import ConstraintSpec

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

__all__ = [
    "ANY_JSON_OBJECT",
    "ConstraintCompiler",
    "LLGuidanceMasker",
    "TokenSource",
    "constraint_from_request",
    "llguidance_grammar",
    "request_field",
    "validate",
]

ANY_JSON_OBJECT = '{"type": "object"}'
_WRAPPER_KEYS = frozenset({"name", "schema", "strict", "description"})
# JSON is written the way json.dumps writes it: free whitespace lets small models loop
# on blanks until max_tokens. A schema may still override this with "x-guidance".
_JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
_GRAMMAR_FORMAT: dict[str, llguidance.GrammarFormat] = {
    "json_schema": "json_schema",
    "regex": "regex",
    "lark": "lark",
    "gbnf": "gbnf",
}


class TokenSource(Protocol):
    """What the compiler needs from a tokenizer (``EngineTokenizer`` has it)."""

    @property
    def backend_tokenizer(self) -> HFTokenizer: ...

    def token_bytes(self, token_id: int) -> bytes: ...


# -- request fields → spec ------------------------------------------------------------------


def constraint_from_request(
    json_schema: Mapping[str, Any] | str | None = None,
    regex_pattern: str | None = None,
    grammar_string: str | None = None,
    response_format: Mapping[str, Any] | None = None,
) -> ConstraintSpec | None:
    """The one constraint a request asks for, or None; shape errors are ``ConstraintError``."""
    found: list[tuple[str, ConstraintSpec]] = []
    schema = _schema_field(json_schema, "json_schema")
    if schema is not None:
        found.append(("json_schema", ConstraintSpec("json_schema", schema, param="json_schema")))
    if regex_pattern:
        found.append(
            ("regex_pattern", ConstraintSpec("regex", regex_pattern, param="regex_pattern"))
        )
    if grammar_string:
        spec = ConstraintSpec(
            "gbnf" if "::=" in grammar_string else "lark", grammar_string, param="grammar_string"
        )
        found.append(("grammar_string", spec))
    from_format = _response_format(response_format)
    if from_format is not None:
        found.append(("response_format", from_format))
    if len(found) > 1:
        raise ConstraintError(
            f"{found[1][0]} cannot be combined with {found[0][0]}: use one constraint",
            param=found[1][0],
        )
    return found[0][1] if found else None


def request_field(spec: ConstraintSpec) -> str:
    """The request field a spec came from (for error messages)."""
    if spec.param:
        return spec.param
    return {"json_schema": "json_schema", "regex": "regex_pattern"}.get(spec.kind, "grammar_string")


def _schema_field(value: Mapping[str, Any] | str | None, param: str) -> str | None:
    """A schema given as an object or JSON text → canonical JSON text (None when empty)."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConstraintError(f"{param}: not valid JSON ({exc.msg})", param=param) from exc
    if value is True or value == {}:
        return None
    if not isinstance(value, Mapping):
        raise ConstraintError(f"{param}: a JSON schema must be an object", param=param)
    inner = value.get("schema")
    if isinstance(inner, Mapping) and set(value) <= _WRAPPER_KEYS:
        return _schema_field(dict(inner), param)
    return json.dumps(value)


def _response_format(fmt: Mapping[str, Any] | None) -> ConstraintSpec | None:
    if fmt is None:
        return None
    if not isinstance(fmt, Mapping):
        raise ConstraintError("response_format: must be an object", param="response_format")
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind in ("json_object", "json"):
        return ConstraintSpec("json_schema", ANY_JSON_OBJECT, param="response_format")
    if kind != "json_schema":
        raise ConstraintError(
            f"response_format.type: {kind!r} is not one of 'text', 'json_object', 'json_schema'",
            param="response_format.type",
        )
    wrapper = fmt.get("json_schema")
    if not isinstance(wrapper, Mapping) or "schema" not in wrapper:
        raise ConstraintError(
            "response_format.json_schema: must be an object with a 'schema'",
            param="response_format.json_schema",
        )
    schema = _schema_field(wrapper["schema"], "response_format.json_schema.schema")
    if schema is None:  # an empty schema: any JSON value is too loose; take any object
        schema = ANY_JSON_OBJECT
    return ConstraintSpec("json_schema", schema, param="response_format")


# -- validation ----------------------------------------------------------------------------


def llguidance_grammar(spec: ConstraintSpec) -> str:
    """The llguidance grammar for a spec; text that cannot even be converted is a 400.

    Every backend constrains through this grammar (the exllamav3 filter takes it as
    ``llg_grammar``), so JSON whitespace is bounded alike everywhere (``_JSON_OPTIONS``).
    """
    field = request_field(spec)
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.source)
        except json.JSONDecodeError as exc:
            raise ConstraintError(f"{field}: not valid JSON ({exc.msg})", param=field) from exc
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            where = "/".join(str(p) for p in exc.path)
            at = f" at '{where}'" if where else ""
            raise ConstraintError(
                f"{field}: invalid JSON schema{at}: {exc.message}", param=field
            ) from exc
    try:
        if spec.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(
                spec.source, defaults=_JSON_OPTIONS
            )
        return llguidance.grammar_from(_GRAMMAR_FORMAT[spec.kind], spec.source)
    except ValueError as exc:
        raise ConstraintError(f"{field}: invalid {spec.kind}: {exc}", param=field) from exc


def validate(spec: ConstraintSpec, compiler: ConstraintCompiler | None = None) -> str:
    """Check a spec (against the model's vocabulary when a compiler is given).

    Returns the llguidance grammar; raises ``ConstraintError`` naming the field.
    """
    grammar = llguidance_grammar(spec)
    lltok = compiler.ll_tokenizer() if compiler is not None else None
    problem = llguidance.LLMatcher.validate_grammar(grammar, lltok)
    if problem:
        field = request_field(spec)
        raise ConstraintError(f"{field}: invalid {spec.kind}: {problem.strip()}", param=field)
    return grammar


# -- per-model compiler and per-job masker ---------------------------------------------------


class ConstraintCompiler:
    """Per-model factory of maskers; holds the llguidance tokenizer (thread-safe)."""

    def __init__(
        self, tokenizer: TokenSource, *, eos_ids: Sequence[int], vocab_size: int | None = None
    ) -> None:
        """``vocab_size`` is the width of the logits (may exceed the tokenizer's)."""
        self._tokenizer = tokenizer
        self._eos = tuple(eos_ids)
        self._vocab_size = vocab_size
        self._lltok: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_tokenizer_json(
        cls, tokenizer_json: str, *, eos_ids: Sequence[int], vocab_size: int | None = None
    ) -> ConstraintCompiler:
        """A compiler from a model's ``tokenizer.json`` text alone.

        For backends whose own tokenizer is not a Hugging Face one (the exllama
        libraries'): the text becomes an ``EngineTokenizer``, which supplies both the
        Hugging Face tokenizer and the token bytes. That walks the whole vocabulary, so
        make one per loaded model (the llguidance tokenizer is still built on first use).
        """
        source = EngineTokenizer(HFTokenizer.from_str(tokenizer_json))
        return cls(source, eos_ids=eos_ids, vocab_size=vocab_size)

    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._lltok is None:
                # Walks the whole vocabulary once (~0.5 s for 49k tokens).
                self._lltok = llguidance.LLTokenizer(
                    self._tokenizer.backend_tokenizer.to_str(), eos_token=list(self._eos) or None
                )
            return self._lltok

    def masker(self, spec: ConstraintSpec, *, reasoning_end: str | None = None) -> LLGuidanceMasker:
        """A fresh masker for one job; ``reasoning_end`` arms it only after that text.

        Raises ``ConstraintError`` (400) for an invalid spec, like :func:`validate`.
        """
        lltok = self.ll_tokenizer()
        matcher = llguidance.LLMatcher(lltok, llguidance_grammar(spec))
        if matcher.is_error():  # the matcher never raises: a bad grammar shows here
            field = request_field(spec)
            problem = matcher.get_error().strip()
            raise ConstraintError(f"{field}: invalid {spec.kind}: {problem}", param=field)
        return LLGuidanceMasker(
            matcher,
            lltok,
            width=max(self._vocab_size or 0, lltok.vocab_size),
            eos_ids=self._eos,
            token_bytes=self._tokenizer.token_bytes,
            reasoning_end=reasoning_end.encode() if reasoning_end else None,
        )


class LLGuidanceMasker:
    """One job's constraint as a ``TokenMasker`` (not thread-safe: one job, one thread)."""

    def __init__(
        self,
        matcher: llguidance.LLMatcher,
        lltok: llguidance.LLTokenizer,
        *,
        width: int,
        eos_ids: Sequence[int],
        token_bytes: Callable[[int], bytes],
        reasoning_end: bytes | None = None,
    ) -> None:
        self._matcher = matcher
        self._lltok = lltok
        self._width = width
        self._words = np.full((lltok.vocab_size + 31) // 32, -1, dtype=np.int32)
        self._token_bytes = token_bytes
        self._tag = reasoning_end
        self._tail = b""  # the last bytes of the reasoning, to find a tag split over tokens
        self._history: list[_Step] = []
        self._free = torch.ones(width, dtype=torch.bool)
        eos = torch.tensor([t for t in eos_ids if 0 <= t < width], dtype=torch.int64)
        self._free[eos] = False  # reasoning may not end the answer before it starts

    @property
    def armed(self) -> bool:
        """True once the constraint applies (always, without a reasoning tag)."""
        return self._tag is None

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None

    def allowed(self) -> torch.Tensor | None:
        if self._tag is not None:
            return self._free
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        # bit i & 31 of little-endian word i >> 5 is byte i >> 3, bit i & 7
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")
        if bits.size < self._width:
            bits = np.concatenate([bits, np.zeros(self._width - bits.size, dtype=np.uint8)])
        return torch.from_numpy(bits).view(torch.bool)

    def consume(self, token_id: int) -> None:
        if self._tag is None:
            self._matcher.consume_token(token_id)
            self._history.append(_Step(1))
            return
        tag, tail = self._tag, self._tail
        data = tail + self._token_bytes(token_id)
        at = data.find(tag)
        if at < 0:
            self._tail = data[-(len(tag) - 1) :] if len(tag) > 1 else b""
            self._history.append(_Step(0, tail))
            return
        # The token that closes the reasoning may carry the answer's first bytes too;
        # whitespace there is dropped (the answer starts after it).
        self._tag, self._tail = None, b""
        rest = data[at + len(tag) :].lstrip()
        taken = 0
        if rest:
            tokens = self._lltok.tokenize_bytes(rest)
            taken = len(tokens)
            self._matcher.consume_tokens(tokens)
        self._history.append(_Step(taken, tail, tag))

    def is_finished(self) -> bool:
        return self._tag is None and self._matcher.is_stopped()

    def rollback(self, n: int) -> None:
        """Undo the last ``n`` consumed tokens (the engine's banned-string rewind)."""
        for _ in range(min(n, len(self._history))):
            step = self._history.pop()
            if step.matched:
                self._matcher.rollback(step.matched)
            if step.disarmed is not None:
                self._tag = step.disarmed
            if self._tag is not None:
                self._tail = step.tail


@attrs.frozen
class _Step:
    """What consuming one token did, so that it can be undone."""

    matched: int  # tokens the matcher consumed for it
    tail: bytes = b""  # the reasoning tail before it
    disarmed: bytes | None = None  # the reasoning tag it closed, if any
