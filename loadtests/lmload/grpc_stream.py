"""Reads and checks one lmserve.v1 generation stream (ChatStream or CompleteStream), timing its messages.

The same rules and timing as sse.py: a message with a choice that carries text, token ids or a finish
is a token message; the stream must end with one usage message after every choice has finished.
Violations raise sse.StreamError; the finish_reason and token count are judged by outcome.judge_ending.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from lmload.sse import StreamError, StreamKind, StreamResult


def read_grpc_stream(
    messages: Iterable[Any],
    kind: StreamKind,
    start_s: float,
    *,
    num_choices: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> StreamResult:
    first_s: float | None = None
    last_s: float | None = None
    itl_s: list[float] = []
    num_token_messages = 0
    finish: dict[int, str] = {}
    usage: Any = None
    text: list[str] = []
    for message in messages:
        now = clock()
        if usage is not None:
            raise StreamError("a message after the usage message")
        if message.HasField("usage"):
            usage = message.usage
        is_token = False
        for choice in message.choices:
            if choice.index in finish:
                raise StreamError(f"choice {choice.index} continued after its finish_reason")
            content = choice.text if kind == "completion" else choice.content
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
            if choice.index == 0:
                text.append(content)
            is_token |= bool(content or choice.token_ids or choice.finish_reason)
        if is_token:
            if first_s is None:
                first_s = now
            else:
                assert last_s is not None
                itl_s.append(now - last_s)
            last_s = now
            num_token_messages += 1
    missing = [i for i in range(num_choices) if i not in finish]
    if missing:
        raise StreamError(f"truncated: no finish_reason for choice(s) {missing}")
    if usage is None:
        raise StreamError("truncated: the stream ended without its usage message")
    if first_s is None or last_s is None:
        raise StreamError("no token message in the stream")
    return StreamResult(
        ttft_s=first_s - start_s,
        latency_s=last_s - start_s,
        itl_s=itl_s,
        num_token_chunks=num_token_messages,
        completion_tokens=usage.completion_tokens,
        prompt_tokens=usage.prompt_tokens,
        text="".join(text),
        finish_reason=finish[0],
    )
