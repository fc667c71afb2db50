"""Request bodies of the KoboldAI API (``/api/v1/...`` and ``/api/extra/...``).

:class:`GenerateRequest` is every sampler field of :class:`tabby.serving.sampling.SamplerParams`
(so the Kobold names ``max_length``, ``rep_pen``, ``rep_pen_range``, ``typical``,
``min_length``, ``stop_sequence`` and ``dynatemp_low/high/exponent`` work as aliases)
plus the fields only Kobold clients send. :meth:`GenerateRequest.resolved` turns the
Kobold conventions into the common ones:

* ``rep_pen_range: 0`` means the whole context (``penalty_range: -1``);
* ``dynatemp_range > 0`` sets ``min_temp``/``max_temp`` to ``temperature ∓ range``;
* ``use_default_badwordsids: true`` bans the end-of-sequence tokens;
* ``sampler_seed`` is the seed (``-1``: random) unless ``seed`` is given;
* ``grammar`` (GBNF, as KoboldCpp takes it) is the ``grammar_string``.

``sampler_order``, ``rep_pen_slope``, ``quiet`` and ``trim_stop`` are accepted and have
no effect: the sampler order is fixed, stop strings are always trimmed.
:func:`completion_request` maps a resolved request onto the neutral completion request:
one prompt, trimmed from the front to fit ``max_context_length`` (capped to the model's).
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from tabby.config.validation import FieldError, check
from tabby.serving.requests import CompletionRequest
from tabby.serving.sampling import SamplerParams, sampler_params

__all__ = [
    "GENKEY_MAX_LENGTH",
    "AbortResponse",
    "CheckResponse",
    "CheckResult",
    "EmptyResponse",
    "GenerateRequest",
    "GenerateResponse",
    "GenerateResult",
    "GenkeyRequest",
    "KoboldCppVersion",
    "KoboldFinishReason",
    "ResultResponse",
    "SoftPromptList",
    "StreamToken",
    "TextValue",
    "TokenCountRequest",
    "TokenCountResponse",
    "ValueResponse",
    "completion_request",
]

# Long enough for any client's key scheme, short enough to keep the registry small.
GENKEY_MAX_LENGTH = 256


def _doc(text: str, *aliases: str) -> dict[str, Any]:
    return {"doc": text, "aliases": aliases} if aliases else {"doc": text}


_genkey_ok = check(
    lambda k: 0 < len(k) <= GENKEY_MAX_LENGTH, f"a non-empty string of at most {GENKEY_MAX_LENGTH}"
)


def _optional_positive(_inst: Any, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value < 1:
        raise FieldError(attribute.name, f"expected an integer ≥ 1, got {value!r}")


def _non_negative(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value < float("inf"):
        raise FieldError(attribute.name, f"expected a finite number ≥ 0, got {value!r}")


def _seed_ok(_inst: Any, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and not -1 <= value < 2**64:
        raise FieldError(attribute.name, f"expected -1 (random) or a seed ≥ 0, got {value!r}")


@attrs.frozen(kw_only=True)
class GenerateRequest(SamplerParams):
    """``POST /api/v1/generate`` and ``POST /api/extra/generate/stream``."""

    prompt: str = attrs.field(metadata=_doc("The text to continue."))
    genkey: str | None = attrs.field(
        default=None,
        validator=_genkey_ok,
        metadata=_doc("Key for /api/extra/generate/check and /abort; defaults to the request id."),
    )
    max_context_length: int | None = attrs.field(
        default=None,
        validator=_optional_positive,
        metadata=_doc(
            "Context size the client assumes (capped to the model's); the prompt is "
            "trimmed from the front so that it and max_length fit."
        ),
    )
    use_default_badwordsids: bool = attrs.field(
        default=False, metadata=_doc("Ban the end-of-sequence tokens (as ban_eos_token).")
    )
    dynatemp_range: float = attrs.field(
        default=0.0,
        validator=_non_negative,
        metadata=_doc("Above 0: dynamic temperature within temperature ± this range."),
    )
    sampler_order: tuple[int, ...] | None = attrs.field(
        default=None, metadata=_doc("Accepted; no effect (the sampler order is fixed).")
    )
    sampler_seed: int | None = attrs.field(
        default=None,
        validator=_seed_ok,
        metadata=_doc("Seed for reproducible sampling; -1 is random. seed wins when both are set."),
    )
    grammar: str | None = attrs.field(
        default=None, metadata=_doc("A GBNF grammar (as grammar_string).")
    )
    rep_pen_slope: float | None = attrs.field(default=None, metadata=_doc("Accepted; no effect."))
    quiet: bool | None = attrs.field(default=None, metadata=_doc("Accepted; no effect."))
    trim_stop: bool | None = attrs.field(
        default=None, metadata=_doc("Accepted; stop sequences are always trimmed.")
    )

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.grammar and (self.json_schema or self.regex_pattern or self.grammar_string):
            raise FieldError("grammar", "cannot be combined with another constraint")
        limit = self.max_context_length
        if limit is not None and self.max_tokens and self.max_tokens >= limit:
            raise FieldError(
                "max_tokens",
                f"max_length ({self.max_tokens}) must be smaller than max_context_length ({limit})",
            )

    def resolved(self, *, default_max_length: int) -> GenerateRequest:
        """This request with the Kobold conventions (module docstring) applied.

        ``default_max_length`` replaces an omitted ``max_length``.
        """
        changes: dict[str, Any] = {}
        if self.max_tokens is None:
            changes["max_tokens"] = default_max_length
        if self.penalty_range == 0:
            changes["penalty_range"] = -1
        if self.dynatemp_range > 0:
            changes["min_temp"] = max(0.0, self.temperature - self.dynatemp_range)
            changes["max_temp"] = self.temperature + self.dynatemp_range
        if self.use_default_badwordsids:
            changes["ban_eos_token"] = True
        if self.seed is None and self.sampler_seed is not None and self.sampler_seed >= 0:
            changes["seed"] = self.sampler_seed
        if self.grammar:
            changes["grammar_string"] = self.grammar
            changes["grammar"] = None
        changes["dynatemp_range"] = 0.0
        changes["use_default_badwordsids"] = False
        return attrs.evolve(self, **changes)

    def ineffective_fields(self) -> tuple[str, ...]:
        names = super().ineffective_fields()
        kobold = ("sampler_order", "rep_pen_slope")
        return names + tuple(n for n in kobold if getattr(self, n) is not None)


def completion_request(resolved: GenerateRequest) -> CompletionRequest:
    """A request after :meth:`GenerateRequest.resolved`, as the serving core takes it."""
    return CompletionRequest(
        prompts=(resolved.prompt,),
        trim_prompt=True,
        context_limit=resolved.max_context_length,
        sampling=sampler_params(resolved),
        ignored_fields=resolved.ineffective_fields(),
    )


@attrs.frozen(kw_only=True)
class GenkeyRequest:
    """``POST /api/extra/abort`` and ``/api/extra/generate/check``."""

    genkey: str = attrs.field(validator=_genkey_ok, metadata=_doc("The generation's key."))


@attrs.frozen(kw_only=True)
class TokenCountRequest:
    """``POST /api/extra/tokencount``."""

    prompt: str = attrs.field(metadata=_doc("The text to tokenize (no BOS is added)."))


# -- responses --------------------------------------------------------------------------

# "abort": stopped by /api/extra/abort; the text so far is the answer.
KoboldFinishReason = Literal["stop", "length", "abort"]


@attrs.frozen
class GenerateResult:
    text: str = attrs.field(metadata=_doc("The generated text (not the prompt)."))
    finish_reason: KoboldFinishReason = attrs.field(
        metadata=_doc('"stop", "length", or "abort" when /api/extra/abort stopped it.')
    )


@attrs.frozen
class GenerateResponse:
    results: tuple[GenerateResult, ...] = attrs.field(metadata=_doc("One result."))


@attrs.frozen
class StreamToken:
    """One ``event: message`` of ``/api/extra/generate/stream``."""

    token: str = attrs.field(metadata=_doc("New text; empty in the last event."))
    finish_reason: KoboldFinishReason | None = attrs.field(
        default=None, metadata={"doc": "Set in the last event only.", "omit_none": True}
    )


@attrs.frozen
class CheckResult:
    text: str = attrs.field(metadata=_doc("The text generated so far."))


@attrs.frozen
class CheckResponse:
    results: tuple[CheckResult, ...] = attrs.field(
        metadata=_doc("The text so far, or empty when the genkey names no running generation.")
    )


@attrs.frozen
class AbortResponse:
    success: bool = attrs.field(metadata=_doc("Whether a generation was aborted."))


@attrs.frozen
class ResultResponse:
    result: str = attrs.field(metadata=_doc("The answer."))


@attrs.frozen
class KoboldCppVersion:
    result: str = attrs.field(metadata=_doc('Always "KoboldCpp".'))
    version: str = attrs.field(metadata=_doc("The KoboldCpp API version answered."))


@attrs.frozen
class ValueResponse:
    value: int = attrs.field(metadata=_doc("The figure asked for, in tokens."))


@attrs.frozen
class TokenCountResponse:
    value: int = attrs.field(metadata=_doc("Number of tokens."))
    ids: tuple[int, ...] = attrs.field(metadata=_doc("The token ids."))


@attrs.frozen
class SoftPromptList:
    values: tuple[str, ...] = attrs.field(metadata=_doc("Always empty: no soft prompts."))


@attrs.frozen
class TextValue:
    value: str = attrs.field(metadata=_doc("Always empty: no soft prompt."))


@attrs.frozen
class EmptyResponse:
    """An empty object."""
