"""Engine faults, injected through the model runner's test-only `fault_hook` (a forward that raises) on a
real server over a tiny model, on both transports; and a fault confined to one request's row.

A failed forward is fatal to the engine: every open stream ends with an error (SSE error event then
[DONE]; gRPC INTERNAL), /readyz and gRPC health turn not-serving, new work gets 503 / UNAVAILABLE, and
`lmserve serve` exits 1 so that Kubernetes restarts it (checked on a real process).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.proto import lmserve_pb2_grpc as rpc
from lmserve.config import LimitsConfig
from lmserve.engine import step_loop
from lmserve.engine.scheduler import SchedulerOutput
from tests.api.conftest import LiveServer
from tests.cli_process import free_port, start_process, stop_process, wait_ready
from tests.reliability.conftest import live_server, native, tiny_config, wait_until

PROMPT_IDS = [1, 504, 3123, 314, 2752, 30, 198, 2000, 17, 86]
LAUNCHER = Path(__file__).with_name("fault_launcher.py")


class InjectedFault(RuntimeError):
    pass


def fail_forward(_: SchedulerOutput) -> None:
    raise InjectedFault("injected: the forward failed")


@pytest.fixture
def server(tiny_llama_dir: Path, cache_dir: Path) -> Iterator[LiveServer]:
    """A server of its own for each test: the fault kills its engine."""
    with live_server(tiny_config(tiny_llama_dir, cache_dir, LimitsConfig(max_tokens_cap=400))) as live:
        yield live


def _body(stream: bool, max_tokens: int = 400) -> dict:
    return {"prompt": PROMPT_IDS, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": stream}


async def _http_stream(client: httpx.AsyncClient, started: asyncio.Event) -> list[str]:
    """Every data line of one stream; `started` is set once its first token has arrived."""
    lines = []
    async with client.stream("POST", "/v1/completions", json=_body(True)) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                lines.append(line.removeprefix("data: "))
                if not started.is_set() and lines[-1] != "[DONE]" and "choices" in lines[-1]:
                    started.set()
    return lines


async def _grpc_stream(stub: rpc.GenerationStub, server: LiveServer, started: asyncio.Event) -> grpc.aio.AioRpcError:
    req = pb.CompletionRequest(prompt_token_ids=pb.TokenIds(ids=PROMPT_IDS), max_tokens=400, ignore_eos=True, temperature=0)
    try:
        async for chunk in stub.CompleteStream(req, metadata=server.grpc_metadata):
            if chunk.choices and chunk.choices[0].token_ids:
                started.set()
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the gRPC stream ended without an error")


async def _http_unary(client: httpx.AsyncClient) -> httpx.Response:
    return await client.post("/v1/completions", json=_body(False))


async def _grpc_unary(stub: rpc.GenerationStub, server: LiveServer) -> grpc.aio.AioRpcError:
    req = pb.CompletionRequest(prompt_token_ids=pb.TokenIds(ids=PROMPT_IDS), max_tokens=400, ignore_eos=True, temperature=0)
    try:
        await stub.Complete(req, metadata=server.grpc_metadata)
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the gRPC call ended without an error")


async def _health(channel: grpc.aio.Channel) -> int:
    resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    return resp.status


def test_a_failed_forward_ends_every_stream_and_the_server_refuses_work(server: LiveServer) -> None:
    engine = native(server.state)
    # Slow steps (5 ms) so that every stream is surely still open when the fault comes.
    engine.runner.fault_hook = lambda _: time.sleep(0.005)

    async def go() -> None:
        async with (
            httpx.AsyncClient(base_url=server.base_url, headers=server.headers, timeout=30) as client,
            grpc.aio.insecure_channel(server.grpc_target) as channel,
        ):
            stub = rpc.GenerationStub(channel)
            assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
            http_started = [asyncio.Event() for _ in range(2)]
            grpc_started = [asyncio.Event() for _ in range(2)]
            http_tasks = [asyncio.create_task(_http_stream(client, e)) for e in http_started]
            grpc_tasks = [asyncio.create_task(_grpc_stream(stub, server, e)) for e in grpc_started]
            # And a request of each transport that is not streamed.
            http_unary = asyncio.create_task(_http_unary(client))
            grpc_unary = asyncio.create_task(_grpc_unary(stub, server))
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in http_started + grpc_started)), 20)
            deadline = time.monotonic() + 20
            while engine.scheduler.num_running < 6:  # all six decoding when the fault comes
                assert time.monotonic() < deadline, "the six requests never ran together"
                await asyncio.sleep(0.02)
            engine.runner.fault_hook = fail_forward

            for lines in await asyncio.wait_for(asyncio.gather(*http_tasks), 20):
                assert lines[-1] == "[DONE]"
                error = json.loads(lines[-2])["error"]
                assert error["code"] == "engine_failure" and error["type"] == "server_error"
                assert all("choices" in json.loads(line) for line in lines[:-2])  # tokens, then the error
            for exc in await asyncio.wait_for(asyncio.gather(*grpc_tasks, grpc_unary), 20):
                assert exc.code() == grpc.StatusCode.INTERNAL
                assert dict(exc.trailing_metadata() or ())["lmserve-error-code"] == "engine_failure"
            failed = await asyncio.wait_for(http_unary, 20)
            assert failed.status_code == 500, failed.text
            assert failed.json()["error"]["code"] == "engine_failure"

            ready = await client.get("/readyz")
            assert ready.status_code == 503 and "not running" in ready.json()["error"]["message"]
            assert (await client.get("/livez")).status_code == 503
            for stream in (False, True):
                refused = await client.post("/v1/completions", json=_body(stream, 4))
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "service_unavailable"
                assert refused.headers["retry-after"] == "1"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Complete(pb.CompletionRequest(prompt="Hi", max_tokens=2), metadata=server.grpc_metadata)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            deadline = time.monotonic() + 5
            while await _health(channel) != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "gRPC health still SERVING"
                await asyncio.sleep(0.05)

    asyncio.run(go())
    assert isinstance(engine.fault, Exception) and "injected" in str(engine.fault)
    assert server.state.lifecycle.in_flight == 0


def test_a_sampling_error_on_one_row_fails_that_request_alone(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's sampler raises for the rows of requests whose id starts with "row-fault" (the real
    sampler samples every other row). Two such requests, one per transport, join batches already decoding
    two streams per transport: each fails alone (before its first token, so a 500 naming sampling on HTTP,
    INTERNAL on gRPC), its batch-mates finish with exactly the tokens they get when run alone, and
    the engine goes on serving."""
    engine = native(server.state)
    engine.runner.fault_hook = lambda _: time.sleep(0.01)  # slow steps: the bad ones surely join a busy batch
    real_sample = step_loop.sample
    mixed_batches = []

    def sample_failing_some_rows(logits, requests, generators):  # type: ignore[no-untyped-def]
        bad = [r.request_id.startswith("row-fault") for r in requests]
        if any(bad):
            mixed_batches.append(not all(bad))
            raise RuntimeError("injected: sampling this row failed")
        return real_sample(logits, requests, generators)

    monkeypatch.setattr(step_loop, "sample", sample_failing_some_rows)
    body = _body(False, 40)

    async def go() -> None:
        async with (
            httpx.AsyncClient(base_url=server.base_url, headers=server.headers, timeout=30) as client,
            grpc.aio.insecure_channel(server.grpc_target) as channel,
        ):
            stub = rpc.GenerationStub(channel)
            req = pb.CompletionRequest(prompt_token_ids=pb.TokenIds(ids=PROMPT_IDS), max_tokens=40, ignore_eos=True, temperature=0)
            started = asyncio.Event()

            async def http_tokens(request_id: str) -> list[int] | dict:
                resp = await client.post(
                    "/v1/completions", json={**body, "stream": True, "logprobs": 0}, headers={"x-request-id": request_id}
                )
                if resp.status_code != 200:  # failed before its first token: a plain HTTP error
                    assert resp.status_code == 500
                    return resp.json()["error"]
                events = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
                assert resp.text.rstrip().endswith("data: [DONE]")
                if "error" in events[-1]:
                    return events[-1]["error"]
                return [t for e in events for c in e["choices"] for t in (c["logprobs"] or {}).get("tokens", [])]

            async def grpc_tokens(request_id: str) -> list[int] | grpc.aio.AioRpcError:
                out: list[int] = []
                try:
                    async for chunk in stub.CompleteStream(req, metadata=server.grpc_metadata + (("x-request-id", request_id),)):
                        for choice in chunk.choices:
                            out.extend(choice.token_ids)
                            if choice.token_ids:
                                started.set()
                except grpc.aio.AioRpcError as exc:
                    return exc
                return out

            good = [asyncio.create_task(grpc_tokens(f"good-g{i}")) for i in range(2)]
            good += [asyncio.create_task(http_tokens(f"good-h{i}")) for i in range(2)]
            await asyncio.wait_for(started.wait(), 20)
            bad_http, bad_grpc = await asyncio.gather(http_tokens("row-fault-h"), grpc_tokens("row-fault-g"))
            assert isinstance(bad_http, dict) and bad_http["code"] == "internal_error", bad_http
            assert "sampling failed" in bad_http["message"]
            assert isinstance(bad_grpc, grpc.aio.AioRpcError) and bad_grpc.code() == grpc.StatusCode.INTERNAL
            together = await asyncio.gather(*good)
            alone = [await grpc_tokens("alone-g"), await http_tokens("alone-h")]
            assert all(isinstance(t, list) and len(t) == 40 for t in together + alone)
            assert together[0] == together[1] == alone[0]  # the batch-mates' output is what it is alone
            assert together[2] == together[3] == alone[1]

    asyncio.run(go())
    assert any(mixed_batches), "no bad row shared a batch with a good one"
    assert engine.is_alive and engine.fault is None
    assert (server.state.engine.stats().num_kv_blocks_used, server.state.lifecycle.in_flight) == (0, 0)


@pytest.mark.slow
def test_the_process_exits_non_zero_when_its_engine_fails(tiny_llama_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    """`lmserve serve` (lmserve.cli.main, in a process of its own) with a fault that fires once a trigger
    file exists: the open stream gets its error event and [DONE], then the process exits 1."""
    trigger = tmp_path / "fail-now"
    port, grpc_port = free_port(), free_port()
    argv = [
        sys.executable, str(LAUNCHER), str(trigger), "serve", "--model", str(tiny_llama_dir), "--embedding-model",
        "none", "--no-safety", "--dtype", "float32", "--device", "cpu", "--num-kv-blocks", "64", "--max-model-len",
        "512", "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port), "--cache-dir",
        str(cache_dir), "--log-format", "text",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "service")}
    env.pop("LMSERVE_API_KEYS", None)
    log_path = tmp_path / "server.log"
    proc = start_process(argv, log_path, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(proc, base, log_path)
        lines = []
        with httpx.stream("POST", f"{base}/v1/completions", json=_body(True), timeout=30) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    lines.append(line.removeprefix("data: "))
                    trigger.touch()
        assert lines[-1] == "[DONE]" and json.loads(lines[-2])["error"]["code"] == "engine_failure"
        assert proc.wait(timeout=30) == 1, log_path.read_text()
        assert "error: the generation engine failed" in log_path.read_text()
    finally:
        stop_process(proc, grace_s=0)
