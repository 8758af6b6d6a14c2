"""The one async interface every generation engine offers (native engine, vLLM backend).

Usage from a transport:

    engine.check_request(req)               # raises RequestRejected (a clear 4xx) before anything is queued
    async for delta in engine.generate(req):  # deltas until one has finish_reason set
        ...
    # Leaving the loop early (break, exception, client disconnect -> aclose()) aborts the request
    # and frees its KV blocks at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from service.types import GenerationDelta, GenerationRequest


class RequestRejected(ValueError):
    """A request the engine can never serve (too long for the context or the KV pool).

    `code` is one of the string codes of api/errors.py (e.g. "context_length_exceeded").
    """

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


class EngineDeadError(RuntimeError):
    """The engine loop has died; every in-flight stream ends with this."""


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    block_size: int
    is_alive: bool

    @property
    def kv_usage(self) -> float:
        return self.num_kv_blocks_used / max(self.num_kv_blocks_total, 1)


class GenerationEngine(Protocol):
    model_name: str
    max_model_len: int

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def check_request(self, request: GenerationRequest) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]: ...

    def stats(self) -> EngineStats: ...
