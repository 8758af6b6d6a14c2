"""A real server (HTTP and gRPC on loopback) over a tiny random-weight Llama, one per test module or test.

The tiny model (tests/conftest.py) loads in about a second and steps in milliseconds, so the reliability
tests can run hundreds of requests, kill an engine, or hold a deadline within seconds. Where a test needs
steps to take longer (deadlines), it slows the forward through the runner's `fault_hook`, the same
test-only injection point the fault tests use to make a forward fail.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from lmserve.app import AppState
from lmserve.config import EngineConfig, LimitsConfig, ServeConfig
from lmserve.engine.engine import NativeEngine
from tests.api.conftest import LiveServer, served

API_KEY = "test-key-reliability"
MAX_MODEL_LEN = 512


def tiny_config(model_dir: Path, cache_dir: Path, limits: LimitsConfig, **engine: Any) -> ServeConfig:
    return ServeConfig(
        model=str(model_dir),
        embedding_model=None,
        cache_dir=cache_dir,
        api_keys=(API_KEY,),
        safety=False,
        drain_timeout_s=2.0,
        engine=replace(EngineConfig(dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN, num_kv_blocks=256), **engine),
        limits=limits,
    )


@contextmanager
def live_server(config: ServeConfig) -> Iterator[LiveServer]:
    """Load, serve HTTP and gRPC on loopback in a background thread, and stop it all afterwards."""
    with served(config, API_KEY) as server:
        yield server


def native(state: AppState) -> NativeEngine:
    engine = state.engine
    assert isinstance(engine, NativeEngine)
    return engine


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def wait_idle(state: AppState, timeout_s: float = 10.0) -> None:
    """Nothing running or waiting in the engine, no KV block held by a request, nothing in flight."""

    def idle() -> bool:
        stats = state.engine.stats()
        return (
            stats.num_running == 0
            and stats.num_waiting == 0
            and stats.num_kv_blocks_used == 0
            and state.lifecycle.in_flight == 0
            and state.admission.in_flight == 0
        )

    try:
        wait_until(idle, timeout_s, "the server is idle")
    except AssertionError:
        raise AssertionError(
            f"not idle after {timeout_s} s: {state.engine.stats()}, in flight {state.lifecycle.in_flight}, "
            f"admitted {state.admission.in_flight}"
        ) from None


@dataclass
class SSE:
    """One streamed response, parsed: its JSON events and whether [DONE] came last."""

    events: list[dict]
    done_last: bool


def read_sse(resp: httpx.Response) -> SSE:
    events: list[dict] = []
    saw_done = False
    done_last = False
    for line in resp.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            saw_done = done_last = True
            continue
        done_last = False
        assert not saw_done, "an event after [DONE]"
        events.append(json.loads(data))
    return SSE(events, done_last)
