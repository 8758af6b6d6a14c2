"""Reads and checks one OpenAI-style Server-Sent-Events stream, timing its chunks as they arrive.

Timing follows `vllm bench serve`, so that the two agree on the same server: a chunk with at least one
choice is a token chunk (a chat stream's opening role-only chunk is not); time to first token runs from
the request's start to the first token chunk, inter-token latencies are the gaps between token chunks,
and a request's latency ends at its last token chunk.

A stream is complete only when every choice has a finish_reason, a usage chunk came (when asked for),
and `data: [DONE]` ended it. Anything else (an `{"error": ...}` event, a chunk that is not JSON or lacks
the fields of its kind, a stream that stops early) raises StreamError. Whether its finish_reason and
token count are what the run asked for is outcome.judge_ending's question, not the reader's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

StreamKind = Literal["chat", "completion"]


class StreamError(Exception):
    """The stream was malformed, carried an error event, or ended early."""


@dataclass
class StreamResult:
    ttft_s: float
    latency_s: float  # to the last token chunk
    itl_s: list[float]  # gaps between consecutive token chunks
    num_token_chunks: int
    completion_tokens: int | None  # from the usage chunk
    prompt_tokens: int | None
    text: str  # choice 0's text
    finish_reason: str

    @property
    def tpot_s(self) -> float | None:
        """(latency - TTFT) / (completion tokens - 1), as vllm bench defines it; None below 2 tokens."""
        tokens = self.completion_tokens if self.completion_tokens is not None else self.num_token_chunks
        if tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (tokens - 1)


@dataclass
class OpenAIStreamReader:
    """Feed it the body's lines in order (`feed_line`), then call `finish`."""

    kind: StreamKind
    start_s: float
    clock: Callable[[], float] = time.perf_counter
    _data: list[str] = field(default_factory=list)
    _done: bool = False
    _first_s: float | None = None
    _last_s: float | None = None
    _itl_s: list[float] = field(default_factory=list)
    _num_token_chunks: int = 0
    _finish: dict[int, str] = field(default_factory=dict)
    _usage: dict[str, Any] | None = None
    _text: list[str] = field(default_factory=list)

    @property
    def num_token_chunks(self) -> int:
        return self._num_token_chunks

    def feed_line(self, raw: bytes | str) -> None:
        line = (raw.decode("utf-8") if isinstance(raw, bytes) else raw).rstrip("\r\n")
        if not line:
            if self._data:
                payload, self._data = "\n".join(self._data), []
                self._on_event(payload)
            return
        if line.startswith(":"):  # an SSE comment (keep-alive)
            return
        name, _, value = line.partition(":")
        if name == "data":
            if self._done:
                raise StreamError(f"data after [DONE]: {value[:80]!r}")
            self._data.append(value[1:] if value.startswith(" ") else value)
        elif name not in ("event", "id", "retry"):
            raise StreamError(f"not an SSE line: {line[:80]!r}")

    def _on_event(self, payload: str) -> None:
        if payload == "[DONE]":
            self._done = True
            return
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise StreamError(f"chunk is not JSON ({exc.msg}): {payload[:80]!r}") from None
        if not isinstance(chunk, dict):
            raise StreamError(f"chunk is not an object: {payload[:80]!r}")
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise StreamError(f"error event: {message}")
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise StreamError(f"chunk without a choices list: {payload[:80]!r}")
        usage = chunk.get("usage")
        if usage is not None:
            if not isinstance(usage, dict) or not isinstance(usage.get("completion_tokens"), int):
                raise StreamError(f"malformed usage: {usage!r}")
            self._usage = usage
        now = self.clock()
        is_token_chunk = False
        for choice in choices:
            is_token_chunk |= self._on_choice(choice)
        if is_token_chunk:
            if self._first_s is None:
                self._first_s = now
            else:
                assert self._last_s is not None
                self._itl_s.append(now - self._last_s)
            self._last_s = now
            self._num_token_chunks += 1

    def _on_choice(self, choice: Any) -> bool:
        """Checks one choice; True when it carries a token (text or a finish)."""
        if not isinstance(choice, dict) or not isinstance(choice.get("index"), int):
            raise StreamError(f"malformed choice: {choice!r:.80}")
        index = choice["index"]
        if index in self._finish:
            raise StreamError(f"choice {index} continued after its finish_reason")
        if self.kind == "completion":
            text = choice.get("text")
            if not isinstance(text, str):
                raise StreamError(f"completion choice without text: {choice!r:.80}")
        else:
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                raise StreamError(f"chat choice without a delta: {choice!r:.80}")
            text = delta.get("content") or ""
            if not isinstance(text, str):
                raise StreamError(f"chat delta content is not a string: {delta!r:.80}")
        finish = choice.get("finish_reason")
        if finish is not None:
            if not isinstance(finish, str):
                raise StreamError(f"finish_reason is not a string: {finish!r}")
            self._finish[index] = finish
        if index == 0:
            self._text.append(text)
        if self.kind == "chat":
            return bool(text) or finish is not None
        return True

    def finish(self, *, num_choices: int = 1, require_usage: bool = True) -> StreamResult:
        if self._data:
            raise StreamError("the stream ended inside an event")
        if not self._done:
            raise StreamError("truncated: the stream ended without data: [DONE]")
        missing = [i for i in range(num_choices) if i not in self._finish]
        if missing:
            raise StreamError(f"truncated: no finish_reason for choice(s) {missing}")
        if require_usage and self._usage is None:
            raise StreamError("no usage chunk (stream_options.include_usage was set)")
        completion_tokens = self._usage["completion_tokens"] if self._usage else None
        if self._first_s is None or self._last_s is None:
            raise StreamError("no token chunk in the stream")
        return StreamResult(
            ttft_s=self._first_s - self.start_s,
            latency_s=self._last_s - self.start_s,
            itl_s=self._itl_s,
            num_token_chunks=self._num_token_chunks,
            completion_tokens=completion_tokens,
            prompt_tokens=self._usage.get("prompt_tokens") if self._usage else None,
            text="".join(self._text),
            finish_reason=self._finish[0],
        )
