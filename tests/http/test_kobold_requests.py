"""Kobold request conventions, prompt trimming and the genkey registry (no server)."""

from __future__ import annotations

from typing import Any

import pytest

from tabby.errors import Conflict, ContextLengthExceeded, InvalidRequest, PermissionDenied
from tabby.http.body import structure_body
from tabby.http.kobold.genkeys import Caller, GenkeyRegistry
from tabby.http.kobold.schemas import GenerateRequest
from tabby.jobs.events import TextChunk
from tabby.serving.permission import Permission
from tabby.serving.planning import fit_prompt
from tabby.serving.presets import apply_preset


def parse(**body: Any) -> GenerateRequest:
    return structure_body(apply_preset(body, None), GenerateRequest)


def test_kobold_names_resolve_to_the_common_settings() -> None:
    request = parse(
        prompt="Hi", max_length=12, min_length=3, rep_pen=1.2, rep_pen_range=0, typical=0.9,
        temperature=1.0, dynatemp_range=0.25, use_default_badwordsids=True, sampler_seed=9,
        stop_sequence=["\n\n"], sampler_order=[6, 0, 1], grammar='root ::= "a"',
    )  # fmt: skip
    resolved = request.resolved(default_max_length=80)
    job = resolved.build_job(job_id="j", prompt_ids=(1, 5, 6), max_seq_len=64)
    s = job.sampler
    assert (job.max_new_tokens, job.min_new_tokens, job.seed) == (12, 3, 9)
    assert job.stop_strings == ("\n\n",)
    assert (s.repetition_penalty, s.penalty_range, s.typical) == (1.2, -1, 0.9)
    assert (s.min_temp, s.max_temp, s.ban_eos_token) == (0.75, 1.25, True)
    assert job.constraint is not None
    assert job.constraint.kind == "gbnf"
    assert resolved.ineffective_fields() == ("sampler_order",)


def test_defaults_and_seed_precedence() -> None:
    plain = parse(prompt="Hi").resolved(default_max_length=80)
    assert (plain.max_tokens, plain.penalty_range, plain.seed) == (80, -1, None)
    assert (plain.min_temp, plain.max_temp, plain.ban_eos_token) == (1.0, 1.0, False)
    assert parse(prompt="Hi", sampler_seed=-1).resolved(default_max_length=1).seed is None
    both = parse(prompt="Hi", seed=4, sampler_seed=5).resolved(default_max_length=1)
    assert both.seed == 4
    # A window that is not 0 stays as it is.
    assert parse(prompt="Hi", rep_pen_range=32).resolved(default_max_length=1).penalty_range == 32


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_length": 10, "max_context_length": 10}, "max_tokens"),
        ({"max_context_length": 0}, "max_context_length"),
        ({"dynatemp_range": -1}, "dynatemp_range"),
        ({"sampler_seed": -2}, "sampler_seed"),
        ({"genkey": ""}, "genkey"),
        ({"grammar": "root ::= x", "regex_pattern": "a+"}, "grammar"),
        ({"use_default_badwordsids": "yes"}, "use_default_badwordsids"),
    ],
)
def test_bad_kobold_fields_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(prompt="Hi", **body)
    assert info.value.param == param


def test_fit_prompt_trims_from_the_front_and_keeps_bos() -> None:
    ids = (1, *range(10, 30))  # BOS then 20 tokens
    assert fit_prompt(ids, 64, 8, 1) == ids
    trimmed = fit_prompt(ids, 16, 5, 1)
    # prompt + max_new + 1 must fit: 16 - 1 - 5 = 10 tokens, BOS first.
    assert trimmed == (1, *range(21, 30))
    assert fit_prompt(ids, 16, 5, None) == tuple(range(20, 30))
    assert fit_prompt(ids, 16, 0, 1) == (1, *range(17, 30))  # 0: room for one token
    with pytest.raises(ContextLengthExceeded):
        fit_prompt(ids, 16, 15, 1)


def test_registry_ownership_conflict_and_abort() -> None:
    registry = GenkeyRegistry()
    owner = Caller.from_keys(Permission.API, ["key-a"])
    other = Caller.from_keys(Permission.API, ["key-b"])
    admin = Caller.from_keys(Permission.ADMIN, ["admin"])
    generation = registry.start("g", "job-1", owner)
    with pytest.raises(Conflict):
        registry.start("g", "job-2", other)
    generation.output.add(TextChunk("Hel", (5,)))
    generation.output.add(TextChunk("lo", (6,)))
    assert registry.lookup("g", owner) is generation
    assert generation.text == "Hello"
    with pytest.raises(PermissionDenied):
        registry.lookup("g", other)
    with pytest.raises(PermissionDenied):
        registry.abort("g", other)
    aborted = registry.abort("g", admin)
    assert aborted is generation
    assert aborted.job_id == "job-1"
    assert registry.abort("g", owner) is None  # already aborted
    assert registry.abort("missing", owner) is None
    registry.finish(generation)
    registry.finish(generation)
    assert registry.lookup("g", owner) is None
    # The key is free again once the generation is over.
    again = registry.start("g", "job-3", other)
    registry.finish(generation)  # an old generation does not remove the new one
    assert registry.lookup("g", other) is again
    stats = registry.statistics()
    assert (stats.live, stats.started, stats.aborted) == (1, 2, 1)
