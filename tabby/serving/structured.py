"""Structured output for the generation endpoints: a request's constraint onto its jobs.

Every generation endpoint (OpenAI chat and completions, Kobold) goes through here::

    spec = constraint_for(request, state)          # None, or a checked ConstraintSpec
    job = constrain_job(job, spec, state)          # job.constraint (+ job.masker)

:func:`constraint_for` reads the sampler fields ``json_schema``, ``regex_pattern``,
``grammar_string`` and the request's :class:`~tabby.serving.requests.OutputFormat`
(named ``response_format`` in errors); an empty schema ``{}`` is no constraint, and
anything invalid is a 400 naming the field (a constraint is never dropped silently). :func:`constrain_job` sets ``job.constraint`` (the exllama backends
compile it themselves) and, where the serving state has a :class:`ConstraintCompiler`
(the reference engine), a fresh per-job masker; other jobs of a batch are untouched.

The compiler is made once per loaded model by :func:`compiler_for` (the model manager
calls it at load); its llguidance tokenizer is built on first use (~0.5 s), so callers
plan constrained jobs in a worker thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from tabby.backends.base import ModelInfo
from tabby.backends.constraints import ConstraintCompiler, constraint_from_request, validate
from tabby.jobs import ConstraintSpec, GenerationJob, Tokenizer
from tabby.serving.requests import GenerationRequest, OutputFormat
from tabby.serving.state import ServingState

__all__ = ["compiler_for", "constrain_job", "constraint_for", "reasoning_end_for"]


def compiler_for(tokenizer: Tokenizer | None, info: ModelInfo | None) -> ConstraintCompiler | None:
    """The per-model compiler, for backends whose sampler takes a token masker.

    Only tokenizers that expose the Hugging Face tokenizer and token bytes (the
    reference engine's) can feed llguidance here; other backends get ``constraint``.
    """
    if tokenizer is None or info is None or info.backend != "reference":
        return None
    if not (hasattr(tokenizer, "backend_tokenizer") and hasattr(tokenizer, "token_bytes")):
        return None
    return ConstraintCompiler(tokenizer, eos_ids=info.eos_token_ids, vocab_size=info.vocab_size)  # type: ignore[arg-type]


def _response_format(fmt: OutputFormat | None) -> Mapping[str, Any] | None:
    if fmt is None:
        return None
    out: dict[str, Any] = {"type": fmt.type}
    wrapper = fmt.schema
    if wrapper is not None:
        # Lenient like upstream: a bare schema without the {"name", "schema"} wrapper.
        out["json_schema"] = wrapper if "schema" in wrapper else {"schema": wrapper}
    return out


def constraint_for(
    request: GenerationRequest, state: ServingState | None = None
) -> ConstraintSpec | None:
    """The request's one constraint, validated (against the model's vocabulary when the
    state has a compiler); ``ConstraintError`` (400) names the field."""
    sampling = request.sampling
    spec = constraint_from_request(
        sampling.json_schema,
        sampling.regex_pattern,
        sampling.grammar_string,
        _response_format(request.output_format),
    )
    if spec is not None:
        validate(spec, state.constraints if state is not None else None)
    return spec


def reasoning_end_for(spec: ConstraintSpec, start: str, end: str) -> str | None:
    """Where the masker arms when reasoning is on: after ``end``, unless the constraint
    spells out the reasoning tags itself (then it covers the whole reply)."""
    if start in spec.source or end in spec.source:
        return None
    return end


def constrain_job(
    job: GenerationJob,
    spec: ConstraintSpec | None,
    state: ServingState,
    *,
    reasoning_end: str | None = None,
) -> GenerationJob:
    """``job`` with ``spec`` (and a fresh masker where the backend takes one)."""
    if spec is None:
        return attrs.evolve(job, constraint=None, masker=None)
    compiler = state.constraints
    masker = None if compiler is None else compiler.masker(spec, reasoning_end=reasoning_end)
    return attrs.evolve(job, constraint=spec, masker=masker)
