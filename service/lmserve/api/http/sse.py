"""Server-Sent Events for the streamed endpoints, and the client's disconnect as a cancel.

    return await sse_response(request, call, chunks)   # chunks: each PresentedChoice -> its JSON chunks

The response opens once the first piece is there, so whatever ends a request before its first token (its
timeout: 504, the queue timeout: 503, a failed engine) is a plain HTTP error with its status; after that,
an error is a last `{"error": ...}` event before `data: [DONE]`. Closing the response (the client gone)
closes the call's stream, which aborts its engine requests and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from lmserve.api.accounting import observe_error
from lmserve.api.errors import APIError
from lmserve.api.presentation import PresentedChoice

if TYPE_CHECKING:
    from lmserve.api.generation_call import GenerationCall

log = logging.getLogger(__name__)

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return

async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, cancelling it if the client disconnects first (which aborts its engine work).

    The request body has been read by now, so the next `receive` only returns on disconnect.
    """
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise APIError("The client closed the connection.", "client_disconnected")
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()

def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"

class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its iterator, even when the client left mid-send.

    Closing it closes the engine streams under it, which aborts the requests and frees their KV blocks
    at once, instead of whenever the abandoned generator is garbage-collected. `on_close` runs last, also
    when the iterator never started (a client gone before the first chunk), whose `finally` never runs.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                self.on_close()



async def sse_response(
    request: Request,
    call: GenerationCall,
    chunks: Callable[[PresentedChoice], Iterable[dict[str, Any]]],
    usage_chunk: Callable[[], dict[str, Any]] | None = None,
) -> Response:
    """The call's stream as Server-Sent Events: `chunks(piece)` for each presented piece, then
    `usage_chunk()` if given, then [DONE]."""
    stream = call.stream()
    try:
        first = await until_disconnect(request, anext(stream))
    except StopAsyncIteration:
        first = None
    except BaseException:
        await stream.aclose()
        call.close()
        raise
    return ClosingStreamingResponse(
        _events(call, stream, first, chunks, usage_chunk),
        on_close=call.close,
        media_type="text/event-stream",
        headers={**SSE_HEADERS, **call.caller.response_headers},
    )


async def _events(
    call: GenerationCall,
    stream: AsyncIterator[PresentedChoice],
    first: PresentedChoice | None,
    chunks: Callable[[PresentedChoice], Iterable[dict[str, Any]]],
    usage_chunk: Callable[[], dict[str, Any]] | None,
) -> AsyncIterator[str]:
    try:
        async with aclosing(stream):  # type: ignore[type-var]
            if first is not None:
                for chunk in chunks(first):
                    yield sse(chunk)
            async for piece in stream:
                for chunk in chunks(piece):
                    yield sse(chunk)
        if usage_chunk is not None:
            yield sse(usage_chunk())
        yield SSE_DONE
    except APIError as exc:
        observe_error(call.state, call.caller.record, exc.code)
        yield sse(exc.to_dict())
        yield SSE_DONE
    except Exception:
        log.exception("%s stream failed", call.response_id)
        observe_error(call.state, call.caller.record, "internal_error")
        yield sse(APIError("Internal error while streaming.", "internal_error").to_dict())
        yield SSE_DONE
