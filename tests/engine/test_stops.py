"""Stop strings and banned strings over streamed text."""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import Callable

import pytest
import torch

from tabby.engine.sampling import SamplingState, sample
from tabby.engine.stops import BannedStringChecker, BanVerdict, StopChecker
from tabby.jobs import SamplerSettings


def run_stops(stops: list[str], chunks: list[str]) -> tuple[str, str | None, list[str]]:
    """Feed chunks until a stop; return (emitted text, stop, every emitted piece)."""
    checker = StopChecker(stops)
    pieces = []
    for chunk in chunks:
        hit = checker.feed(chunk)
        pieces.append(hit.text)
        if hit.stop is not None:
            return "".join(pieces), hit.stop, pieces
    pieces.append(checker.flush())
    return "".join(pieces), None, pieces


def splits(text: str, parts: int) -> list[list[str]]:
    """Every way to cut ``text`` into ``parts`` chunks (empty chunks included)."""
    out = []
    for cuts in itertools.combinations_with_replacement(range(len(text) + 1), parts - 1):
        bounds = (0, *cuts, len(text))
        out.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return out


def test_a_stop_string_split_across_chunks_is_caught_and_never_leaks() -> None:
    text = "Hello world</s> and more"
    for chunks in splits(text, 3):
        emitted, stop, pieces = run_stops(["</s>"], chunks)
        assert (emitted, stop) == ("Hello world", "</s>"), chunks
        assert all("<" not in p for p in pieces)


def test_text_that_may_become_a_stop_string_is_held_then_released() -> None:
    checker = StopChecker(["</s>", "###"])
    assert checker.feed("a <").text == "a "
    assert checker.held == "<"
    assert checker.feed("/").text == ""
    assert checker.feed("b").text == "</b"
    assert checker.feed("##").text == ""
    assert checker.held == "##"  # never more than max(len(stop)) - 1
    assert checker.flush() == "##"


def test_a_held_prefix_that_fails_still_lets_a_later_stop_match() -> None:
    # "<<" fails as "</s>" but its second "<" starts the real stop string
    assert run_stops(["</s>"], ["x<", "<", "/s", ">y"])[:2] == ("x<", "</s>")


@pytest.mark.parametrize(
    ("stops", "text", "emitted", "stop"),
    [
        (["ab", "abc"], "xabcd", "x", "ab"),  # a prefix stop completes first
        (["abc", "bc"], "xabcd", "x", "abc"),  # both complete together: the longest
        (["abcd", "bc"], "abcde", "a", "bc"),  # the inner one completes first
        (["cd", "abcdef"], "abcdefg", "ab", "cd"),
        (["zz"], "no stop here", "no stop here", None),
    ],
)
def test_overlapping_stop_strings_resolve_the_same_for_every_chunking(
    stops: list[str], text: str, emitted: str, stop: str | None
) -> None:
    for chunks in [[text], list(text), *splits(text, 3)]:
        assert run_stops(stops, chunks)[:2] == (emitted, stop), chunks


def test_no_stop_strings_pass_text_through() -> None:
    checker = StopChecker(["", ""])
    assert checker.feed("abc").text == "abc"
    assert checker.flush() == ""


def test_nothing_is_emitted_after_a_stop() -> None:
    checker = StopChecker(["END"])
    assert checker.feed("aEND").stop == "END"
    assert checker.feed("more").text == ""
    assert checker.flush() == ""


# ---- banned strings ----------------------------------------------------------------------


def test_banned_string_asks_to_rewind_to_the_token_where_it_started() -> None:
    checker = BannedStringChecker(["bad word"])
    v = checker.feed(1, "I ")
    assert (v.text, v.tokens) == ("I ", (1,))
    v = checker.feed(2, "say ")
    assert (v.text, v.tokens) == ("say ", (2,))
    assert checker.feed(3, "ba").text == ""  # could become the banned string
    assert checker.feed(4, "d w").text == ""
    v = checker.feed(5, "ord")
    assert (v.rewind, v.ban, v.text, v.tokens) == (3, 3, "", ())
    assert checker.position == 2
    assert checker.banned_now() == {3}
    v = checker.feed(6, "good")
    assert (v.text, v.tokens) == ("good", (6,))
    assert checker.banned_now() == frozenset()


def test_banned_strings_are_case_insensitive_and_may_start_mid_token() -> None:
    checker = BannedStringChecker(["Bad Word"])
    assert checker.feed(1, "xxBA").text == ""  # "xx" is held with the token it shares
    v = checker.feed(2, "D WORD!")
    assert (v.rewind, v.ban) == (2, 1)
    assert checker.position == 0


def test_bans_accumulate_at_a_position_and_are_forgotten_past_a_rewind() -> None:
    checker = BannedStringChecker(["bad"])
    checker.feed(1, "ok ")
    assert checker.feed(2, "bad").ban == 2
    assert checker.feed(3, "b").text == ""
    v = checker.feed(4, "ad")
    assert (v.rewind, v.ban) == (2, 3)
    assert checker.banned_now() == {2, 3}  # both ways into "bad" at position 1
    checker.feed(5, "x")
    assert checker.banned_now() == frozenset()


def test_rewinding_further_back_drops_later_bans() -> None:
    checker = BannedStringChecker(["abcd", "cz"])
    checker.feed(1, "a")
    checker.feed(2, "c")
    assert checker.feed(3, "z").ban == 2  # "cz" started at position 1
    checker.feed(4, "b")
    checker.feed(5, "c")
    assert checker.feed(6, "d").ban == 1  # "abcd" started at position 0
    assert checker.position == 0
    assert checker.banned_now() == {1}
    checker.feed(7, "a")
    assert checker.banned_now() == frozenset()  # the ban made at position 1 is gone


def test_empty_text_tokens_before_a_banned_string_are_rewound_with_it() -> None:
    checker = BannedStringChecker(["éx"])
    assert checker.feed(1, "ok").tokens == (1,)
    assert checker.feed(2, "").tokens == ()  # first byte of a multi-byte character
    assert checker.feed(3, "é").text == ""
    assert checker.feed(4, "x").ban == 2


def test_flush_releases_held_tokens() -> None:
    checker = BannedStringChecker(["bad"])
    assert checker.feed(1, "ba").text == ""
    v = checker.flush()
    assert (v.text, v.tokens) == ("ba", (1,))


def test_no_banned_strings_release_every_token() -> None:
    checker = BannedStringChecker([])
    assert checker.feed(9, "x").tokens == (9,)
    assert checker.position == 1


def test_generation_loop_with_rewinds_never_emits_a_banned_string() -> None:
    """A greedy toy model that wants to spell "bad": the sampler plus the checker stop it."""
    pieces = ["b", "a", "d", "ba", "bad", "x", " "]
    prefs = torch.tensor([[3.0, 1.0, 2.0, 4.0, 5.0, 0.0, 0.5]])  # "bad" > "ba" > "b" > ...
    state = SamplingState.create(SamplerSettings(temperature=0.0), vocab_size=7, eos_ids=())
    checker = BannedStringChecker(["BAD"])
    sequence: list[int] = []
    emitted: list[str] = []
    rewinds = 0
    for _ in range(30):
        out = sample(
            prefs.clone(),
            [state],
            [torch.tensor(sequence, dtype=torch.int64)],
            [len(sequence)],
            extra_bans=[checker.banned_now()],
        )
        token = out.tokens[0]
        sequence.append(token)
        verdict = checker.feed(token, pieces[token])
        if verdict.rewind:
            rewinds += 1
            del sequence[len(sequence) - verdict.rewind :]
        emitted.append(verdict.text)
        assert len(sequence) == checker.position
    emitted.append(checker.flush().text)
    text = "".join(emitted)
    assert rewinds > 0
    assert "bad" not in text.lower()
    assert text == "".join(pieces[t] for t in sequence)
    assert len(text) > 5


def test_random_generation_with_rewinds_keeps_every_banned_string_out() -> None:
    pieces = ["x", "a", "b", "c", "ab", "bc", "ca", "", "A", " "]
    banned = ["abc", "CA", "bb"]
    state = SamplingState.create(SamplerSettings(), vocab_size=len(pieces), eos_ids=(), seed=5)
    checker = BannedStringChecker(banned)
    gen = torch.Generator().manual_seed(9)
    sequence: list[int] = []
    emitted: list[str] = []
    rewinds = 0
    for _ in range(400):
        logits = torch.randn(1, len(pieces), generator=gen)
        token = sample(
            logits,
            [state],
            [torch.tensor(sequence, dtype=torch.int64)],
            [len(sequence)],
            extra_bans=[checker.banned_now()],
        ).tokens[0]
        assert token not in checker.banned_now()
        sequence.append(token)
        verdict = checker.feed(token, pieces[token])
        if verdict.rewind:
            rewinds += 1
            del sequence[len(sequence) - verdict.rewind :]
        emitted.append(verdict.text)
    emitted.append(checker.flush().text)
    text = "".join(emitted)
    assert rewinds > 10
    assert text == "".join(pieces[t] for t in sequence)
    assert not any(b.lower() in text.lower() for b in banned)


def _peak_bytes(build: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        keep = build()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del keep
    return peak


@pytest.mark.parametrize("checker", [StopChecker, BannedStringChecker])
def test_long_strings_cost_linear_memory(checker: Callable[[list[str]], object]) -> None:
    # Every prefix of a 20,000-character string would be ~200 M characters.
    small = _peak_bytes(lambda: checker(["ab" * 10_000]))
    large = _peak_bytes(lambda: checker(["ab" * 20_000]))
    assert small < 20 * 2**20
    assert large < 3 * small


def test_a_long_stop_string_still_matches_across_chunks() -> None:
    stop = "xy" * 5_000
    checker = StopChecker([stop, "never"])
    out = [checker.feed("hello " + stop[:3001]).text]
    out.append(checker.feed(stop[3001:6000]).text)
    hit = checker.feed(stop[6000:] + " after")
    assert "".join(out) + hit.text == "hello "
    assert hit.stop == stop


def test_a_long_banned_string_is_rewound() -> None:
    banned = "ab" * 3_000
    checker = BannedStringChecker([banned])
    released: list[str] = []
    verdict = BanVerdict()
    for i, piece in enumerate(["x", *[banned[j : j + 4] for j in range(0, len(banned), 4)]]):
        verdict = checker.feed(i, piece)
        released.append(verdict.text)
        if verdict.rewind:
            break
    assert "".join(released) == "x"
    assert verdict.rewind == len(banned) // 4
    assert verdict.ban == 1
