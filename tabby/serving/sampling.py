"""Request-level sampler parameters: every sampler field of the API, validated.

``SamplerParams`` holds the fields as the client sent them (after validation); the
string shorthands the API accepts (``stop: "x"``, ``banned_tokens: "1,2,3"``,
``dry_sequence_breakers: '"\\n", ":"'``, ``logit_bias`` with string keys) are checked
when the object is built and resolved by :meth:`SamplerParams.to_settings` and
:meth:`SamplerParams.job_options`.

Request classes should subclass it (all fields are keyword-only, so the subclass may
add required fields)::

    @attrs.frozen(kw_only=True)
    class CompletionRequest(SamplerParams):
        prompt: str | list[str]
        n: int = 1

    body = apply_preset(raw_json, active_preset)   # tabby.serving.presets; also resolves aliases
    request = structure(body, CompletionRequest, make_converter(forbid_extra_keys=False))
    job = request.build_job(job_id=..., prompt_ids=..., max_seq_len=...)

Errors name the field (``ValidationFailed`` issues with path ``top_p``). Fields the
backends have no use for (``ineffective_fields``) are accepted for compatibility.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from tabby.config.validation import FieldError
from tabby.errors import ContextLengthExceeded
from tabby.jobs import ConstraintSpec, GenerationJob, SamplerSettings, TokenMasker

__all__ = [
    "JobOptions",
    "SamplerParams",
    "parse_sequence_breakers",
    "parse_stop",
    "parse_token_list",
    "sampler_params",
]

_MAX_TOP_LOGPROBS = 20
# Stop and banned strings of one request, in UTF-8 bytes. Their matchers are linear in
# this (tens of bytes of memory per character), and lists of a few thousand phrases fit.
MAX_STOP_BAN_BYTES = 64 * 1024
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1
# Keys of an OpenAI-style {"name", "schema"} wrapper around a JSON schema.
_SCHEMA_WRAPPER_KEYS = frozenset({"name", "schema", "strict", "description"})


# --- parsers for the string shorthands (also used by tabby.serving.presets) -------------


def parse_token_list(value: str | Sequence[int]) -> tuple[int, ...]:
    """``[1, 2]`` or ``"1,2"`` → ``(1, 2)``; ValueError when malformed or negative."""
    if isinstance(value, str):
        pieces = [p.strip() for p in value.split(",")]
        if pieces == [""]:
            return ()
        if not all(p.isdigit() for p in pieces):
            raise ValueError(f"expected comma-separated token ids, got {value!r}")
        return tuple(int(p) for p in pieces)
    ids = tuple(value)
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
        raise ValueError("token ids must be integers ≥ 0")
    return ids


def parse_sequence_breakers(value: str | Sequence[str]) -> tuple[str, ...]:
    """A list of strings, or a JSON array text with or without its brackets."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return ()
        if not text.startswith("["):
            text = f"[{text}]"
        try:
            parsed = json.loads(text)
        except ValueError:
            raise ValueError(f"expected a JSON list of strings, got {value!r}") from None
        if not isinstance(parsed, list) or not all(isinstance(s, str) for s in parsed):
            raise ValueError(f"expected a JSON list of strings, got {value!r}")
        return tuple(parsed)
    return tuple(value)


def parse_stop(value: str | Sequence[str | int]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Stop strings and stop token ids; empty strings are dropped (they cannot match)."""
    items: Sequence[str | int] = [value] if isinstance(value, str) else value
    strings = tuple(s for s in items if isinstance(s, str) and s)
    ids = tuple(i for i in items if isinstance(i, int) and not isinstance(i, bool))
    if any(i < 0 for i in ids):
        raise ValueError("stop token ids must be ≥ 0")
    return strings, ids


def _parse_logit_bias(value: Mapping[str | int, float]) -> tuple[tuple[int, float], ...]:
    pairs: list[tuple[int, float]] = []
    for key, bias in value.items():
        if isinstance(key, str):
            if not key.strip().isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            key = int(key)
        if key < 0:
            raise ValueError(f"keys must be token ids ≥ 0, got {key}")
        if not math.isfinite(bias):
            raise ValueError(f"bias for token {key} must be a finite number")
        pairs.append((key, float(bias)))
    return tuple(sorted(pairs))


# --- validators -----------------------------------------------------------------

_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _number(lo: float | None, hi: float | None, *, lo_open: bool = False) -> _Validator:
    """Finite, within [lo, hi] (or (lo, hi] when ``lo_open``); None passes."""
    if lo is None and hi is None:
        wanted = "a finite number"
    elif hi is None:
        wanted = f"a number {'>' if lo_open else '≥'} {lo}"
    elif lo is None:
        wanted = f"a number ≤ {hi}"
    else:
        wanted = f"a number in {'(' if lo_open else '['}{lo}, {hi}]"

    def validator(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None or isinstance(value, bool):
            return
        ok = math.isfinite(value)
        ok = ok and (lo is None or (value > lo if lo_open else value >= lo))
        ok = ok and (hi is None or value <= hi)
        if not ok:
            raise FieldError(attribute.name, f"expected {wanted}, got {value!r}")

    return validator


def _parsed_by(parser: Callable[[Any], object]) -> _Validator:
    def validator(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None:
            return
        try:
            parser(value)
        except (ValueError, TypeError) as exc:
            raise FieldError(attribute.name, str(exc)) from None

    return validator


def _json_schema_ok(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, dict):
        raise FieldError(attribute.name, "expected a JSON schema object")


def _f(
    default: Any,
    doc: str,
    *aliases: str,
    validator: _Validator | None = None,
) -> Any:
    # One place that spells the metadata tabby.config.validation understands.
    return attrs.field(
        default=default,
        validator=validator,
        metadata={"aliases": aliases, "doc": doc},
    )


_TOKENS = _number(0, None)
_UNIT = _number(0.0, 1.0)


@attrs.frozen
class JobOptions:
    """The job-level pieces of a request (everything but the sampler settings)."""

    max_tokens: int | None  # None = the model's default_max_tokens
    min_tokens: int
    stop_strings: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    banned_strings: tuple[str, ...]
    seed: int | None
    logprobs: bool
    top_logprobs: int
    constraint: ConstraintSpec | None
    add_bos_token: bool | None  # None = the tokenizer's own setting


@attrs.frozen(kw_only=True)
class SamplerParams:
    """Every sampler parameter of the API, with the defaults a request gets."""

    # Lengths and stopping
    max_tokens: int | None = _f(
        None,
        "Maximum new tokens; null or 0: the model's default_max_tokens.",
        "max_completion_tokens",
        "max_length",
        validator=_TOKENS,
    )
    min_tokens: int = _f(
        0,
        "Stop conditions are ignored until this many tokens are generated.",
        "min_length",
        validator=_TOKENS,
    )
    stop: str | tuple[str | int, ...] = _f(
        (), "Stop strings and/or stop token ids.", "stop_sequence", validator=_parsed_by(parse_stop)
    )
    banned_strings: str | tuple[str, ...] = _f((), "Strings that must never be generated.")
    banned_tokens: str | tuple[int, ...] = _f(
        (),
        'Token ids that are never sampled (list or "1,2,3").',
        "custom_token_bans",
        validator=_parsed_by(parse_token_list),
    )
    allowed_tokens: str | tuple[int, ...] = _f(
        (),
        'Only these token ids may be sampled (list or "1,2,3"); empty allows all.',
        "allowed_token_ids",
        validator=_parsed_by(parse_token_list),
    )
    token_healing: bool = _f(False, "Re-tokenize the end of the prompt (accepted; no effect).")
    ban_eos_token: bool = _f(False, "Never sample an end-of-sequence token.", "ignore_eos")
    add_bos_token: bool | None = _f(
        None, "Add BOS to the prompt; null uses the tokenizer's setting."
    )
    # Temperature
    temperature: float = _f(1.0, "Sampling temperature; 0 is greedy.", validator=_number(0.0, 10.0))
    temperature_last: bool = _f(False, "Apply temperature after the truncation samplers.")
    min_temp: float = _f(
        1.0, "Dynamic temperature lower bound.", "dynatemp_low", validator=_number(0.0, None)
    )
    max_temp: float = _f(
        1.0,
        "Dynamic temperature upper bound (active when above min_temp).",
        "dynatemp_high",
        validator=_number(0.0, None),
    )
    temp_exponent: float = _f(
        1.0, "Dynamic temperature exponent.", "dynatemp_exponent", validator=_number(0.0, None)
    )
    smoothing_factor: float = _f(
        0.0, "Quadratic sampling factor; 0 is off.", validator=_number(0.0, None)
    )
    # Truncation
    top_k: int = _f(
        0, "Keep the k most likely tokens; 0 (or -1) is off.", validator=_number(-1, None)
    )
    top_p: float = _f(1.0, "Nucleus sampling mass.", validator=_UNIT)
    top_a: float = _f(0.0, "Top-A threshold; 0 is off.", validator=_number(0.0, None))
    min_p: float = _f(0.0, "Min-P threshold relative to the top token.", validator=_UNIT)
    tfs: float = _f(1.0, "Tail-free sampling; 1 is off.", validator=_UNIT)
    typical: float = _f(
        1.0,
        "Locally typical sampling mass; 1 is off.",
        "typical_p",
        validator=_number(0.0, 1.0, lo_open=True),
    )
    skew: float = _f(0.0, "Skew sampling (accepted; no effect).", validator=_number(None, None))
    xtc_probability: float = _f(
        0.0, "XTC: chance of excluding the top choices; 0 is off.", validator=_UNIT
    )
    xtc_threshold: float = _f(
        0.1, "XTC: probability above which tokens are top choices.", validator=_UNIT
    )
    # Penalties
    repetition_penalty: float = _f(
        1.0,
        "Multiplicative repetition penalty; 1 is off.",
        "rep_pen",
        validator=_number(0.0, None, lo_open=True),
    )
    frequency_penalty: float = _f(
        0.0, "Penalty growing with each repetition of a token.", validator=_number(0.0, None)
    )
    presence_penalty: float = _f(
        0.0, "Penalty for any token already present.", validator=_number(0.0, None)
    )
    penalty_range: int = _f(
        -1,
        "Window of tokens the penalties look at; -1 is the whole context.",
        "repetition_range",
        "repetition_penalty_range",
        "rep_pen_range",
        validator=_number(-1, None),
    )
    repetition_decay: int = _f(0, "Tokens over which the penalty fades in.", validator=_TOKENS)
    # DRY
    dry_multiplier: float = _f(
        0.0, "DRY penalty multiplier; 0 is off.", validator=_number(0.0, None)
    )
    dry_base: float = _f(1.75, "DRY penalty base.", validator=_number(0.0, None))
    dry_allowed_length: int = _f(2, "Longest repetition DRY leaves alone.", validator=_TOKENS)
    dry_range: int = _f(
        0, "DRY window in tokens; 0 is unlimited.", "dry_penalty_last_n", validator=_TOKENS
    )
    dry_sequence_breakers: str | tuple[str, ...] = _f(
        (),
        "Strings that end a DRY match (list or JSON-ish text).",
        validator=_parsed_by(parse_sequence_breakers),
    )
    # Mirostat
    mirostat_mode: int = _f(
        0, "Mirostat mode; only 2 is honoured.", "mirostat", validator=_number(0, 2)
    )
    mirostat_tau: float = _f(1.5, "Mirostat target surprise.", validator=_number(0.0, None))
    mirostat_eta: float = _f(0.3, "Mirostat learning rate.", validator=_number(0.0, None))
    # Bias, structure, output
    logit_bias: dict[str | int, float] | None = _f(  # noqa: RUF009 - _f is attrs.field
        None, "Additive bias per token id.", validator=_parsed_by(_parse_logit_bias)
    )
    json_schema: dict[str, Any] | None = _f(  # noqa: RUF009 - _f is attrs.field
        None, "Constrain the output to this JSON schema.", validator=_json_schema_ok
    )
    regex_pattern: str | None = _f(None, "Constrain the output to this regular expression.")
    grammar_string: str | None = _f(
        None, "Constrain the output to this grammar (Lark, or GBNF with ::=)."
    )
    logprobs: bool | int = _f(
        False,
        "Return token logprobs; an integer also sets top_logprobs.",
        validator=_number(0, _MAX_TOP_LOGPROBS),
    )
    top_logprobs: int = _f(
        0, "Alternatives returned per position.", validator=_number(0, _MAX_TOP_LOGPROBS)
    )
    seed: int | None = _f(
        None, "Seed for reproducible sampling.", validator=_number(_SEED_MIN, _SEED_MAX)
    )
    # Accepted for compatibility with other backends; no effect here.
    adaptive_target: float = _f(
        1.0, "Adaptive-P target; 1 is off (accepted; no effect).", validator=_UNIT
    )
    adaptive_decay: float = _f(0.9, "Adaptive-P decay (accepted; no effect).", validator=_UNIT)
    loop_detect_window: int | None = _f(
        800, "Loop detection window (accepted; no effect).", validator=_TOKENS
    )
    speculative_ngram: bool | None = _f(None, "N-gram speculative decoding (accepted; no effect).")
    cfg_scale: float = _f(
        1.0,
        "Classifier-free guidance scale (accepted; no effect).",
        "guidance_scale",
        validator=_number(None, None),
    )
    negative_prompt: str | None = _f(None, "Negative prompt for guidance (accepted; no effect).")

    def __attrs_post_init__(self) -> None:
        self._check_stop_ban_size()
        if self.max_tokens and self.min_tokens > self.max_tokens:
            raise FieldError(
                "min_tokens", f"must not exceed max_tokens ({self.min_tokens} > {self.max_tokens})"
            )
        if self.min_temp > self.max_temp:
            raise FieldError(
                "min_temp", f"must not exceed max_temp ({self.min_temp} > {self.max_temp})"
            )
        given = [
            name
            for name, value in (
                ("json_schema", self.json_schema),
                ("regex_pattern", self.regex_pattern),
                ("grammar_string", self.grammar_string),
            )
            if value
        ]
        if len(given) > 1:
            raise FieldError(given[1], f"cannot be combined with {given[0]}: use one constraint")

    def _check_stop_ban_size(self) -> None:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        bans = [self.banned_strings] if isinstance(self.banned_strings, str) else self.banned_strings
        stop_bytes = sum(len(s.encode("utf-8")) for s in stops if isinstance(s, str))
        ban_bytes = sum(len(s.encode("utf-8")) for s in bans)
        if stop_bytes + ban_bytes > MAX_STOP_BAN_BYTES:
            field = "stop" if stop_bytes >= ban_bytes else "banned_strings"
            raise FieldError(
                field,
                f"stop and banned strings total {stop_bytes + ban_bytes} bytes; at most "
                f"{MAX_STOP_BAN_BYTES}",
            )

    def to_settings(self) -> SamplerSettings:
        """The backend sampler settings (shorthands resolved, ``top_k=-1`` → 0)."""
        return SamplerSettings(
            temperature=self.temperature,
            temperature_last=self.temperature_last,
            top_k=max(self.top_k, 0),
            top_p=self.top_p,
            min_p=self.min_p,
            typical=self.typical,
            top_a=self.top_a,
            tfs=self.tfs,
            xtc_probability=self.xtc_probability,
            xtc_threshold=self.xtc_threshold,
            min_temp=self.min_temp,
            max_temp=self.max_temp,
            temp_exponent=self.temp_exponent,
            smoothing_factor=self.smoothing_factor,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            penalty_range=self.penalty_range,
            repetition_decay=self.repetition_decay,
            dry_multiplier=self.dry_multiplier,
            dry_base=self.dry_base,
            dry_allowed_length=self.dry_allowed_length,
            dry_range=self.dry_range,
            dry_sequence_breakers=parse_sequence_breakers(self.dry_sequence_breakers),
            mirostat_mode=self.mirostat_mode,
            mirostat_tau=self.mirostat_tau,
            mirostat_eta=self.mirostat_eta,
            logit_bias=_parse_logit_bias(self.logit_bias) if self.logit_bias else (),
            banned_tokens=parse_token_list(self.banned_tokens),
            allowed_tokens=parse_token_list(self.allowed_tokens),
            ban_eos_token=self.ban_eos_token,
        )

    def constraint(self) -> ConstraintSpec | None:
        """The structured-output constraint, if any.

        An empty schema (``{}``, sent by some frontends by default) does not constrain;
        an OpenAI-style ``{"name", "schema"}`` wrapper is unwrapped.
        """
        if self.json_schema:
            schema = self.json_schema
            inner = schema.get("schema")
            if isinstance(inner, dict) and set(schema) <= _SCHEMA_WRAPPER_KEYS:
                schema = inner
            return ConstraintSpec("json_schema", json.dumps(schema))
        if self.regex_pattern:
            return ConstraintSpec("regex", self.regex_pattern)
        if self.grammar_string:
            if "::=" in self.grammar_string:
                return ConstraintSpec("gbnf", self.grammar_string)
            return ConstraintSpec("lark", self.grammar_string)
        return None

    def job_options(self, *, extra_stop_strings: Sequence[str] = ()) -> JobOptions:
        """The job-level pieces; ``extra_stop_strings`` (template metadata) are appended."""
        stop_strings, stop_ids = parse_stop(self.stop)
        for extra in extra_stop_strings:
            if extra and extra not in stop_strings:
                stop_strings += (extra,)
        banned = (
            (self.banned_strings,) if isinstance(self.banned_strings, str) else self.banned_strings
        )
        # An integer logprobs is the legacy completions form: it also asks for
        # that many alternatives.
        top = self.top_logprobs
        if not isinstance(self.logprobs, bool):
            top = max(top, self.logprobs)
        return JobOptions(
            max_tokens=self.max_tokens or None,
            min_tokens=self.min_tokens,
            stop_strings=stop_strings,
            stop_token_ids=stop_ids,
            banned_strings=tuple(s for s in banned if s),
            seed=self.seed,
            logprobs=bool(self.logprobs),
            top_logprobs=top if self.logprobs else 0,
            constraint=self.constraint(),
            add_bos_token=self.add_bos_token,
        )

    def build_job(
        self,
        *,
        job_id: str,
        prompt_ids: Sequence[int],
        max_seq_len: int,
        extra_stop_strings: Sequence[str] = (),
        masker: TokenMasker | None = None,
        default_max_tokens: int = 0,
    ) -> GenerationJob:
        """A backend job for ``prompt_ids``.

        ``max_tokens`` null or 0 takes ``default_max_tokens`` (0 there: the rest of the
        context), and a value that fits the model but not beside this prompt is capped to
        what is left (clients such as SillyTavern send a fixed ``max_tokens`` whatever the
        prompt's length). A value
        beyond the context length itself, or a prompt that leaves no room, raises
        :class:`ContextLengthExceeded` before anything is queued.
        """
        room = max_seq_len - len(prompt_ids)
        options = self.job_options(extra_stop_strings=extra_stop_strings)
        if options.max_tokens is not None and options.max_tokens > max_seq_len:
            raise ContextLengthExceeded(
                f"max_tokens is {options.max_tokens}, more than the model's context length "
                f"of {max_seq_len}",
                param="max_tokens",
            )
        if room < 1:
            raise ContextLengthExceeded(
                f"the prompt has {len(prompt_ids)} tokens, which leaves no room to generate "
                f"within the context length of {max_seq_len}",
                param="messages",
            )
        wanted = options.max_tokens or default_max_tokens or None
        max_new = room if wanted is None else min(wanted, room)
        return GenerationJob(
            job_id=job_id,
            prompt_ids=tuple(prompt_ids),
            max_new_tokens=max_new,
            sampler=self.to_settings(),
            min_new_tokens=min(options.min_tokens, max_new),
            seed=options.seed,
            stop_strings=options.stop_strings,
            stop_token_ids=options.stop_token_ids,
            banned_strings=options.banned_strings,
            logprobs=options.logprobs,
            top_logprobs=options.top_logprobs,
            constraint=options.constraint,
            masker=masker,
        )

    def ineffective_fields(self) -> tuple[str, ...]:
        """Fields set to a non-default value that no backend here acts on (to warn about)."""
        names = (
            "token_healing", "skew", "adaptive_target", "adaptive_decay",
            "loop_detect_window", "speculative_ngram", "cfg_scale", "negative_prompt",
        )  # fmt: skip
        defaults = {a.name: a.default for a in attrs.fields(SamplerParams)}
        return tuple(n for n in names if getattr(self, n) != defaults[n])


def sampler_params(request: SamplerParams) -> SamplerParams:
    """The sampler fields of a request class (a subclass) as a plain :class:`SamplerParams`."""
    if type(request) is SamplerParams:
        return request
    return SamplerParams(**{name: getattr(request, name) for name in _FIELD_NAMES})


_FIELD_NAMES = tuple(a.name for a in attrs.fields(SamplerParams))
