"""Presented choices (api/presentation.py) in OpenAI's JSON shapes: whole choices for responses, and the
chunks of a stream. Completions and chat differ only in how a choice and its logprobs look; responses and
chunks are built from the same pieces so they agree field for field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi.responses import Response

from lmserve.api.account import Usage
from lmserve.api.http import schemas
from lmserve.api.presentation import PresentedChoice, ToolCallPiece
from lmserve.types import PromptLogprob, TokenLogprob


def json_response(model: Any, headers: dict[str, str]) -> Response:
    return Response(model.model_dump_json(), media_type="application/json", headers=headers)


def usage_model(usage: Usage) -> schemas.GenerationUsage:
    return schemas.GenerationUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        prompt_tokens_details=schemas.PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


# -- prompt logprobs (vLLM's shape) ---------------------------------------------------------------------

# JSON has no -inf: vLLM reports a prompt token the model rules out as this.
MIN_LOGPROB = -9999.0


def _prompt_value(token: str, logprob: float, rank: int) -> dict[str, Any]:
    return {"logprob": max(logprob, MIN_LOGPROB), "rank": rank, "decoded_token": token}


def prompt_logprobs_json(entries: list[PromptLogprob | None] | None) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's prompt_logprobs: per prompt token (the first null), token id -> {logprob, rank, decoded_token}
    for the prompt's token and the top alternatives (ranked 1, 2, ...)."""
    if entries is None:
        return None
    out: list[dict[str, dict[str, Any]] | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        scores = {str(t.token_id): _prompt_value(t.token, t.logprob, rank) for rank, t in enumerate(entry.top, 1)}
        scores.setdefault(str(entry.token_id), _prompt_value(entry.token, entry.logprob, entry.rank))
        out.append(scores)
    return out


# -- completions logprobs ----------------------------------------------------------------------------------


def _top_dict(tok: TokenLogprob) -> dict[str, float]:
    top = {t.token: t.logprob for t in tok.top}
    top.setdefault(tok.token, tok.logprob)  # the sampled token is always listed (as vLLM does)
    return top


@dataclass
class CompletionLogprobsBuilder:
    """Builds one choice's `{tokens, token_logprobs, top_logprobs, text_offset}`, piece by piece.

    `text_offset` is each token's character offset in the choice's text (echoed prompt included);
    echoed prompt tokens are listed with null logprobs (echo does not score them; `prompt_logprobs` does).
    """

    offset: int = 0

    def build(self, piece: PresentedChoice) -> schemas.CompletionLogprobs:
        out = schemas.CompletionLogprobs()
        for token in piece.echo_tokens or ():
            self._add(out, token, None, None)
        for tok in piece.logprobs or ():
            self._add(out, tok.token, tok.logprob, _top_dict(tok))
        return out

    def _add(self, out: schemas.CompletionLogprobs, token: str, logprob: float | None, top: dict[str, float] | None) -> None:
        out.tokens.append(token)
        out.token_logprobs.append(logprob)
        out.top_logprobs.append(top)
        out.text_offset.append(self.offset)
        self.offset += len(token)


def completion_choice(piece: PresentedChoice, want_logprobs: bool) -> schemas.CompletionChoice:
    return schemas.CompletionChoice(
        index=piece.index,
        text=piece.content or "",
        logprobs=CompletionLogprobsBuilder().build(piece) if want_logprobs else None,
        finish_reason=piece.finish_reason,
        stop_reason=piece.stop_reason,
        prompt_logprobs=prompt_logprobs_json(piece.prompt_logprobs),
    )


class CompletionChunks:
    """A stream's pieces -> their completion chunks (a choice's text offsets run on across its pieces)."""

    def __init__(self, header: ChunkHeader, num_choices: int, want_logprobs: bool) -> None:
        self.header = header
        self.want_logprobs = want_logprobs
        self.builders = [CompletionLogprobsBuilder() for _ in range(num_choices)]

    def __call__(self, piece: PresentedChoice) -> list[dict[str, Any]]:
        if not piece.has_text_or_end:
            return []
        logprobs = self.builders[piece.index].build(piece).model_dump() if self.want_logprobs else None
        choice = {
            "index": piece.index,
            "text": piece.content or "",
            "logprobs": logprobs,
            "finish_reason": piece.finish_reason,
            "stop_reason": piece.stop_reason,
        }
        if piece.prompt_logprobs is not None:  # the choice's first chunk
            choice["prompt_logprobs"] = prompt_logprobs_json(piece.prompt_logprobs)
        return [self.header.chunk([choice])]


# -- chat ------------------------------------------------------------------------------------------------


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


def _tool_call(call: ToolCallPiece) -> dict[str, Any]:
    """A whole call, or a streamed piece of one (OpenAI's delta: id, type and name on the first piece)."""
    if call.id is None:
        return {"index": call.index, "function": {"arguments": call.arguments}}
    return {"index": call.index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def chat_choice(piece: PresentedChoice, want_logprobs: bool, num_top: int) -> schemas.ChatChoice:
    calls = [{k: v for k, v in _tool_call(c).items() if k != "index"} for c in piece.tool_calls]
    return schemas.ChatChoice(
        index=piece.index,
        message=schemas.ChatResponseMessage(content=piece.content, reasoning_content=piece.reasoning, tool_calls=calls or None),
        logprobs=chat_logprobs(piece.logprobs or [], num_top) if want_logprobs else None,
        finish_reason=piece.finish_reason,
        stop_reason=piece.stop_reason,
    )


@dataclass
class ChatChunks:
    """A stream's pieces -> their chat chunks: a choice's first piece is preceded by its role chunk."""

    header: ChunkHeader
    want_logprobs: bool
    num_top: int
    has_sent_prompt_logprobs: bool = False

    def __call__(self, piece: PresentedChoice) -> list[dict[str, Any]]:
        out = []
        if piece.is_first:
            role = {"index": piece.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            out.append(self.header.chunk([role]))
            if piece.prompt_logprobs is not None and not self.has_sent_prompt_logprobs:
                # Top level, as in a response; once per stream (every choice has the one prompt's scores).
                out[-1]["prompt_logprobs"] = prompt_logprobs_json(piece.prompt_logprobs)
                self.has_sent_prompt_logprobs = True
        logprobs = None
        if self.want_logprobs and piece.logprobs:
            logprobs = chat_logprobs(piece.logprobs, self.num_top).model_dump()
        delta: dict[str, Any] = {"reasoning_content": piece.reasoning} if piece.reasoning else {}
        if piece.content:
            delta["content"] = piece.content
        if piece.tool_calls:
            delta["tool_calls"] = [_tool_call(c) for c in piece.tool_calls]
        if piece.finish_reason is None:
            if delta or logprobs is not None:
                choice = {"index": piece.index, "delta": delta or {"content": ""}, "logprobs": logprobs, "finish_reason": None}
                out.append(self.header.chunk([choice]))
            return out
        choice = {
            "index": piece.index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": piece.finish_reason,
            "stop_reason": piece.stop_reason,
        }
        out.append(self.header.chunk([choice]))
        return out


# -- streaming chunks (plain dicts: built per token, so kept cheap) ----------------------------------------


@dataclass
class ChunkHeader:
    id: str
    object: str
    created: int
    model: str

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
