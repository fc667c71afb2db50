"""Constraint field semantics, validation and the llguidance masker on SmolLM2's real tokenizer."""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Iterator

import jsonschema
import numpy as np
import numpy.typing as npt
import pytest
import torch

from tabby.backends.constraints import (
    ANY_JSON_OBJECT,
    ConstraintCompiler,
    LLGuidanceMasker,
    constraint_from_request,
    validate,
)
from tabby.engine.tokenizer import EngineTokenizer
from tabby.errors import ConstraintError
from tabby.jobs import ConstraintSpec, TokenMasker

SEEDS = range(12)
MAX_STEPS = 400


def walk(
    masker: LLGuidanceMasker, closing: npt.NDArray[np.bool_], seed: int, eos: int
) -> tuple[list[int], bool]:
    """Sample random allowed tokens until the constraint ends; (tokens, ended properly)."""
    rng = random.Random(seed)
    out: list[int] = []
    for _ in range(MAX_STEPS):
        allowed = masker.allowed()
        assert isinstance(allowed, torch.Tensor)
        mask = allowed.numpy()[: closing.size].copy()  # numpy: cheap on a busy machine
        if mask[eos] and rng.random() < 0.5:
            return out, True
        mask[eos] = False
        # Lean towards tokens that close strings and containers, or random walks never end.
        lean = mask & closing
        ids = np.flatnonzero(lean if lean.any() and rng.random() < 0.3 else mask)
        assert ids.size, "the constraint allowed nothing but EOS, and EOS was not taken"
        token = int(ids[rng.randrange(ids.size)])
        masker.consume(token)
        out.append(token)
        if masker.is_finished():
            assert masker.error is None
            return out, True
    return out, False


@pytest.fixture(scope="module")
def closing(tokenizer: EngineTokenizer) -> npt.NDArray[np.bool_]:
    """Tokens holding a character that closes something."""
    return np.array([any(c in b for c in b'"]})') for b in tokenizer.vocab_bytes()], dtype=bool)


# -- field semantics ---------------------------------------------------------------------------


@pytest.mark.parametrize("empty", [None, {}, "", "{}", "  "])
def test_empty_schema_is_no_constraint(empty: object) -> None:
    assert constraint_from_request(json_schema=empty) is None  # type: ignore[arg-type]


def test_nothing_asked_is_none() -> None:
    assert constraint_from_request() is None
    assert constraint_from_request(None, "", "", {"type": "text"}) is None


def test_schema_and_wrapper() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    spec = constraint_from_request(json_schema=schema)
    assert spec == ConstraintSpec("json_schema", json.dumps(schema), param="json_schema")
    wrapped = constraint_from_request(json_schema={"name": "x", "schema": schema, "strict": True})
    assert wrapped is not None
    assert json.loads(wrapped.source) == schema
    as_text = constraint_from_request(json_schema=json.dumps(schema))
    assert as_text is not None
    assert json.loads(as_text.source) == schema
    # A schema that merely has a property called "schema" is not a wrapper.
    odd = {"type": "object", "schema": {"type": "string"}}
    spec = constraint_from_request(json_schema=odd)
    assert spec is not None
    assert json.loads(spec.source) == odd


@pytest.mark.parametrize("kind", ["json_object", "json"])
def test_response_format_json_object(kind: str) -> None:
    spec = constraint_from_request(response_format={"type": kind})
    assert spec == ConstraintSpec("json_schema", ANY_JSON_OBJECT, param="response_format")


def test_response_format_json_schema() -> None:
    schema = {"type": "array", "items": {"type": "integer"}}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}}
    spec = constraint_from_request(response_format=fmt)
    assert spec is not None
    assert spec.kind == "json_schema"
    assert spec.param == "response_format"
    assert json.loads(spec.source) == schema


@pytest.mark.parametrize(
    ("fmt", "param"),
    [
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "n"}}, "response_format.json_schema"),
    ],
)
def test_response_format_errors(fmt: dict[str, object], param: str) -> None:
    with pytest.raises(ConstraintError) as info:
        constraint_from_request(response_format=fmt)
    assert info.value.param == param
    assert info.value.status == 400


def test_grammar_kind_detection() -> None:
    gbnf = constraint_from_request(grammar_string='root ::= "a"')
    lark = constraint_from_request(grammar_string='start: "a"')
    assert gbnf is not None
    assert gbnf.kind == "gbnf"
    assert lark is not None
    assert lark.kind == "lark"
    regex = constraint_from_request(regex_pattern="a+")
    assert regex == ConstraintSpec("regex", "a+", param="regex_pattern")


def test_more_than_one_constraint_is_400() -> None:
    with pytest.raises(ConstraintError) as info:
        constraint_from_request({"type": "object"}, "a+")
    assert info.value.param == "regex_pattern"
    with pytest.raises(ConstraintError) as info:
        constraint_from_request(grammar_string='start: "a"', response_format={"type": "json"})
    assert info.value.param == "response_format"


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "problem"),
    [
        ({"json_schema": {"type": "nosuch"}}, "json_schema", "nosuch"),
        ({"json_schema": {"type": "object", "properties": 3}}, "json_schema", "properties"),
        ({"json_schema": "{not json"}, "json_schema", "not valid JSON"),
        ({"regex_pattern": "(?=a)b"}, "regex_pattern", "look-around"),
        ({"regex_pattern": "a(b"}, "regex_pattern", "regex"),
        ({"grammar_string": "start: foo"}, "grammar_string", "foo"),
        ({"grammar_string": 'root ::= "a" | bar'}, "grammar_string", "bar"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 1}}}},
            "response_format",
            "1",
        ),
    ],
)
@pytest.mark.parametrize("with_vocab", [False, True])
def test_invalid_constraint_names_field(
    compiler: ConstraintCompiler,
    fields: dict[str, object],
    param: str,
    problem: str,
    with_vocab: bool,
) -> None:
    spec: ConstraintSpec | None = None

    def check() -> None:
        nonlocal spec
        spec = constraint_from_request(**fields)  # type: ignore[arg-type]
        assert spec is not None
        validate(spec, compiler if with_vocab else None)

    with pytest.raises(ConstraintError) as info:
        check()
    assert info.value.param == param
    assert info.value.message.startswith(param)
    assert problem in info.value.message
    if spec is not None:  # the spec itself was well formed: no masker for it either
        with pytest.raises(ConstraintError):
            compiler.masker(spec)


def test_masker_is_a_token_masker(compiler: ConstraintCompiler) -> None:
    masker = compiler.masker(ConstraintSpec("regex", "a"))
    assert isinstance(masker, TokenMasker)


# -- the masker driven token by token ------------------------------------------------------------

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {
            "anyOf": [
                {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]},
                {"type": "string", "pattern": "^[a-z]{1,5}$"},
                {"type": "null"},
            ]
        },
        "minItems": 1,
        "maxItems": 4,
    },
]


def _run(
    compiler: ConstraintCompiler,
    tok: EngineTokenizer,
    closing: npt.NDArray[np.bool_],
    spec: ConstraintSpec,
) -> Iterator[str]:
    assert tok.eos_token_id is not None
    for seed in SEEDS:
        ids, ended = walk(compiler.masker(spec), closing, seed, tok.eos_token_id)
        text = tok.decode(ids)
        assert ended, f"seed {seed}: no end after {MAX_STEPS} tokens: {text!r}"
        yield text


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "array-anyof"])
def test_json_schema_output_validates(
    compiler: ConstraintCompiler,
    tokenizer: EngineTokenizer,
    closing: npt.NDArray[np.bool_],
    schema: dict[str, object],
) -> None:
    spec = constraint_from_request(json_schema=schema)
    assert spec is not None
    for text in _run(compiler, tokenizer, closing, spec):
        jsonschema.validate(json.loads(text), schema)


def test_json_object_output_is_an_object(
    compiler: ConstraintCompiler, tokenizer: EngineTokenizer, closing: npt.NDArray[np.bool_]
) -> None:
    spec = constraint_from_request(response_format={"type": "json_object"})
    assert spec is not None
    for text in _run(compiler, tokenizer, closing, spec):
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    "pattern", [r"[a-z]{2,8}@[a-z]{2,5}\.(com|org)", r"(yes|no|maybe)", r"\d{3}-\d{4}"]
)
def test_regex_output_matches(
    compiler: ConstraintCompiler,
    tokenizer: EngineTokenizer,
    closing: npt.NDArray[np.bool_],
    pattern: str,
) -> None:
    spec = constraint_from_request(regex_pattern=pattern)
    assert spec is not None
    for text in _run(compiler, tokenizer, closing, spec):
        assert re.fullmatch(pattern, text), text


def _balanced(text: str) -> bool:
    depth = 0
    for c in text:
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth < 0:
            return False
    return depth == 0


LARK_EXPR = """
start: expr
expr: term (OP term)*
term: NUMBER | "(" expr ")"
OP: "+" | "-" | "*"
NUMBER: /[0-9]{1,3}/
"""
GBNF_EXPR = """
root ::= expr
expr ::= term (op term)*
term ::= num | "(" expr ")"
op ::= "+" | "-" | "*"
num ::= [0-9] [0-9]? [0-9]?
"""


@pytest.mark.parametrize("grammar", [LARK_EXPR, GBNF_EXPR], ids=["lark", "gbnf"])
def test_grammar_output_parses(
    compiler: ConstraintCompiler,
    tokenizer: EngineTokenizer,
    closing: npt.NDArray[np.bool_],
    grammar: str,
) -> None:
    spec = constraint_from_request(grammar_string=grammar)
    assert spec is not None
    assert spec.kind == ("gbnf" if "::=" in grammar else "lark")
    for text in _run(compiler, tokenizer, closing, spec):
        flat = re.sub(r"[()]", "", text)
        assert re.fullmatch(r"[0-9]{1,3}([-+*][0-9]{1,3})*", flat), text
        assert _balanced(text), text
        assert "()" not in text, text


def _allowed_ids(masker: LLGuidanceMasker) -> set[int]:
    mask = masker.allowed()
    assert isinstance(mask, torch.Tensor)
    return {int(i) for i in np.flatnonzero(mask.numpy())}


def test_eos_only_when_accepting(compiler: ConstraintCompiler, tokenizer: EngineTokenizer) -> None:
    eos = tokenizer.eos_token_id
    masker = compiler.masker(ConstraintSpec("regex", "ab?"))
    assert eos not in _allowed_ids(masker)
    masker.consume(tokenizer.encode("a")[0])
    allowed = _allowed_ids(masker)
    assert eos in allowed
    assert tokenizer.encode("b")[0] in allowed
    assert not masker.is_finished()
    masker.consume(tokenizer.encode("b")[0])
    assert masker.is_finished()
    assert _allowed_ids(masker) == {eos}


def test_mask_covers_wider_logits(tokenizer: EngineTokenizer) -> None:
    assert tokenizer.eos_token_id is not None
    wide = ConstraintCompiler(
        tokenizer, eos_ids=(tokenizer.eos_token_id,), vocab_size=tokenizer.vocab_size + 100
    )
    mask = wide.masker(ConstraintSpec("regex", "a")).allowed()
    assert isinstance(mask, torch.Tensor)
    assert mask.dtype == torch.bool
    assert mask.numel() >= tokenizer.vocab_size + 100
    assert not mask[tokenizer.vocab_size :].any()


def test_rollback(compiler: ConstraintCompiler, tokenizer: EngineTokenizer) -> None:
    masker = compiler.masker(ConstraintSpec("regex", "abc|abd"))
    a, b, c = (tokenizer.encode(x)[0] for x in "abc")
    start = _allowed_ids(masker)
    masker.consume(a)
    after_a = _allowed_ids(masker)
    masker.consume(b)
    masker.rollback(2)
    assert _allowed_ids(masker) == start
    masker.consume(a)
    assert _allowed_ids(masker) == after_a
    masker.consume(b)
    masker.consume(c)
    assert masker.is_finished()


# -- reasoning: the constraint is armed after the end tag ------------------------------------------


def _chars(tokenizer: EngineTokenizer, text: str) -> list[int]:
    """Token ids one character each, so that tags arrive split over several tokens."""
    return [tokenizer.encode(c)[0] for c in text]


@pytest.mark.parametrize("split", [False, True])
def test_reasoning_arms_after_tag(
    compiler: ConstraintCompiler, tokenizer: EngineTokenizer, split: bool
) -> None:
    eos = tokenizer.eos_token_id
    masker = compiler.masker(ConstraintSpec("regex", "(yes|no)"), reasoning_end="</think>")
    thinking = 'Let me think, maybe {"a": 1} </think>'
    ids = _chars(tokenizer, thinking) if split else tokenizer.encode(thinking)
    for t in ids:
        mask = masker.allowed()
        assert isinstance(mask, torch.Tensor)
        assert int(mask.numpy().sum()) == mask.numel() - 1
        assert not mask[eos]
        assert not masker.armed
        masker.consume(t)
        assert not masker.is_finished()
    assert masker.armed
    allowed = _allowed_ids(masker)
    assert tokenizer.encode("yes")[0] in allowed
    assert eos not in allowed
    assert tokenizer.encode("\n")[0] not in allowed
    masker.rollback(1)
    assert not masker.armed
    masker.consume(ids[-1])
    for t in tokenizer.encode("yes"):
        masker.consume(t)
    assert masker.is_finished()
    assert masker.error is None


def test_reasoning_tag_token_carries_answer(
    compiler: ConstraintCompiler, tokenizer: EngineTokenizer
) -> None:
    masker = compiler.masker(ConstraintSpec("regex", "yes|no"), reasoning_end="k>")
    # "k> n" closes the reasoning and starts the answer in one token run.
    for t in _chars(tokenizer, "thin") + tokenizer.encode("k>n"):
        masker.consume(t)
    assert masker.armed
    assert masker.error is None
    masker.consume(tokenizer.encode("o")[0])
    assert masker.is_finished()
    assert masker.error is None


# -- cost ----------------------------------------------------------------------------------------


def test_mask_cost_per_token(compiler: ConstraintCompiler, tokenizer: EngineTokenizer) -> None:
    spec = constraint_from_request(json_schema=SCHEMAS[0])
    assert spec is not None
    assert tokenizer.eos_token_id is not None
    masker = compiler.masker(spec)
    rng = random.Random(0)
    spent, steps = 0.0, 0
    while not masker.is_finished() and steps < 200:
        t0 = time.perf_counter()
        mask = masker.allowed()
        spent += time.perf_counter() - t0
        steps += 1
        assert isinstance(mask, torch.Tensor)
        row = mask.numpy().copy()
        row[tokenizer.eos_token_id] = False
        ids = np.flatnonzero(row)
        if not ids.size:
            break
        masker.consume(int(ids[rng.randrange(ids.size)]))
    # Generous bound: measured ~0.1-0.2 ms per token on 2 cores (49k vocabulary).
    assert spent / steps < 0.005
