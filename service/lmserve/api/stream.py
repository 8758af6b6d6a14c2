"""Running a plan: its engine requests as one stream of choice deltas, each fed to the run's account.

    async for choice_delta in stream_choices(engine, plan, metrics, record, screens, account): ...
    result = await collect_choices(engine, plan, metrics, record, screens)

`record` (the request's AccessRecord) gets the usage, finish reasons, first-token time and engine timings
when the stream ends; engine failures come out as APIErrors (`engine_error`). Closing the stream (or
cancelling the task running `collect_choices`) closes every engine stream, which aborts those requests and
frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING

from lmserve.api.account import ChoiceDelta, GenerationAccount, GenerationResult
from lmserve.api.errors import APIError
from lmserve.api.plan import GenerationParams, GenerationPlan, rejection_error
from lmserve.engine.base import (
    EngineDeadError,
    EngineFaultError,
    EngineStepError,
    EngineStoppedError,
    GenerationEngine,
    QueueTimeoutError,
    RequestRejected,
)
from lmserve.logs import AccessRecord
from lmserve.metrics import Metrics
from lmserve.types import FinishReason, GenerationDelta, GenerationRequest

if TYPE_CHECKING:
    from lmserve.safety.screen import ScreenedChoice

log = logging.getLogger(__name__)


def engine_error(exc: BaseException, plan: GenerationPlan | None = None) -> APIError:
    """The APIError a transport reports for an exception out of the engine (`plan`: the run it ended)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestRejected):
        params = plan.params if plan is not None else GenerationParams()
        return rejection_error(exc, params, max_model_len=0)
    if isinstance(exc, EngineFaultError):
        return APIError(
            "The generation engine failed while serving this request; the server is restarting. Retry.",
            "engine_failure",
        )
    if isinstance(exc, QueueTimeoutError):
        return APIError(
            f"The server is overloaded: the request waited {exc.waited_s:g} s in the queue without being "
            "scheduled. Retry shortly.",
            "queue_timeout",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, EngineStepError):
        return APIError(f"Generation failed for this request: {exc}", "internal_error")
    if isinstance(exc, EngineStoppedError):
        return APIError("The server is shutting down: this request was stopped before it finished.", "service_unavailable")
    if isinstance(exc, EngineDeadError):
        return APIError("The generation engine is not running.", "service_unavailable")
    return APIError("Internal error while generating.", "internal_error")


async def _merged(
    engine: GenerationEngine, requests: list[GenerationRequest], ended: set[int]
) -> AsyncIterator[ChoiceDelta]:
    """Interleave several engine streams as their deltas arrive; closing this closes them all. A choice
    whose index the consumer puts in `ended` is closed (its engine request aborted) at its next delta."""
    if len(requests) == 1:
        async with aclosing(engine.generate(requests[0], checked=True)) as stream:
            async for delta in stream:
                yield ChoiceDelta(0, delta)
                if ended:
                    return
        return

    queue: asyncio.Queue[tuple[int, GenerationDelta | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, request: GenerationRequest) -> None:
        try:
            async with aclosing(engine.generate(request, checked=True)) as stream:
                async for delta in stream:
                    if index in ended:
                        break
                    queue.put_nowait((index, delta))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which raises it
            queue.put_nowait((index, exc))
            return
        queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    try:
        num_open = len(tasks)
        while num_open:
            index, item = await queue.get()
            if item is None:
                num_open -= 1
            elif isinstance(item, BaseException):
                raise item
            elif index not in ended:
                yield ChoiceDelta(index, item)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def stream_choices(
    engine: GenerationEngine,
    plan: GenerationPlan,
    metrics: Metrics | None = None,
    record: AccessRecord | None = None,
    screens: Sequence[ScreenedChoice] | None = None,
    account: GenerationAccount | None = None,
) -> AsyncIterator[ChoiceDelta]:
    """The plan's choices as one stream of deltas; engine failures surface as APIError.

    Every delta the client gets goes into `account` (one is made if not given) before it is yielded,
    so the caller reads usage and results from it, during the stream and after.

    With `screens` (one per choice: its output guard and decision reporter), each choice's text goes out
    as its guard releases it; a choice the guard blocks ends with finish_reason content_filter and its
    engine request is aborted at once, freeing its KV blocks.
    """
    if account is None:
        # Output text is kept only for an access line that will show it.
        account = GenerationAccount.start(plan, keep_text=record is not None and record.log_prompts)
    ended: set[int] = set()
    log.debug("submitting %d sequences, %d prompt tokens", len(plan.requests), plan.num_prompt_tokens)
    try:
        async with aclosing(_merged(engine, plan.requests, ended)) as merged:
            async for choice in merged:
                delta = choice.delta
                if screens is not None:
                    delta = screens[choice.index].screen(delta)
                    if delta.finish_reason is FinishReason.CONTENT_FILTER:
                        ended.add(choice.index)
                    choice = ChoiceDelta(choice.index, delta)
                account.choices[choice.index].add(delta, time.monotonic())
                # No output at all (token ids may be dropped where the safety filter changed the text, so the
                # count is what tells).
                if delta.finish_reason is FinishReason.TIMEOUT and all(c.num_output_tokens == 0 for c in account.choices):
                    raise _timed_out(plan)
                if delta.finish_reason is not None:
                    account.observe(choice.index, metrics)
                    log.debug(
                        "sequence %s finished (%s) after %d tokens",
                        delta.request_id, delta.finish_reason.value, delta.num_output_tokens,
                    )
                yield choice
    except (RequestRejected, EngineDeadError, EngineStepError, QueueTimeoutError) as exc:
        raise engine_error(exc, plan) from exc
    finally:
        account.finish(metrics, record)
        if metrics is not None:
            metrics.e2e_request_latency_seconds.observe(time.monotonic() - account.submitted)


def _timed_out(plan: GenerationPlan) -> APIError:
    """The request's own timeout passed before any choice produced a token: nothing to return but why."""
    timeout_s = plan.requests[0].timeout_s if plan.requests else None
    return APIError(
        f"The request's timeout ({timeout_s:g} s) passed before its first token was generated.",
        "request_timeout",
    )



async def collect_choices(
    engine: GenerationEngine,
    plan: GenerationPlan,
    metrics: Metrics | None = None,
    record: AccessRecord | None = None,
    screens: Sequence[ScreenedChoice] | None = None,
) -> GenerationResult:
    """Run the plan to completion: each choice's text, tokens and logprobs, and the usage."""
    account = GenerationAccount.start(plan, keep_text=True)
    async with aclosing(stream_choices(engine, plan, metrics, record, screens, account)) as stream:
        async for _ in stream:
            pass
    return account.result()
