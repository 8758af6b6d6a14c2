"""The gRPC stream reader on real lmserve.v1 messages."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lmload.grpc_stream import read_grpc_stream
from lmload.sse import StreamError
from lmserve.api.proto import lmserve_pb2 as pb


def _clock(*times: float):
    it: Iterator[float] = iter(times)
    return lambda: next(it)


def _chat(content: str = "", role: str = "", finish: str = "") -> pb.ChatChunk:
    return pb.ChatChunk(id="c", choices=[pb.ChatChoice(index=0, role=role, content=content, finish_reason=finish)])


def _usage(completion_tokens: int) -> pb.ChatChunk:
    return pb.ChatChunk(id="c", usage=pb.Usage(prompt_tokens=7, completion_tokens=completion_tokens, total_tokens=7 + completion_tokens))


def test_chat_stream_timing_and_text() -> None:
    messages = [_chat("He", role="assistant"), _chat("llo"), _chat("", finish="length"), _usage(3)]
    result = read_grpc_stream(messages, "chat", 0.0, clock=_clock(0.25, 0.3, 0.4, 0.45))
    assert result.ttft_s == pytest.approx(0.25)
    assert result.itl_s == pytest.approx([0.05, 0.1])
    assert result.latency_s == pytest.approx(0.4)
    assert (result.text, result.finish_reason, result.completion_tokens, result.prompt_tokens) == ("Hello", "length", 3, 7)


def test_completion_stream() -> None:
    messages = [
        pb.CompletionChunk(choices=[pb.CompletionChoice(index=0, text="x", token_ids=[5])]),
        pb.CompletionChunk(choices=[pb.CompletionChoice(index=0, text="y", token_ids=[6], finish_reason="length")]),
        pb.CompletionChunk(usage=pb.Usage(completion_tokens=2)),
    ]
    result = read_grpc_stream(messages, "completion", 0.0, clock=_clock(0.1, 0.2, 0.3))
    assert result.text == "xy" and result.num_token_chunks == 2


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([_chat("a"), _usage(1)], "no finish_reason"),
        ([_chat("a", finish="length")], "without its usage message"),
        ([_chat("a", finish="length"), _chat("b")], "continued after its finish_reason"),
        ([_chat("a", finish="length"), _usage(1), _chat("b")], "after the usage message"),
    ],
)
def test_broken_streams_are_errors(messages: list[pb.ChatChunk], message: str) -> None:
    with pytest.raises(StreamError, match=message):
        read_grpc_stream(messages, "chat", 0.0, clock=_clock(*[0.1 * i for i in range(1, 9)]))
