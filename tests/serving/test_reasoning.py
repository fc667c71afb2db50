"""The reasoning/content splitter, whole and streamed in every chunking."""

from __future__ import annotations

import pytest

from tabby.serving.reasoning import ReasoningSplitter, split_reasoning

CASES = [
    # (text, prefilled, reasoning, content)
    ("<think>I should add.</think>\n\nThe sum is 3.", False, "I should add.", "The sum is 3."),
    ("  \n<think>\n  step one\n  step two \n</think>  Done", False, "step one\n  step two", "Done"),
    ("I should add.</think>\n3", True, "I should add.", "3"),
    ("<think>repeated tag</think>3", True, "repeated tag", "3"),
    ("\n</think>\n\nNo thoughts.", True, "", "No thoughts."),
    ("Just an answer with </think> in it.", False, None, "Just an answer with </think> in it."),
    ("Hello <think>not at start</think>", False, None, "Hello <think>not at start</think>"),
    ("<thinking is not the tag", False, None, "<thinking is not the tag"),
    ("<thi", False, None, "<thi"),
    ("<think>unfinished thought </th", False, "unfinished thought </th", ""),
    ("still thinking", True, "still thinking", ""),
    (
        "<think>a < b and c </ d</think>answer </think> again",
        False,
        "a < b and c </ d",
        "answer </think> again",
    ),
    ("<think></think>", False, "", ""),
]


def _streamed(text: str, chunks: list[str], prefilled: bool) -> tuple[str | None, str]:
    splitter = ReasoningSplitter(prefilled=prefilled)
    reasoning, content = [], []
    for chunk in chunks:
        part = splitter.feed(chunk)
        reasoning.append(part.reasoning)
        content.append(part.content)
    last = splitter.finish()
    reasoning.append(last.reasoning)
    content.append(last.content)
    return ("".join(reasoning) if splitter.seen else None), "".join(content)


@pytest.mark.parametrize(("text", "prefilled", "reasoning", "content"), CASES)
def test_split_every_chunking(
    text: str, prefilled: bool, reasoning: str | None, content: str
) -> None:
    expected = (reasoning, content)
    assert split_reasoning(text, prefilled=prefilled) == expected
    for cut in range(len(text) + 1):
        assert _streamed(text, [text[:cut], text[cut:]], prefilled) == expected, cut
    assert _streamed(text, list(text), prefilled) == expected


def test_streaming_releases_text_early() -> None:
    splitter = ReasoningSplitter()
    assert splitter.feed("<thi").content == ""  # may still be the tag
    part = splitter.feed("nk>Hmm, </t")
    assert (part.reasoning, part.content) == ("Hmm,", "")
    part = splitter.feed("hink>\n")
    assert (part.reasoning, part.content) == ("", "")
    assert splitter.feed("\nYes.").content == "Yes."
    assert splitter.feed(" <think>").content == " <think>"
    assert splitter.seen


def test_custom_tags() -> None:
    text = "[THINK]plan[/THINK]answer"
    assert split_reasoning(text, "[THINK]", "[/THINK]") == ("plan", "answer")
    with pytest.raises(ValueError, match="empty"):
        ReasoningSplitter("", "x")
