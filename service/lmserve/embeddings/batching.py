"""The encoder models' queue (worker.py): one item per input sequence (a request's inputs may be spread over
several batches), how the worker cuts the next batch from it (`select_batch`), and how a finished request is
answered on its caller's event loop."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any

# How many queued sequences the worker looks at when filling one batch.
_SCAN_LIMIT = 4096


@dataclass(frozen=True)
class CheckedInputs:
    """Token-id inputs and dimensions that Embedder.validate accepted: what Embedder.submit takes."""

    inputs: list[list[int]]
    dimensions: int | None = None


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: list[list[float]]  # one per input, in input order
    num_tokens: list[int]  # tokens each input used (its prompt_tokens share)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


@dataclass(frozen=True)
class EmbeddingBatchStats:
    """What one forward did; handed to the embedder's (or reranker's) `on_batch` hook (metrics)."""

    num_inputs: int
    num_tokens: int  # real tokens
    num_padding_tokens: int  # pad positions the forward computed as well


@dataclass(eq=False)
class EmbedRequest:
    """One request's sequences in the queue; its future gets one output per sequence, in input order
    (a vector from the embedder, a score from the reranker)."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[Any]]
    dimensions: int | None
    num_tokens: list[int]
    outputs: list[Any]
    remaining: int
    done: bool = False  # set by the worker (finished/failed) or by submit (cancelled); read by the worker


@dataclass(eq=False)
class EmbedItem:
    request: EmbedRequest
    index: int
    ids: list[int]
    type_ids: list[int] | None = None  # token type (segment) ids of a sentence pair, for models that take them


def _resolve(future: asyncio.Future[list[Any]], result: list[Any] | None, error: BaseException | None) -> None:
    """Runs on the request's loop."""
    if future.done():  # cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


def select_batch(queue: deque[EmbedItem], max_batch_tokens: int) -> list[EmbedItem]:
    """Under the queue's lock: take the next batch from the queue.

    The oldest live sequence always goes (so nothing starves). Around it, in length order,
    the batch grows one neighbour at a time, always by the candidate that adds the least
    padding, while padded length x count stays within max_batch_tokens and the padding a
    candidate adds is no more than the real tokens it brings (a much shorter or longer
    sequence waits for a batch of its own kind instead).
    """
    while queue and queue[0].request.done:
        queue.popleft()
    if not queue:
        return []
    budget = max_batch_tokens
    scan_len = min(len(queue), _SCAN_LIMIT)
    scan = [queue[k] for k in range(scan_len)]
    live = [k for k in range(scan_len) if not scan[k].request.done]  # live[0] == 0: the head
    order = sorted(live, key=lambda k: len(scan[k].ids))  # stable: older first among equals
    pos = order.index(0)
    lo, hi = pos - 1, pos + 1
    chosen = [0]
    max_len = len(scan[0].ids)
    while True:
        n = len(chosen)
        best: tuple[int, str] | None = None  # (added padding, side)
        if lo >= 0:
            length = len(scan[order[lo]].ids)
            waste = max_len - length
            if max_len * (n + 1) <= budget and waste <= length:
                best = (waste, "lo")
        if hi < len(order):
            length = len(scan[order[hi]].ids)
            waste = (length - max_len) * n
            if length * (n + 1) <= budget and waste <= length and (best is None or waste < best[0]):
                best = (waste, "hi")
        if best is None:
            break
        if best[1] == "lo":
            chosen.append(order[lo])
            lo -= 1
        else:
            chosen.append(order[hi])
            max_len = len(scan[order[hi]].ids)
            hi += 1
    taken = set(chosen)
    rest = [scan[k] for k in live if k not in taken]
    for _ in range(scan_len):
        queue.popleft()
    queue.extendleft(reversed(rest))
    return [scan[k] for k in chosen]


def answer(req: EmbedRequest, result: list[Any] | None, error: BaseException | None) -> None:
    """From the worker thread: resolve the request's future on its own event loop."""
    try:
        req.loop.call_soon_threadsafe(_resolve, req.future, result, error)
    except RuntimeError:  # the caller's loop is closed; nobody is waiting
        pass
