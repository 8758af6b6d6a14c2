"""The SSE reader on hand-written streams: what it times, what it accepts and what it rejects."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from lmload.sse import OpenAIStreamReader, StreamError, StreamResult


def _clock(*times: float):
    it: Iterator[float] = iter(times)
    return lambda: next(it)


def _event(payload: Any) -> list[str]:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return [f"data: {data}\r\n", "\r\n"]


def _completion(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def _chat(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _usage(completion_tokens: int, prompt_tokens: int = 5) -> dict[str, Any]:
    return {"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                     "total_tokens": prompt_tokens + completion_tokens}}


def _read(kind: str, lines: list[str], clock, **finish_kwargs: Any) -> StreamResult:
    reader = OpenAIStreamReader(kind, start_s=0.0, clock=clock)  # type: ignore[arg-type]
    for line in lines:
        reader.feed_line(line.encode())
    return reader.finish(**finish_kwargs)


def test_completion_stream_timing_follows_vllm_bench() -> None:
    lines = [": keep-alive\n", "\n"]
    for payload in (_completion("Hel"), _completion("lo"), _completion("!", "length"), _usage(3), "[DONE]"):
        lines += _event(payload)
    # one clock reading per JSON event: three token chunks, then the usage chunk
    result = _read("completion", lines, _clock(0.2, 0.3, 0.45, 0.5))
    assert result.ttft_s == pytest.approx(0.2)
    assert result.itl_s == pytest.approx([0.1, 0.15])
    assert result.latency_s == pytest.approx(0.45)
    assert result.tpot_s == pytest.approx((0.45 - 0.2) / 2)
    assert (result.num_token_chunks, result.completion_tokens, result.prompt_tokens) == (3, 3, 5)
    assert (result.text, result.finish_reason) == ("Hello!", "length")


def test_chat_role_chunk_is_not_the_first_token() -> None:
    lines: list[str] = []
    payloads = (_chat({"role": "assistant", "content": ""}), _chat({"content": "Hi"}), _chat({}, "stop"), _usage(2))
    for payload in (*payloads, "[DONE]"):
        lines += _event(payload)
    result = _read("chat", lines, _clock(0.1, 0.4, 0.6, 0.7))
    assert result.ttft_s == pytest.approx(0.4)
    assert result.itl_s == pytest.approx([0.2])
    assert result.text == "Hi" and result.finish_reason == "stop"


def _stream(*payloads: Any) -> list[str]:
    lines: list[str] = []
    for payload in payloads:
        lines += _event(payload)
    return lines


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (_stream(_completion("a"), {"error": {"message": "boom", "code": "internal_error"}}, "[DONE]"), "error event: boom"),
        (_stream(_completion("a"), "{not json", "[DONE]"), "not JSON"),
        (_stream({"object": "text_completion"}), "without a choices list"),
        (_stream(_completion("a"), _completion("b", "length"), _usage(2)), "without data: [DONE]"),
        (_stream(_completion("a"), _usage(1), "[DONE]"), "no finish_reason"),
        (_stream(_completion("a", "length"), "[DONE]"), "no usage chunk"),
        (_stream(_completion("a", "length"), _completion("b")), "continued after its finish_reason"),
        (_stream(_completion("a", "length"), _usage(1), "[DONE]", _completion("b")), "data after [DONE]"),
        (["data: " + json.dumps(_completion("a", "length")) + "\n"], "ended inside an event"),
        (["garbage line\n"], "not an SSE line"),
        (_stream({"choices": [{"index": 0, "finish_reason": None}]}), "completion choice without text"),
    ],
)
def test_broken_streams_are_errors(lines: list[str], message: str) -> None:
    with pytest.raises(StreamError, match=re.escape(message)):
        _read("completion", lines, _clock(*[0.1 * i for i in range(1, 20)]))


def test_a_stream_the_filter_ended_is_complete() -> None:
    # Fewer tokens than asked for: whether that is a truncation is outcome.judge_ending's question.
    payloads = (_chat({"role": "assistant", "content": ""}), _chat({"content": "Hi"}), _chat({}, "content_filter"), _usage(2))
    result = _read("chat", _stream(*payloads, "[DONE]"), _clock(0.1, 0.2, 0.3, 0.4))
    assert (result.finish_reason, result.completion_tokens, result.text) == ("content_filter", 2, "Hi")
