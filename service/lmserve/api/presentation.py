"""The one presentation step: a generation call's choices as its client sees them, on either transport.

    presenter = call.presenter()
    event = presenter.delta(choice_delta)     # a streamed piece; None when nothing changed for the client
    choice = presenter.choice(choice_result)  # a whole choice (non-streaming)

Decided here, once: the echo of completions (the prompt's text before a choice's first text; with logprobs,
the prompt's tokens), the thinking split off chat text by a reasoning parser (api/reasoning.py; `reasoning`),
the tool calls parsed out of the answer after it (content apart, calls as OpenAI's pieces), and the
finish_reason the client gets (the engine's, the safety filter's content_filter, or tool_calls).
api/http/ and api/grpc/ only serialize a PresentedChoice into their wire types.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from lmserve.api.account import ChoiceDelta, ChoiceResult
from lmserve.api.reasoning import ReasoningPiece, ReasoningPlan
from lmserve.api.tool_calls import ToolEvent
from lmserve.api.tools import ToolPlan, parse_output
from lmserve.types import FinishReason, PromptLogprob, TokenLogprob


@dataclass(frozen=True)
class ToolCallPiece:
    """A tool call, or while streaming a piece of one: the first piece has its id and name, later pieces
    more of its JSON arguments (OpenAI's delta shape). A whole choice's calls are single whole pieces."""

    index: int  # the call's position among the choice's calls
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True)
class PresentedChoice:
    """One choice as the client gets it: a streamed piece, or the whole choice."""

    index: int
    is_first: bool  # the choice's first piece (chat sends the role with it; a whole choice is always first)
    content: str | None  # text, with the echo applied; None: a chat answer that only called tools
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None  # the output tokens'; None: not asked for
    finish_reason: str | None  # None: the choice goes on
    stop_reason: str | int | None = None
    tool_calls: list[ToolCallPiece] = field(default_factory=list)
    echo_tokens: list[str] | None = None  # completions with echo and logprobs: the prompt's tokens (no logprobs)
    # Chat with a reasoning parser: the thinking text, apart from content (a streamed piece's new thinking, a
    # whole choice's whole thinking); None when there is none.
    reasoning: str | None = None
    # With prompt_logprobs: the prompt's scores (the first entry None), on the choice's first piece only.
    prompt_logprobs: list[PromptLogprob | None] | None = None

    @property
    def has_text_or_end(self) -> bool:
        """Whether it says anything but token ids: a wire without token ids sends nothing for the rest."""
        return (
            bool(self.content or self.reasoning or self.logprobs or self.tool_calls or self.echo_tokens or self.prompt_logprobs)
            or self.finish_reason is not None
        )


def finish_reason(reason: FinishReason | None, tool_plan: ToolPlan | None = None, called: bool = False) -> str | None:
    """The finish_reason the client gets: the engine's or the safety filter's, or OpenAI's tool_calls
    (ToolPlan's rule) where the choice called tools."""
    if tool_plan is not None:
        return tool_plan.finish_reason(called, reason)
    return None if reason is None else reason.value


def token_id_string(token_id: int) -> str:
    """vLLM's return_tokens_as_token_ids: a token named by its id, which identifies tokens that are not
    valid UTF-8 alone."""
    return f"token_id:{token_id}"


def _as_token_ids(logprobs: list[TokenLogprob] | None) -> list[TokenLogprob] | None:
    if logprobs is None:
        return None
    return [
        replace(
            t,
            token=token_id_string(t.token_id),
            top=tuple(replace(a, token=token_id_string(a.token_id)) for a in t.top),
        )
        for t in logprobs
    ]


def _pieces(events: list[ToolEvent]) -> list[ToolCallPiece]:
    return [
        ToolCallPiece(e.index, e.id, e.name, e.arguments or "")
        for e in events
        if e.content is None and (e.id is not None or e.arguments)
    ]


class Presenter:
    """Presents one call's choices; one per call, fed each choice's deltas in order."""

    def __init__(
        self,
        num_choices: int,
        n: int,
        echo_texts: list[str] | None = None,
        echo_tokens: list[list[str]] | None = None,
        tool_plan: ToolPlan | None = None,
        tokens_as_ids: bool = False,
        reasoning_plan: ReasoningPlan | None = None,
    ) -> None:
        self.n = n  # choices per prompt: choice i answers prompt i // n
        # return_tokens_as_token_ids: the logprobs' token strings (and echoed prompt tokens) are "token_id:<id>";
        # prompt_logprobs keep their decoded tokens (keyed by id already), as in vLLM.
        self.tokens_as_ids = tokens_as_ids
        self.echo_texts = echo_texts
        self.echo_tokens = echo_tokens
        self.tool_plan = tool_plan if tool_plan is not None and tool_plan.parses_calls else None
        self._started = [False] * num_choices
        self._parsers = [self.tool_plan.parser() for _ in range(num_choices)] if self.tool_plan else None
        self.reasoning_plan = reasoning_plan if reasoning_plan is not None and reasoning_plan.has_reasoning else None
        self._thinkers = [self.reasoning_plan.parser() for _ in range(num_choices)] if self.reasoning_plan else None

    def _echo(self, index: int) -> tuple[str, list[str] | None]:
        if self.echo_texts is None:
            return "", None
        prompt = index // self.n
        return self.echo_texts[prompt], None if self.echo_tokens is None else self.echo_tokens[prompt]

    def delta(self, item: ChoiceDelta) -> PresentedChoice | None:
        i, delta = item.index, item.delta
        is_first = not self._started[i]
        echo, echo_tokens = self._echo(i) if is_first else ("", None)
        content, calls, reasoning = delta.text, [], None
        if self.tool_plan is not None:
            content = self.tool_plan.visible(content)
        reason = finish_reason(delta.finish_reason)
        if self._thinkers is not None:
            piece = self._thinkers[i].feed(content)
            if delta.finish_reason is not None:
                end = self._thinkers[i].finish()
                piece = ReasoningPiece(piece.reasoning + end.reasoning, piece.content + end.content)
            content, reasoning = piece.content, piece.reasoning or None
        if self._parsers is not None:
            parser = self._parsers[i]
            events = parser.feed(content)
            if delta.finish_reason is not None:
                events += parser.finish()
                reason = finish_reason(delta.finish_reason, self.tool_plan, bool(parser.calls))
            content = "".join(e.content for e in events if e.content is not None)
            calls = _pieces(events)
        content = echo + content
        has_scores = delta.prompt_logprobs is not None
        if not (content or reasoning or delta.token_ids or delta.logprobs or calls or echo_tokens or has_scores) and reason is None:
            return None
        self._started[i] = True
        return PresentedChoice(
            index=i, is_first=is_first, content=content, token_ids=delta.token_ids, logprobs=self._logprobs(delta.logprobs),
            finish_reason=reason, stop_reason=delta.stop_reason, tool_calls=calls, echo_tokens=echo_tokens,
            prompt_logprobs=delta.prompt_logprobs,
            reasoning=reasoning,
        )  # fmt: skip

    def _logprobs(self, logprobs: list[TokenLogprob] | None) -> list[TokenLogprob] | None:
        return _as_token_ids(logprobs) if self.tokens_as_ids else logprobs

    def choice(self, result: ChoiceResult) -> PresentedChoice:
        echo, echo_tokens = self._echo(result.index)
        text, reasoning = result.text, None
        if self.tool_plan is not None:
            text = self.tool_plan.visible(text)
        if self.reasoning_plan is not None:
            thinker = self.reasoning_plan.parser()
            head, end = thinker.feed(text), thinker.finish()
            text, reasoning = head.content + end.content, (head.reasoning + end.reasoning) or None
        content: str | None = echo + text
        calls: list[ToolCallPiece] = []
        reason = finish_reason(result.finish_reason)
        if self.tool_plan is not None:
            parsed = parse_output(self.tool_plan, text)
            content = parsed.content
            calls = [ToolCallPiece(k, c.id, c.name, c.arguments) for k, c in enumerate(parsed.tool_calls)]
            reason = finish_reason(result.finish_reason, self.tool_plan, bool(calls))
        return PresentedChoice(
            index=result.index, is_first=True, content=content, token_ids=result.token_ids,
            logprobs=self._logprobs(result.logprobs), finish_reason=reason, stop_reason=result.stop_reason,
            tool_calls=calls, echo_tokens=echo_tokens, prompt_logprobs=result.prompt_logprobs,
            reasoning=reasoning,
        )  # fmt: skip
