"""Batched token sampling for the reference engine.

The generator calls :func:`sample` once per decode step with the last-position logits of
every live job, and one :class:`SamplingState` per job (made once, when the job starts,
with :meth:`SamplingState.create`). Per step::

    out = sample(logits, states, histories, generated_counts, want_logprobs,
                 extra_bans=bans_per_row)
    out.tokens[i]          # the token chosen for row i
    out.logprobs[i]        # its log-probability (None when want_logprobs == 0)
    out.top_logprobs[i]    # ((token id, logprob), ...) best first, want_logprobs long

``logits`` [B, V] float32 is consumed (modified in place). ``histories[i]`` is row i's
prompt + generated ids (int64, CPU); it is read only when ``states[i].needs_history``
(penalties or DRY are on), so the generator may pass an empty tensor otherwise.
``generated_counts[i]`` is the number of tokens row i has generated so far (for
``min_tokens``).

Order of operations for every row (all vectorized over the rows where a step is active;
steps neutral for the whole batch cost nothing):

 1. logit bias
 2. repetition, frequency and presence penalties (``tabby.engine.penalties``)
 3. DRY
 4. bans: ``banned_tokens``, ``allowed_tokens``, the job's ``TokenMasker.allowed()``,
    EOS before ``min_new_tokens`` and with ``ban_eos_token``, the step's ``extra_bans``
    (the generator's banned-string resampling), ids past the tokenizer's vocabulary
 5. -- logprobs are taken here (see below) --
 6. temperature 0 (greedy): argmax, done. Otherwise:
 7. temperature, unless ``temperature_last``; dynamic temperature (when ``max_temp >
    min_temp``) replaces the fixed temperature wherever it applies
 8. smoothing (quadratic sampling)
 9. top-k → top-p → typical → tail-free → top-a → min-p (each on the distribution the
    previous steps left, renormalized)
10. temperature, if ``temperature_last``
11. XTC (triggered with ``xtc_probability`` from the row's own generator)
12. mirostat v2 (when ``mirostat_mode == 2``) truncation, then the draw.

Logprobs are of the model's distribution after steps 1-4 (bias, penalties and bans
applied) at temperature 1 and before any truncation: they say what the model thinks, not
how the sampler was tuned, so they stay meaningful for greedy decoding and do not turn
into -inf for tokens the nucleus cut. Banned tokens get -inf and never appear among the
alternatives (the list is shorter when fewer than N tokens remain). OpenAI reports the
distribution actually sampled from instead; with default settings the two agree.

Neutral values (a step is skipped for the row): temperature 1, top_k <= 0 or >= V,
top_p >= 1, typical and tfs outside (0, 1), top_a, min_p, smoothing_factor,
xtc_probability, dry_multiplier 0, ``max_temp <= min_temp``, repetition_penalty 1,
frequency/presence 0, ``mirostat_mode != 2``. XTC with a threshold above 0.5 can never
find two tokens to choose between and is skipped. ``penalty_range <= 0`` is the whole
context (see ``tabby.engine.penalties``).

``TokenMasker.allowed()`` may return token ids or a bool tensor (True = allowed, at least
V long). Logits may live on any device; the per-job generators stay on the CPU.

Determinism: every non-greedy row draws exactly two uniforms per step from its own
``torch.Generator`` (one for XTC, one for the draw), and every transform is row-wise, so
the same seed and settings give the same tokens whatever else shares the batch. Greedy
rows draw nothing.

The sampler never calls ``TokenMasker.consume``: the generator may still discard the
token (a banned string rewinds it, a stop ends the job), so it feeds the masker the
tokens it keeps. Mirostat's ``mu`` is updated here, after each draw.

A row whose every token is masked (e.g. a constraint that allows nothing) yields its
first EOS id (or 0 without one) with logprob -inf, so the job ends instead of crashing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence

import attrs
import torch
from torch import Tensor

from tabby.engine import samplers
from tabby.engine.penalties import apply_penalties, dry_penalties
from tabby.jobs import SamplerSettings, TokenMasker

__all__ = ["SampleOutput", "SamplingState", "sample"]

NEG_INF = float("-inf")


def _id_tensor(ids: Collection[int], vocab_size: int) -> Tensor | None:
    kept = sorted({i for i in ids if 0 <= i < vocab_size})
    return torch.tensor(kept, dtype=torch.int64) if kept else None


@attrs.define(eq=False)
class SamplingState:
    """One job's sampler: its settings, its random generator and its mirostat state.

    Make it with :meth:`create`; it is owned by the generator's job record and used only
    from the generator's thread.
    """

    settings: SamplerSettings
    vocab_size: int
    generator: torch.Generator
    eos_ids: tuple[int, ...]
    min_new_tokens: int
    masker: TokenMasker | None
    breaker_ids: frozenset[int]
    mirostat_mu: float
    # precomputed from the settings so the per-step path only checks flags
    greedy: bool
    temperature_last: bool
    bias_ids: Tensor | None
    bias_values: Tensor | None
    ban_ids: Tensor | None  # banned_tokens (+ EOS with ban_eos_token)
    eos_tensor: Tensor | None
    allowed_ids: Tensor | None
    penalised: bool
    dry: bool
    dynatemp: bool
    xtc: bool
    mirostat: bool
    may_mask_all: bool  # some mask could leave no token at all

    @property
    def needs_history(self) -> bool:
        """Whether :func:`sample` reads this row's history (penalties or DRY are on)."""
        return self.penalised or self.dry

    @classmethod
    def create(
        cls,
        settings: SamplerSettings,
        *,
        vocab_size: int,
        eos_ids: Collection[int],
        seed: int | None = None,
        min_new_tokens: int = 0,
        masker: TokenMasker | None = None,
        breaker_ids: frozenset[int] = frozenset(),
    ) -> SamplingState:
        """Build a job's state.

        ``vocab_size``: the tokenizer's vocabulary; logits past it are masked.
        ``eos_ids``: the ids masked before ``min_new_tokens`` and with ``ban_eos_token``
        (the model's EOS ids; add the job's stop token ids if they should count too).
        ``seed``: None seeds the generator non-deterministically.
        ``breaker_ids``: DRY sequence breakers, already tokenized by the generator (the
        last token of each ``dry_sequence_breakers`` string).
        """
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        s = settings
        eos = tuple(sorted({i for i in eos_ids if 0 <= i < vocab_size}))
        bias: dict[int, float] = {}
        for token, value in s.logit_bias:
            if 0 <= token < vocab_size:
                bias[token] = bias.get(token, 0.0) + value
        banned = set(s.banned_tokens) | (set(eos) if s.ban_eos_token else set())
        return cls(
            settings=s,
            vocab_size=vocab_size,
            generator=generator,
            eos_ids=eos,
            min_new_tokens=min_new_tokens,
            masker=masker,
            breaker_ids=breaker_ids,
            mirostat_mu=2.0 * s.mirostat_tau,
            greedy=s.temperature <= 0.0,
            temperature_last=s.temperature_last,
            bias_ids=torch.tensor(list(bias), dtype=torch.int64) if bias else None,
            bias_values=torch.tensor(list(bias.values()), dtype=torch.float32) if bias else None,
            ban_ids=_id_tensor(banned, vocab_size),
            eos_tensor=_id_tensor(eos, vocab_size),
            allowed_ids=_id_tensor(s.allowed_tokens, vocab_size),
            penalised=(
                s.repetition_penalty != 1.0
                or s.frequency_penalty != 0.0
                or s.presence_penalty != 0.0
            ),
            dry=s.dry_multiplier > 0.0,
            dynatemp=s.max_temp > s.min_temp,
            xtc=s.xtc_probability > 0.0 and s.xtc_threshold <= 0.5,
            mirostat=s.mirostat_mode == 2,
            may_mask_all=bool(
                bias or banned or s.allowed_tokens or masker is not None or min_new_tokens > 0
            ),
        )


@attrs.frozen
class SampleOutput:
    """What one :func:`sample` call chose, one entry per row."""

    tokens: tuple[int, ...]
    # log-probability of each chosen token (None when no logprobs were asked for)
    logprobs: tuple[float, ...] | None = None
    # per row: want_logprobs alternatives as (token id, logprob), best first
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None


def _mask_ids(row: Tensor, ids: Tensor) -> None:
    row.index_fill_(0, ids.to(row.device), NEG_INF)


def _keep_only(row: Tensor, allowed: Tensor) -> None:
    """Mask every token not in ``allowed`` (ids, or a bool mask at least V long)."""
    allowed = allowed.to(row.device)
    if allowed.dtype == torch.bool:
        row.masked_fill_(~allowed[: row.numel()], NEG_INF)
        return
    kept = row[allowed]
    row.fill_(NEG_INF)
    row[allowed] = kept


def _process_row(
    row: Tensor,
    state: SamplingState,
    history: Tensor,
    generated: int,
    extra_bans: Collection[int],
) -> None:
    """Steps 1-4 on one row of logits, in place."""
    s = state.settings
    if state.vocab_size < row.numel():
        row[state.vocab_size :] = NEG_INF
    if state.bias_ids is not None and state.bias_values is not None:
        row.index_add_(0, state.bias_ids.to(row.device), state.bias_values.to(row.device))
    if state.penalised:
        apply_penalties(
            row,
            history,
            repetition=s.repetition_penalty,
            frequency=s.frequency_penalty,
            presence=s.presence_penalty,
            penalty_range=s.penalty_range,
            decay=s.repetition_decay,
        )
    if state.dry:
        dry = dry_penalties(
            history.numpy(),
            multiplier=s.dry_multiplier,
            base=s.dry_base,
            allowed_length=s.dry_allowed_length,
            dry_range=s.dry_range,
            breakers=state.breaker_ids,
        )
        ids = [t for t in dry if 0 <= t < row.numel()]
        if ids:
            ids_t = torch.tensor(ids, dtype=torch.int64, device=row.device)
            amounts = torch.tensor([dry[t] for t in ids], dtype=torch.float32, device=row.device)
            row.index_add_(0, ids_t, -amounts)
    if state.ban_ids is not None:
        _mask_ids(row, state.ban_ids)
    if state.eos_tensor is not None and generated < state.min_new_tokens:
        _mask_ids(row, state.eos_tensor)
    if extra_bans:
        extra = _id_tensor(extra_bans, row.numel())
        if extra is not None:
            _mask_ids(row, extra)
    if state.allowed_ids is not None:
        _keep_only(row, state.allowed_ids)
    if state.masker is not None:
        allowed = state.masker.allowed()
        if allowed is not None:
            if isinstance(allowed, Tensor):
                _keep_only(row, allowed)
            else:
                allowed_ids = torch.tensor(list(allowed), dtype=torch.int64)
                in_vocab = (allowed_ids >= 0) & (allowed_ids < row.numel())
                _keep_only(row, allowed_ids[in_vocab])


def _on_rows(y: Tensor, rows: list[int], fn: Callable[..., Tensor], *params: Tensor) -> Tensor:
    """Apply ``fn`` to the given rows of ``y`` (all rows without copying when possible)."""
    if len(rows) == y.shape[0]:
        return fn(y, *params)
    index = torch.tensor(rows, dtype=torch.int64, device=y.device)
    y[index] = fn(y[index], *params)
    return y


def _param(
    states: Sequence[SamplingState],
    rows: list[int],
    get: Callable[[SamplerSettings], float],
    device: torch.device,
) -> Tensor:
    return torch.tensor([get(states[i].settings) for i in rows], dtype=torch.float32, device=device)


def _select(states: Sequence[SamplingState], pred: Callable[[SamplingState], bool]) -> list[int]:
    return [i for i, st in enumerate(states) if pred(st)]


def _temperature(y: Tensor, states: Sequence[SamplingState], last: bool) -> Tensor:
    """Step 7 (``last=False``) or step 10 (``last=True``) for the rows placed there."""
    fixed = _select(
        states,
        lambda st: (
            st.temperature_last == last and not st.dynatemp and st.settings.temperature != 1.0
        ),
    )
    if fixed:
        temps = _param(states, fixed, lambda s: s.temperature, y.device).unsqueeze(1)
        y = _on_rows(y, fixed, torch.div, temps)
    dynamic = _select(states, lambda st: st.temperature_last == last and st.dynatemp)
    if dynamic:
        low = _param(states, dynamic, lambda s: s.min_temp, y.device).unsqueeze(1)
        high = _param(states, dynamic, lambda s: s.max_temp, y.device).unsqueeze(1)
        exponent = _param(states, dynamic, lambda s: s.temp_exponent, y.device).unsqueeze(1)

        def scale(z: Tensor, lo: Tensor, hi: Tensor, ex: Tensor) -> Tensor:
            return z / samplers.dynamic_temperature(z, lo, hi, ex).clamp(min=1e-4)

        y = _on_rows(y, dynamic, scale, low, high, exponent)
    return y


# Steps after top-k, in order: (is it active for these settings, its parameter, the
# transform). Each runs only on the rows where it is active.
_THRESHOLD_STEPS: tuple[
    tuple[
        Callable[[SamplerSettings], bool],
        Callable[[SamplerSettings], float],
        Callable[..., Tensor],
    ],
    ...,
] = (
    (lambda s: s.top_p < 1.0, lambda s: s.top_p, samplers.top_p),
    (lambda s: 0.0 < s.typical < 1.0, lambda s: s.typical, samplers.typical),
    (lambda s: 0.0 < s.tfs < 1.0, lambda s: s.tfs, samplers.tail_free),
    (lambda s: s.top_a > 0.0, lambda s: s.top_a, samplers.top_a),
    (lambda s: s.min_p > 0.0, lambda s: s.min_p, samplers.min_p),
)


def _truncate(y: Tensor, states: Sequence[SamplingState], xtc_draws: list[float]) -> Tensor:
    """Steps 8-12 (before the draw) on the sampled rows ``y`` [b, V]."""
    y = _temperature(y, states, last=False)
    rows = _select(states, lambda st: st.settings.smoothing_factor > 0.0)
    if rows:
        y = _on_rows(
            y,
            rows,
            samplers.smoothing,
            _param(states, rows, lambda s: s.smoothing_factor, y.device).unsqueeze(1),
        )
    vocab = y.shape[-1]
    rows = _select(states, lambda st: 0 < st.settings.top_k < vocab)
    if rows:
        k = torch.tensor(
            [states[i].settings.top_k for i in rows], dtype=torch.int64, device=y.device
        )
        y = _on_rows(y, rows, samplers.top_k, k)
    for active, value, fn in _THRESHOLD_STEPS:
        rows = [i for i, st in enumerate(states) if active(st.settings)]
        if rows:
            y = _on_rows(y, rows, fn, _param(states, rows, value, y.device))
    y = _temperature(y, states, last=True)
    rows = [
        i for i, st in enumerate(states) if st.xtc and xtc_draws[i] < st.settings.xtc_probability
    ]
    if rows:
        y = _on_rows(
            y, rows, samplers.xtc, _param(states, rows, lambda s: s.xtc_threshold, y.device)
        )
    rows = _select(states, lambda st: st.mirostat)
    if rows:
        mu = torch.tensor(
            [states[i].mirostat_mu for i in rows], dtype=torch.float32, device=y.device
        )
        y = _on_rows(y, rows, samplers.mirostat_truncate, mu)
    return y


def _draw(y: Tensor, uniforms: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse-CDF draw per row: (token ids [b], final probabilities [b, V])."""
    # softmax, not exp: torch's exp is several times slower on -inf and underflowing inputs
    probs = torch.softmax(y, dim=-1)
    cum = probs.cumsum(dim=-1)
    target = uniforms.unsqueeze(1) * cum[:, -1:]
    chosen = torch.searchsorted(cum, target, right=True).squeeze(1)
    chosen = chosen.clamp(max=y.shape[-1] - 1)
    # float rounding at the very end of the CDF can land on a removed token
    dead = probs.gather(1, chosen.unsqueeze(1)).squeeze(1) <= 0.0
    if bool(dead.any()):
        chosen = torch.where(dead, probs.argmax(dim=-1), chosen)
    return chosen, probs


def _update_mirostat(states: Sequence[SamplingState], probs: Tensor, chosen: Tensor) -> None:
    for i, st in enumerate(states):
        if st.mirostat:
            p = float(probs[i, int(chosen[i])])
            surprise = -math.log2(max(p, 1e-30))
            st.mirostat_mu -= st.settings.mirostat_eta * (surprise - st.settings.mirostat_tau)


def _logprobs(
    logp: Tensor, tokens: list[int], want: int
) -> tuple[tuple[float, ...], tuple[tuple[tuple[int, float], ...], ...]]:
    """Chosen-token logprobs and the top ``want`` alternatives from log-probs [B, V]."""
    picked = torch.tensor(tokens, dtype=torch.int64, device=logp.device).unsqueeze(1)
    chosen = logp.gather(1, picked).squeeze(1)
    values, ids = logp.topk(min(want, logp.shape[-1]), dim=-1)
    top = tuple(
        tuple((t, v) for t, v in zip(row_ids, row_values, strict=True) if v != NEG_INF)
        for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
    )
    return tuple(chosen.tolist()), top


def sample(
    logits: Tensor,
    states: Sequence[SamplingState],
    histories: Sequence[Tensor],
    generated_counts: Sequence[int],
    want_logprobs: int = 0,
    *,
    extra_bans: Sequence[Collection[int]] | None = None,
) -> SampleOutput:
    """Choose one token per row. See the module docstring for the contract.

    ``want_logprobs``: the largest number of alternatives any row asked for; 0 = no
    logprobs at all (pass 1 when rows want only the chosen token's logprob).
    ``extra_bans``: per row, ids banned for this step only (banned-string resampling).
    """
    batch = logits.shape[0]
    x = logits if logits.dtype == torch.float32 else logits.to(torch.float32)
    for i, st in enumerate(states):
        _process_row(
            x[i], st, histories[i], generated_counts[i], extra_bans[i] if extra_bans else ()
        )
    if any(st.may_mask_all for st in states) or (extra_bans and any(extra_bans)):
        alive = (x.amax(dim=-1) > NEG_INF).tolist()
    else:
        alive = [True] * batch
    tokens = [0] * batch
    sampled = [i for i in range(batch) if alive[i] and not states[i].greedy]
    greedy = [i for i in range(batch) if alive[i] and states[i].greedy]
    for i in range(batch):
        if not alive[i]:
            tokens[i] = states[i].eos_ids[0] if states[i].eos_ids else 0
    if greedy:
        best = x[greedy].argmax(dim=-1) if len(greedy) < batch else x.argmax(dim=-1)
        for i, t in zip(greedy, best.tolist(), strict=True):
            tokens[i] = t
    # taken before truncation, which may write into x
    logp = torch.log_softmax(x, dim=-1) if want_logprobs > 0 else None
    if logp is not None and not all(alive):
        logp = logp.nan_to_num(nan=NEG_INF)  # a fully masked row has no distribution
    if sampled:
        sub_states = [states[i] for i in sampled]
        draws = torch.stack([torch.rand(2, generator=st.generator) for st in sub_states])
        draws = draws.to(x.device)
        y = x if len(sampled) == batch else x[sampled]
        y = _truncate(y, sub_states, draws[:, 0].tolist())
        chosen, probs = _draw(y, draws[:, 1])
        _update_mirostat(sub_states, probs, chosen)
        for i, t in zip(sampled, chosen.tolist(), strict=True):
            tokens[i] = t
    if logp is None:
        return SampleOutput(tokens=tuple(tokens))
    chosen_lp, top = _logprobs(logp, tokens, want_logprobs)
    return SampleOutput(tokens=tuple(tokens), logprobs=chosen_lp, top_logprobs=top)
