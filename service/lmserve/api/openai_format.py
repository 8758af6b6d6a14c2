"""Turn engine output (deltas, aggregated choices) into OpenAI's JSON shapes.

Completions and chat differ only in how a choice and its logprobs look; both are built here so
streaming chunks and non-streaming responses agree field for field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmserve.api import schemas
from lmserve.api.generation import ChoiceResult, Usage
from lmserve.api.tools import ToolCall, ToolEvent, ToolPlan, parse_output
from lmserve.types import FinishReason, TokenLogprob


def finish_reason_str(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value


def usage_model(usage: Usage) -> schemas.UsageInfo:
    return schemas.UsageInfo(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


# -- completions logprobs ----------------------------------------------------------------------------------


def _top_dict(tok: TokenLogprob) -> dict[str, float]:
    top = {t.token: t.logprob for t in tok.top}
    top.setdefault(tok.token, tok.logprob)  # the sampled token is always listed (as vLLM does)
    return top


@dataclass
class CompletionLogprobsBuilder:
    """Builds `{tokens, token_logprobs, top_logprobs, text_offset}` incrementally.

    `text_offset` is each token's character offset in the choice's text (echoed prompt included).
    """

    offset: int = 0

    def prompt(self, token_strs: list[str]) -> schemas.CompletionLogprobs:
        """Echoed prompt tokens: listed with null logprobs (prompts are not scored)."""
        out = schemas.CompletionLogprobs()
        for tok in token_strs:
            out.tokens.append(tok)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            out.text_offset.append(self.offset)
            self.offset += len(tok)
        return out

    def tokens(self, logprobs: list[TokenLogprob]) -> schemas.CompletionLogprobs:
        out = schemas.CompletionLogprobs()
        for tok in logprobs:
            out.tokens.append(tok.token)
            out.token_logprobs.append(tok.logprob)
            out.top_logprobs.append(_top_dict(tok))
            out.text_offset.append(self.offset)
            self.offset += len(tok.token)
        return out


def merge_completion_logprobs(parts: list[schemas.CompletionLogprobs]) -> schemas.CompletionLogprobs:
    out = schemas.CompletionLogprobs()
    for part in parts:
        out.tokens.extend(part.tokens)
        out.token_logprobs.extend(part.token_logprobs)
        out.top_logprobs.extend(part.top_logprobs)
        out.text_offset.extend(part.text_offset)
    return out


# -- chat logprobs ---------------------------------------------------------------------------------------


def chat_logprobs(logprobs: list[TokenLogprob], num_top: int) -> schemas.ChatLogprobs:
    content = [
        schemas.ChatTokenLogprob(
            token=tok.token,
            logprob=tok.logprob,
            bytes=list(tok.token.encode("utf-8")),
            top_logprobs=[
                schemas.ChatTopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode("utf-8")))
                for t in tok.top[:num_top]
            ],
        )
        for tok in logprobs
    ]
    return schemas.ChatLogprobs(content=content)


# -- non-streaming responses ------------------------------------------------------------------------------


def tool_call_dict(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def chat_choice(choice: ChoiceResult, want_logprobs: bool, num_top: int, tool_plan: ToolPlan | None = None) -> schemas.ChatChoice:
    message = schemas.ChatResponseMessage(content=choice.text)
    finish_reason = finish_reason_str(choice.finish_reason)
    if tool_plan is not None and tool_plan.parses_calls:
        parsed = parse_output(tool_plan, choice.text)
        calls = [tool_call_dict(c) for c in parsed.tool_calls]
        message = schemas.ChatResponseMessage(content=parsed.content, tool_calls=calls or None)
        finish_reason = tool_plan.finish_reason(bool(calls), choice.finish_reason)
    return schemas.ChatChoice(
        index=choice.index,
        message=message,
        logprobs=chat_logprobs(choice.logprobs or [], num_top) if want_logprobs else None,
        finish_reason=finish_reason,
        stop_reason=choice.stop_reason,
    )


def chat_delta(events: list[ToolEvent]) -> dict[str, Any]:
    """A streamed chat delta from a ToolStreamParser's events: content joined, tool-call pieces listed."""
    delta: dict[str, Any] = {}
    content = "".join(e.content for e in events if e.content is not None)
    if content:
        delta["content"] = content
    calls = []
    for e in events:
        if e.content is not None:
            continue
        if e.id is not None:
            calls.append({"index": e.index, "id": e.id, "type": "function", "function": {"name": e.name, "arguments": e.arguments or ""}})
        elif e.arguments:
            calls.append({"index": e.index, "function": {"arguments": e.arguments}})
    if calls:
        delta["tool_calls"] = calls
    return delta


# -- streaming chunks (plain dicts: built per token, so kept cheap) ----------------------------------------


@dataclass
class ChunkHeader:
    id: str
    object: str
    created: int
    model: str
    extra: dict[str, Any] = field(default_factory=dict)

    def chunk(self, choices: list[dict[str, Any]], usage: schemas.UsageInfo | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            out["usage"] = usage.model_dump()
        return out
