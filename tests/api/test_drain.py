"""SIGTERM drains: readyz and gRPC health turn not-ready at once, new requests are refused (503 /
UNAVAILABLE) on both transports, the streams in flight over HTTP and gRPC finish, the process exits 0.

Runs `lmserve.app.run` in a subprocess (signals need a main thread of their own), generation model only.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.proto import lmserve_pb2_grpc as rpc
from tests.cli_process import free_port, start_process, stop_process, wait_ready

MAX_TOKENS = 32
STREAM_TIMEOUT_S = 240  # generous: float32 on a loaded 2-core machine


def test_sigterm_drains_in_flight_then_exits(cache_dir: Path, smollm2_dir: Path, tmp_path: Path) -> None:
    port, grpc_port = free_port(), free_port()
    # The safety filter off: it may hold a sampled answer's text to its end, and then the streams would be
    # over before SIGTERM (the test sends it once the first chunk of each has arrived).
    script = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from pathlib import Path\n"
        "from lmserve.app import run\n"
        "from lmserve.config import EngineConfig, ServeConfig\n"
        f"run(ServeConfig(model='smollm2-135m-instruct', embedding_model=None, cache_dir=Path({str(cache_dir)!r}),"
        f" port={port}, grpc_port={grpc_port}, drain_timeout_s={STREAM_TIMEOUT_S}, safety=False,"
        " engine=EngineConfig(dtype='float32', device='cpu', max_model_len=256, num_kv_blocks=64)))\n"
    )
    log_path = tmp_path / "server.log"
    proc = start_process([sys.executable, "-c", script], log_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(proc, base, log_path)

        events: list[str] = []
        first_chunk = threading.Event()
        grpc_chunks: list[pb.CompletionChunk] = []
        grpc_first = threading.Event()
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING

        grpc_errors: list[grpc.RpcError] = []

        def grpc_stream() -> None:
            req = pb.CompletionRequest(prompt="Count to one hundred:", max_tokens=MAX_TOKENS, ignore_eos=True)
            try:
                for chunk in rpc.GenerationStub(channel).CompleteStream(req, timeout=STREAM_TIMEOUT_S):
                    grpc_chunks.append(chunk)
                    grpc_first.set()
            except grpc.RpcError as error:
                grpc_errors.append(error)

        def stream() -> None:
            body = {"prompt": "Count to one hundred:", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=STREAM_TIMEOUT_S) as resp:
                for line in resp.iter_lines():
                    if line:
                        events.append(line)
                        first_chunk.set()

        reader = threading.Thread(target=stream)
        reader.start()
        grpc_reader = threading.Thread(target=grpc_stream)
        grpc_reader.start()
        assert first_chunk.wait(60) and grpc_first.wait(60)
        proc.send_signal(signal.SIGTERM)

        ready = None
        for _ in range(50):
            ready = httpx.get(f"{base}/readyz", timeout=2)
            if ready.status_code == 503:
                break
            time.sleep(0.05)
        assert ready is not None and ready.status_code == 503
        assert "draining" in ready.json()["error"]["message"]
        assert httpx.get(f"{base}/livez", timeout=2).status_code == 200
        refused = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "service_unavailable"
        assert refused.headers["retry-after"] == "1"
        for _ in range(50):
            if health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.05)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        try:
            rpc.GenerationStub(channel).Complete(pb.CompletionRequest(prompt="hi", max_tokens=1), timeout=10)
            raise AssertionError("a new RPC was served while draining")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE

        grpc_reader.join(STREAM_TIMEOUT_S)
        assert not grpc_errors, grpc_errors
        assert grpc_chunks[-1].usage.completion_tokens == MAX_TOKENS
        assert grpc_chunks[-2].choices[0].finish_reason == "length"  # ran to the end, not aborted
        channel.close()
        reader.join(STREAM_TIMEOUT_S)
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # ran to the end, not aborted
        assert proc.wait(timeout=STREAM_TIMEOUT_S) == 0, log_path.read_text()
    finally:
        stop_process(proc, grace_s=0)
