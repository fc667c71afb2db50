"""A chat choice's output shaped into content, reasoning and tool calls.

One :class:`ChoiceOutput` per choice, for the streaming and the non-streaming answer
alike (the non-streaming one feeds the whole text at once), so both give the same
message::

    out = ChoiceOutput(plan.chat)
    part = out.feed(text)                 # new reasoning / content to show
    if out.wants_tool_pass(finished):     # template way: stopped on tool_start
        await run_tool_pass(plan, index, out)   # the constrained second pass
    part = out.finish(finished)           # held-back text; out.calls, out.finish_reason

The modes are those of :class:`tabby.serving.chat_options.ChatOptions`. A forced call's text is
never shown as content: it is the calls' JSON, parsed at the end. A call cut short by
``max_tokens`` (a forced pass, a second pass, a model-format block) yields no calls and
no content: half a call is neither, and ``finish_reason`` says ``length``. A pass that
ended otherwise without valid calls has its text as content, so nothing is lost.
"""

from __future__ import annotations

import attrs
import trio

from tabby.errors import GenerationFailed, ServiceUnavailable
from tabby.jobs import FinishReason, GenerationJob
from tabby.jobs.events import Failed, Finished, TextChunk
from tabby.serving.chat_options import ChatOptions
from tabby.serving.planning import GenerationPlan
from tabby.serving.reasoning import ReasoningPart, ReasoningSplitter
from tabby.serving.tools import ToolCall, ToolStreamParser, calls_from_constrained, tool_calls

__all__ = ["ChoiceOutput", "ToolPass", "run_tool_pass", "tool_pass_job"]


@attrs.frozen
class ToolPass:
    """What the second pass of one choice produced."""

    text: str
    tokens: int
    finished: Finished


class ChoiceOutput:
    """One chat choice's output, split as it streams (not thread-safe)."""

    def __init__(self, options: ChatOptions | None) -> None:
        self._options = options or ChatOptions()
        tags = self._options.reasoning
        self._splitter = (
            ReasoningSplitter(tags.start, tags.end, prefilled=tags.prefilled)
            if tags is not None
            else None
        )
        fmt = self._options.tool_format
        policy = self._options.policy
        # Only the request's functions are calls; any other "call" is the model's text.
        names = frozenset(policy.names) if policy is not None else None
        self._parser = (
            ToolStreamParser(fmt, names=names)
            if fmt is not None and self._options.tools == "format"
            else None
        )
        self._raw: list[str] = []
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: tuple[ToolCall, ...] = ()
        self.extra_tokens = 0  # tokens of a second pass
        self._pass_finished: Finished | None = None

    @property
    def raw_text(self) -> str:
        return "".join(self._raw)

    @property
    def reasoning_seen(self) -> bool:
        return self._splitter is not None and self._splitter.seen

    def feed(self, text: str) -> ReasoningPart:
        self._raw.append(text)
        if self._options.tools == "forced":
            return ReasoningPart()
        part = self._splitter.feed(text) if self._splitter is not None else ReasoningPart("", text)
        return self._shown(part)

    def _shown(self, part: ReasoningPart) -> ReasoningPart:
        content = part.content
        if self._parser is not None and content:
            content = self._parser.feed(content)
        self.reasoning.append(part.reasoning)
        self.content.append(content)
        return ReasoningPart(part.reasoning, content)

    def wants_tool_pass(self, finished: Finished) -> bool:
        options = self._options
        return (
            options.tools == "template"
            and options.tool_start is not None
            and finished.stop_str == options.tool_start
            and finished.finish_reason == "stop"
        )

    def add_tool_pass(self, result: ToolPass) -> None:
        self.extra_tokens += result.tokens
        self._pass_finished = result.finished
        self.calls = tool_calls(calls_from_constrained(result.text))
        if not self.calls and result.finished.finish_reason != "length":
            self._raw.append(f"{self._options.tool_start or ''}{result.text}")

    def finish(self, finished: Finished) -> ReasoningPart:
        """Release what was held back and settle the calls (``finished``: how the
        choice's generation ended)."""
        options = self._options
        cut_off = finished.finish_reason == "length"
        if options.tools == "forced":
            text = self.raw_text
            self.calls = tool_calls(calls_from_constrained(text))
            if self.calls or cut_off:
                return ReasoningPart()
            self.content.append(text)
            return ReasoningPart("", text)
        reasoning = content = ""
        if self._splitter is not None:
            last = self._shown(self._splitter.finish())
            reasoning, content = last.reasoning, last.content
        passed = self._pass_finished
        if passed is not None and not self.calls and passed.finish_reason != "length":
            # A second pass that gave no calls: its text is content.
            tail = self._raw[-1]
            self.content.append(tail)
            content += tail
        if self._parser is not None:
            result = self._parser.finish(cut_off=cut_off)
            self.calls = tool_calls(result.calls)
            self.content.append(result.content)
            content += result.content
        return ReasoningPart(reasoning, content)

    def finish_reason(self, finished: Finished) -> FinishReason:
        if self.calls:
            return "tool_calls"
        last = self._pass_finished or finished
        return last.finish_reason

    def message_content(self) -> str | None:
        text = "".join(self.content)
        if self.calls and not text.strip():
            return None
        return text

    def message_reasoning(self) -> str | None:
        return "".join(self.reasoning) if self.reasoning_seen else None


def tool_pass_job(plan: GenerationPlan, index: int, generated: str) -> GenerationJob:
    """The second pass of a choice that stopped on ``tool_start``: constrained to the
    calls, its prompt the rendered prompt + the text so far + the tag."""
    options = plan.chat
    assert options is not None
    assert options.tool_start is not None
    spec = options.tool_constraint()
    assert spec is not None
    base = plan.jobs[index]
    text = plan.prompts[plan.prompt_index(index)].text + generated + options.tool_start
    ids = tuple(plan.tokenizer.encode(text, add_bos=options.add_bos))
    room = options.max_seq_len - len(ids) - 1
    if room < 1:
        raise GenerationFailed("no room left in the context for the tool call")
    masker = options.compiler.masker(spec) if options.compiler is not None else None
    return attrs.evolve(
        base,
        job_id=f"{base.job_id}-tool",
        prompt_ids=ids,
        max_new_tokens=min(base.max_new_tokens, room),
        min_new_tokens=0,
        stop_strings=tuple(s for s in base.stop_strings if s != options.tool_start),
        banned_strings=(),
        constraint=spec,
        masker=masker,
    )


async def run_tool_pass(plan: GenerationPlan, index: int, output: ChoiceOutput) -> None:
    """Run one choice's second pass to the end and add it to ``output``."""
    scheduler = plan.scheduler
    if scheduler is None:
        raise ServiceUnavailable("the generation scheduler is not running")
    job = await trio.to_thread.run_sync(tool_pass_job, plan, index, output.raw_text)
    parts: list[str] = []
    tokens = 0
    finished: Finished | None = None
    events = await scheduler.submit(job, model_epoch=plan.epoch)
    with events:
        async for event in events:
            if isinstance(event, TextChunk):
                parts.append(event.text)
                tokens += len(event.token_ids)
            elif isinstance(event, Finished):
                finished = event
            else:
                assert isinstance(event, Failed)
                raise event.error
    if finished is None:
        raise GenerationFailed("the tool-call pass ended without finishing")
    if finished.stats is not None:
        tokens = finished.stats.generated_tokens
    output.add_tool_pass(ToolPass("".join(parts), tokens, finished))
