"""gRPC (lmserve.v1) against the real server on loopback, with a real grpc.aio channel.

The servers of conftest.py serve gRPC beside HTTP over the same state, so these tests also show that the
two transports share one engine, one set of keys, one rate-limit budget and one admission queue.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from lmserve.api.errors import ERRORS
from lmserve.api.grpc.rpcs import METHODS
from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.proto import lmserve_pb2_grpc as rpc
from tests.api.conftest import (
    GRPC_QUEUE_KEY,
    GRPC_RATE_KEY,
    LIMITED_RPM,
    MAX_BODY_BYTES,
    MAX_MODEL_LEN,
    LiveServer,
    Servers,
    metric_value,
)

MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def _trailers(error: grpc.aio.AioRpcError) -> dict[str, str]:
    return {k: v for k, v in error.trailing_metadata() or ()}


async def _error_of(awaitable: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value


async def _stream_error(stream: AsyncIterator[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stream:
            pass
    return info.value


def _channel(server: LiveServer) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(server.grpc_target)


# -- every RPC --------------------------------------------------------------------------------------------


def test_every_method_of_the_proto_is_served() -> None:
    declared = {
        f"/lmserve.v1.{service.name}/{method.name}"
        for service in pb.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert {m.path for m in METHODS} == declared
    assert len(declared) == 16


def test_complete_and_stream(server: LiveServer) -> None:
    async def go() -> None:
        async with _channel(server) as channel:
            stub = rpc.GenerationStub(channel)
            req = pb.CompletionRequest(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
            call = stub.Complete(req, metadata=server.grpc_metadata + (("x-request-id", "grpc-unary-1"),))
            resp = await call
            assert resp.id.startswith("cmpl-") and resp.model == MODEL
            [choice] = resp.choices
            assert choice.finish_reason == "length" and len(choice.token_ids) == 8
            assert resp.usage.completion_tokens == 8 and resp.usage.total_tokens == resp.usage.prompt_tokens + 8
            trailing = dict(await call.trailing_metadata())
            assert trailing["x-request-id"] == "grpc-unary-1"

            chunks = [c async for c in stub.CompleteStream(req, metadata=server.grpc_metadata)]
            assert chunks[-1].HasField("usage") and not chunks[-1].choices
            assert chunks[-1].usage == resp.usage
            assert "".join(ch.text for c in chunks for ch in c.choices) == choice.text
            assert [t for c in chunks for ch in c.choices for t in ch.token_ids] == list(choice.token_ids)
            assert chunks[-2].choices[0].finish_reason == "length"
            assert len({c.id for c in chunks}) == 1

    run(go())


def test_chat_and_stream_with_logprobs_and_n(server: LiveServer) -> None:
    async def go() -> None:
        async with _channel(server) as channel:
            stub = rpc.GenerationStub(channel)
            req = pb.ChatRequest(
                model=MODEL,
                messages=[pb.ChatMessage(role="user", content="Say hello.")],
                max_tokens=6,
                temperature=0,
                logprobs=True,
                top_logprobs=2,
                n=2,
            )
            resp = await stub.Chat(req, metadata=server.grpc_metadata)
            assert resp.id.startswith("chatcmpl-") and len(resp.choices) == 2
            for choice in resp.choices:
                assert choice.role == "assistant" and choice.content
                assert len(choice.logprobs) == 6 and all(len(t.top_logprobs) == 2 for t in choice.logprobs)
            assert resp.choices[0].content == resp.choices[1].content  # greedy: both choices agree

            chunks = [c async for c in stub.ChatStream(req, metadata=server.grpc_metadata)]
            for index in (0, 1):
                deltas = [ch for c in chunks for ch in c.choices if ch.index == index]
                assert deltas[0].role == "assistant" and all(d.role == "" for d in deltas[1:])
                assert "".join(d.content for d in deltas) == resp.choices[index].content
                assert deltas[-1].finish_reason == "length"
            assert chunks[-1].usage.completion_tokens == 12

    run(go())


def test_stop_string_and_stop_reason(server: LiveServer) -> None:
    async def go() -> None:
        async with _channel(server) as channel:
            stub = rpc.GenerationStub(channel)
            plain = await stub.Complete(
                pb.CompletionRequest(prompt="1, 2, 3, 4,", max_tokens=12, temperature=0), metadata=server.grpc_metadata
            )
            stop = plain.choices[0].text.strip()[:2]
            assert stop
            resp = await stub.Complete(
                pb.CompletionRequest(prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop]),
                metadata=server.grpc_metadata,
            )
            choice = resp.choices[0]
            assert choice.finish_reason == "stop" and choice.stop_reason.stop_string == stop
            assert stop not in choice.text

    run(go())


def test_embed_tokenize_detokenize_models(server: LiveServer) -> None:
    async def go() -> None:
        async with _channel(server) as channel:
            md = server.grpc_metadata
            emb = await rpc.EmbeddingsStub(channel).Embed(pb.EmbedRequest(input=["a cat", "a dog"]), metadata=md)
            assert emb.model == EMBED_MODEL and [d.index for d in emb.data] == [0, 1]
            assert all(abs(np.linalg.norm(d.embedding) - 1) < 1e-5 for d in emb.data)
            with pytest.raises(grpc.aio.AioRpcError) as error:  # no Matryoshka model: not cut short
                await rpc.EmbeddingsStub(channel).Embed(pb.EmbedRequest(input=["a cat"], dimensions=8), metadata=md)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            tok = rpc.TokenizationStub(channel)
            out = await tok.Tokenize(pb.TokenizeRequest(prompt="Hello, world!", return_token_strs=True), metadata=md)
            assert out.count == len(out.tokens) == len(out.token_strs) > 0 and out.max_model_len == MAX_MODEL_LEN
            back = await tok.Detokenize(pb.DetokenizeRequest(tokens=out.tokens), metadata=md)
            assert back.prompt == "Hello, world!"
            chat = await tok.Tokenize(
                pb.TokenizeRequest(messages=[pb.ChatMessage(role="user", content="Hi")]), metadata=md
            )
            assert chat.count > out.count  # the template's markers

            models = await rpc.ModelsStub(channel).ListModels(pb.ListModelsRequest(), metadata=md)
            assert [(m.id, m.kind, m.family) for m in models.data] == [
                (MODEL, "generation", "llama (native)"), (EMBED_MODEL, "embedding", "bert (transformers)")
            ]

    run(go())


# -- the same answers over both transports -----------------------------------------------------------------


def test_same_greedy_text_over_grpc_unary_stream_and_http(server: LiveServer, http: httpx.Client) -> None:
    prompt = "Write one sentence about the sea."
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "temperature": 0}
    http_text = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]

    async def go() -> tuple[str, str]:
        async with _channel(server) as channel:
            stub = rpc.GenerationStub(channel)
            req = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=prompt)], max_tokens=24, temperature=0)
            unary = (await stub.Chat(req, metadata=server.grpc_metadata)).choices[0].content
            streamed = "".join(
                [ch.content async for c in stub.ChatStream(req, metadata=server.grpc_metadata) for ch in c.choices]
            )
            return unary, streamed

    unary, streamed = run(go())
    assert len(http_text) > 10
    assert unary == streamed == http_text


def test_embeddings_equal_over_both_transports(server: LiveServer, http: httpx.Client) -> None:
    texts = ["The quick brown fox.", "Serving models over gRPC."]
    http_vectors = [d["embedding"] for d in http.post("/v1/embeddings", json={"input": texts}).json()["data"]]

    async def go() -> list[list[float]]:
        async with _channel(server) as channel:
            resp = await rpc.EmbeddingsStub(channel).Embed(pb.EmbedRequest(input=texts), metadata=server.grpc_metadata)
            return [list(d.embedding) for d in resp.data]

    grpc_vectors = run(go())
    np.testing.assert_allclose(np.array(grpc_vectors), np.array(http_vectors), atol=1e-6, rtol=0)


# -- errors -----------------------------------------------------------------------------------------------


def test_bad_and_missing_key_are_unauthenticated(server: LiveServer) -> None:
    async def go() -> None:
        async with _channel(server) as channel:
            stub = rpc.ModelsStub(channel)
            missing = await _error_of(stub.ListModels(pb.ListModelsRequest()))
            bad = await _error_of(stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", "Bearer nope"),)))
            for error in (missing, bad):
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                assert _trailers(error)["lmserve-error-code"] == "invalid_api_key"
                assert _trailers(error)["x-request-id"]
            assert "Missing API key" in missing.details() and "Invalid API key" in bad.details()

    run(go())


def test_invalid_arguments_and_not_found(server: LiveServer) -> None:
    async def go() -> None:
        async with _channel(server) as channel:
            stub = rpc.GenerationStub(channel)
            md = server.grpc_metadata
            too_long = pb.CompletionRequest(prompt_token_ids=pb.TokenIds(ids=[42] * MAX_MODEL_LEN), max_tokens=4)
            error = await _error_of(stub.Complete(too_long, metadata=md))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert _trailers(error)["lmserve-error-code"] == "context_length_exceeded"
            assert "maximum context length" in error.details()

            error = await _stream_error(stub.CompleteStream(too_long, metadata=md))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT

            error = await _error_of(stub.Complete(pb.CompletionRequest(model="gpt-9", prompt="hi"), metadata=md))
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert _trailers(error)["lmserve-error-code"] == "model_not_found"

            error = await _error_of(stub.Complete(pb.CompletionRequest(prompt="hi", temperature=3.0), metadata=md))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert _trailers(error)["lmserve-error-param"] == "temperature"

            error = await _error_of(stub.Complete(pb.CompletionRequest(max_tokens=2), metadata=md))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "exactly one" in error.details()

            bad_role = pb.ChatRequest(messages=[pb.ChatMessage(role="wizard", content="hi")])
            error = await _error_of(stub.Chat(bad_role, metadata=md))
            assert _trailers(error)["lmserve-error-param"] == "messages[0].role"

            error = await _error_of(
                rpc.TokenizationStub(channel).Detokenize(pb.DetokenizeRequest(tokens=[10**7]), metadata=md)
            )
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT

    run(go())


def test_malformed_bytes_are_invalid_argument(server: LiveServer) -> None:
    async def go() -> None:
        async with _channel(server) as channel:
            for path in ("/lmserve.v1.Generation/Complete", "/lmserve.v1.Embeddings/Embed"):
                raw = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
                for garbage in (b"\xff\xff\xff\xff", b"\x0a\x80", b"\x12\x05ab"):
                    error = await _error_of(raw(garbage, metadata=server.grpc_metadata))
                    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, garbage, error)
            stream = channel.unary_stream(
                "/lmserve.v1.Generation/ChatStream", request_serializer=None, response_deserializer=None
            )
            error = await _stream_error(stream(b"\xff\x00", metadata=server.grpc_metadata))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            # The server is unharmed.
            ok = await rpc.ModelsStub(channel).ListModels(pb.ListModelsRequest(), metadata=server.grpc_metadata)
            assert ok.data

    run(go())


def test_message_size_limit_is_shared_with_http(server: LiveServer) -> None:
    async def go() -> None:
        async with _channel(server) as channel:
            big = pb.CompletionRequest(prompt="x" * (MAX_BODY_BYTES + 10))
            error = await _error_of(rpc.GenerationStub(channel).Complete(big, metadata=server.grpc_metadata))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    run(go())


def test_rate_limit_is_one_budget_across_transports(servers: Servers) -> None:
    """The limited server allows LIMITED_RPM requests a minute per key: spent over HTTP and gRPC together."""
    limited = servers.limited
    md = (("authorization", f"Bearer {GRPC_RATE_KEY}"),)

    async def go() -> None:
        async with _channel(limited) as channel:
            stub = rpc.GenerationStub(channel)
            req = pb.CompletionRequest(prompt="hi", max_tokens=1)
            headers = {"Authorization": f"Bearer {GRPC_RATE_KEY}"}
            body = {"prompt": "hi", "max_tokens": 1}
            async with httpx.AsyncClient(base_url=limited.base_url, headers=headers, timeout=30) as client:
                for _ in range(LIMITED_RPM - 1):
                    assert (await client.post("/v1/completions", json=body)).status_code == 200
                await stub.Complete(req, metadata=md)  # the last one of the minute
                error = await _error_of(stub.Complete(req, metadata=md))
                assert (await client.post("/v1/completions", json=body)).status_code == 429
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            trailers = _trailers(error)
            assert trailers["lmserve-error-code"] == "rate_limit_exceeded"
            assert int(trailers["retry-after"]) >= 1

    run(go())


def test_queue_full_is_unavailable_across_transports(servers: Servers) -> None:
    """max_queue=1 on the limited server: an HTTP stream holds the slot, so gRPC gets UNAVAILABLE."""
    limited = servers.limited
    started, done = threading.Event(), threading.Event()

    def hold_slot() -> None:
        with httpx.Client(base_url=limited.base_url, timeout=60) as c, c.stream(
            "POST",
            "/v1/completions",
            headers={"Authorization": f"Bearer {GRPC_QUEUE_KEY}"},
            json={"prompt": "Count:", "max_tokens": 64, "ignore_eos": True, "stream": True},
        ) as resp:
            for _ in resp.iter_lines():
                started.set()
                if done.is_set():
                    break

    async def go() -> grpc.aio.AioRpcError:
        async with _channel(limited) as channel:
            md = (("authorization", f"Bearer {GRPC_QUEUE_KEY}"),)
            return await _error_of(rpc.GenerationStub(channel).Complete(pb.CompletionRequest(prompt="hi"), metadata=md))

    holder = threading.Thread(target=hold_slot)
    holder.start()
    try:
        assert started.wait(30)
        error = run(go())
    finally:
        done.set()
        holder.join(30)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert _trailers(error)["lmserve-error-code"] == "server_overloaded"
    assert _trailers(error)["retry-after"] == "1"


def test_error_table_maps_every_code_to_a_grpc_status() -> None:
    for code, kind in ERRORS.items():
        assert grpc.StatusCode[kind.grpc_status], code
    wanted = {
        "invalid_request": "INVALID_ARGUMENT",
        "context_length_exceeded": "INVALID_ARGUMENT",
        "model_not_found": "NOT_FOUND",
        "invalid_api_key": "UNAUTHENTICATED",
        "rate_limit_exceeded": "RESOURCE_EXHAUSTED",
        "server_overloaded": "UNAVAILABLE",
        "service_unavailable": "UNAVAILABLE",
        "internal_error": "INTERNAL",
    }
    assert {code: ERRORS[code].grpc_status for code in wanted} == wanted


# -- cancel and deadline ----------------------------------------------------------------------------------


def _kv_used(server: LiveServer) -> int:
    return server.state.engine.stats().num_kv_blocks_used


async def _wait_idle(server: LiveServer, baseline: int, timeout_s: float = 10.0) -> bool:
    """Nothing running, waiting or admitted, and KV usage back to its baseline (prefix-cache blocks may
    have been evicted since, so at most the baseline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = server.state.engine.stats()
        busy = stats.num_running + stats.num_waiting + server.state.admission.in_flight
        if busy == 0 and stats.num_kv_blocks_used <= baseline:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)


def test_cancel_midway_frees_kv_blocks(server: LiveServer, http: httpx.Client) -> None:
    before = http.get("/metrics").text

    async def go() -> None:
        baseline = _kv_used(server)
        async with _channel(server) as channel:
            req = pb.CompletionRequest(prompt="Tell me a long story.", max_tokens=250, ignore_eos=True)
            call = rpc.GenerationStub(channel).CompleteStream(req, metadata=server.grpc_metadata)
            async for _ in call:
                break  # the request is running; the stream stays open, unread, while it generates
            # Its first tokens may still fit the blocks the prompt shares with the prefix cache: wait until it
            # holds a block of its own (well before its 250 tokens are done), then cancel.
            deadline = time.monotonic() + 60
            while _kv_used(server) <= baseline:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert server.state.engine.stats().num_running == 1
            call.cancel()
            assert await _wait_idle(server, baseline)

    run(go())
    cancelled = {"endpoint": "/lmserve.v1.Generation/CompleteStream", "transport": "grpc", "status": "CANCELLED"}
    wanted = metric_value(before, "lmserve_requests_total", cancelled) + 1
    deadline = time.monotonic() + 30  # the server counts the RPC once its handler has unwound
    while metric_value(after := http.get("/metrics").text, "lmserve_requests_total", cancelled) < wanted:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    aborted = {"finish_reason": "abort"}
    assert metric_value(after, "lmserve_request_finished_total", aborted) == metric_value(
        before, "lmserve_request_finished_total", aborted
    ) + 1
    generated = metric_value(after, "lmserve_generation_tokens_total") - metric_value(
        before, "lmserve_generation_tokens_total"
    )
    assert generated < 250
    assert metric_value(after, "lmserve_requests_total", cancelled) == wanted


def test_deadline_aborts_unary_and_stream(server: LiveServer) -> None:
    async def go() -> None:
        baseline = _kv_used(server)
        async with _channel(server) as channel:
            stub = rpc.GenerationStub(channel)
            req = pb.CompletionRequest(prompt="Tell me a long story.", max_tokens=250, ignore_eos=True)
            started = time.monotonic()
            error = await _error_of(stub.Complete(req, metadata=server.grpc_metadata, timeout=0.5))
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 5
            assert await _wait_idle(server, baseline)
            error = await _stream_error(stub.CompleteStream(req, metadata=server.grpc_metadata, timeout=0.5))
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert await _wait_idle(server, baseline)

    run(go())


# -- health, reflection, metrics, access log ---------------------------------------------------------------


def test_health_follows_readiness(server: LiveServer) -> None:
    async def status(channel: grpc.aio.Channel, service: str = "") -> int:
        resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
        return resp.status

    async def go() -> None:
        async with _channel(server) as channel:  # no key: health is open, like /readyz
            assert await status(channel) == health_pb2.HealthCheckResponse.SERVING
            assert await status(channel, "lmserve.v1.Generation") == health_pb2.HealthCheckResponse.SERVING
            server.state.lifecycle.draining = True
            try:
                await asyncio.sleep(0.6)  # the reporter polls every 0.25 s
                assert await status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
                error = await _error_of(
                    rpc.GenerationStub(channel).Complete(pb.CompletionRequest(prompt="hi"), metadata=server.grpc_metadata)
                )
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert _trailers(error)["lmserve-error-code"] == "service_unavailable"
            finally:
                server.state.lifecycle.draining = False
            await asyncio.sleep(0.6)
            assert await status(channel) == health_pb2.HealthCheckResponse.SERVING

    run(go())


def test_reflection_lists_the_services(server: LiveServer) -> None:
    def go() -> None:
        with grpc.insecure_channel(server.grpc_target) as channel:
            db = ProtoReflectionDescriptorDatabase(channel)
            services = set(db.get_services())
            names = ("Generation", "Embeddings", "Tokenization", "Models", "Moderations", "Reranking", "Responses")
            assert {f"lmserve.v1.{s}" for s in names} <= services
            assert "grpc.health.v1.Health" in services
            desc = db.FindFileContainingSymbol("lmserve.v1.Generation")
            assert desc.name == "lmserve/v1/lmserve.proto"

    go()


def test_metrics_and_access_log_count_grpc(server: LiveServer, http: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    before = http.get("/metrics").text

    async def go() -> None:
        async with _channel(server) as channel:
            stub = rpc.TokenizationStub(channel)
            md = server.grpc_metadata + (("x-request-id", "grpc-access-1"),)
            for _ in range(3):
                await stub.Tokenize(pb.TokenizeRequest(prompt="hi"), metadata=md)
            await _error_of(stub.Tokenize(pb.TokenizeRequest(), metadata=md))

    with caplog.at_level("INFO", logger="lmserve.access"):
        run(go())
        # The server writes its access line after the status has gone out: give the last one a moment.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            lines = [r for r in caplog.records if getattr(r, "request_id", None) == "grpc-access-1"]
            if len(lines) == 4:
                break
            time.sleep(0.05)
    after = http.get("/metrics").text
    labels = {"endpoint": "/lmserve.v1.Tokenization/Tokenize", "transport": "grpc"}
    assert metric_value(after, "lmserve_requests_total", {**labels, "status": "OK"}) == metric_value(
        before, "lmserve_requests_total", {**labels, "status": "OK"}
    ) + 3
    assert metric_value(after, "lmserve_requests_total", {**labels, "status": "INVALID_ARGUMENT"}) == metric_value(
        before, "lmserve_requests_total", {**labels, "status": "INVALID_ARGUMENT"}
    ) + 1
    assert len(lines) == 4
    assert all(r.transport == "grpc" and r.path == "/lmserve.v1.Tokenization/Tokenize" for r in lines)
    assert [r.grpc_status for r in lines] == ["OK", "OK", "OK", "INVALID_ARGUMENT"]
    assert [r.status for r in lines] == [200, 200, 200, 400]
    assert lines[-1].error == "invalid_request"


# -- TLS and mutual TLS -------------------------------------------------------------------------------------


def _certificates(tmp: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(subject: str, key: Any, issuer: x509.Name, issuer_key: Any, *, ca: bool, usage: Any = None) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if subject == "localhost":
            import ipaddress

            san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(path: Path, data: bytes) -> Path:
        path.write_bytes(data)
        return path

    def key_pem(key: Any) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca_cert = issue("lmserve test CA", ca_key, name("lmserve test CA"), ca_key, ca=True)
    server_cert = issue("localhost", server_key, ca_cert.subject, ca_key, ca=False, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    client_cert = issue("client", client_key, ca_cert.subject, ca_key, ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    pem = serialization.Encoding.PEM
    return {
        "ca": write(tmp / "ca.pem", ca_cert.public_bytes(pem)),
        "server_cert": write(tmp / "server.pem", server_cert.public_bytes(pem)),
        "server_key": write(tmp / "server.key", key_pem(server_key)),
        "client_cert": write(tmp / "client.pem", client_cert.public_bytes(pem)),
        "client_key": write(tmp / "client.key", key_pem(client_key)),
    }


def _on_server_loop(server: LiveServer, coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on the test server's own event loop (where its engine and gRPC servers live)."""
    assert server.loop is not None
    return asyncio.run_coroutine_threadsafe(coro_fn(), server.loop).result(30)


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_tls_and_mutual_tls(server: LiveServer, tmp_path: Path, mutual: bool) -> None:
    from lmserve.api.grpc.server import GrpcTLS, start_grpc

    certs = _certificates(tmp_path)
    tls = GrpcTLS(certs["server_cert"], certs["server_key"], certs["ca"] if mutual else None)
    secure = _on_server_loop(server, lambda: start_grpc(server.state, "127.0.0.1", 0, tls))
    target = f"localhost:{secure.port}"
    ca = certs["ca"].read_bytes()
    client_pair = {"private_key": certs["client_key"].read_bytes(), "certificate_chain": certs["client_cert"].read_bytes()}

    async def list_models(credentials: grpc.ChannelCredentials, timeout: float = 10) -> Any:
        async with grpc.aio.secure_channel(target, credentials) as channel:
            stub = rpc.ModelsStub(channel)
            return await stub.ListModels(pb.ListModelsRequest(), metadata=server.grpc_metadata, timeout=timeout)

    async def plaintext() -> Any:
        async with grpc.aio.insecure_channel(target) as channel:
            return await rpc.ModelsStub(channel).ListModels(pb.ListModelsRequest(), timeout=3)

    try:
        trusted = grpc.ssl_channel_credentials(root_certificates=ca, **(client_pair if mutual else {}))
        assert run(list_models(trusted)).data[0].id == MODEL
        assert run(_error_of(plaintext())).code() == grpc.StatusCode.UNAVAILABLE
        # A client that does not trust the CA fails the handshake.
        assert run(_error_of(list_models(grpc.ssl_channel_credentials(), timeout=3))).code() == grpc.StatusCode.UNAVAILABLE
        if mutual:  # without a client certificate the server refuses the handshake
            no_cert = grpc.ssl_channel_credentials(root_certificates=ca)
            assert run(_error_of(list_models(no_cert, timeout=3))).code() == grpc.StatusCode.UNAVAILABLE
    finally:
        _on_server_loop(server, lambda: secure.stop(0))


# -- the contract -----------------------------------------------------------------------------------------


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, str(root / "protos" / "generate.py"), str(tmp_path), "--check", str(root / "service/lmserve/api/proto")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_proto_compiles_with_plain_protoc(tmp_path: Path) -> None:
    """No plugins, no project-specific options: protoc alone makes a descriptor set of it."""
    from grpc_tools import protoc

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "lmserve.pb"
    args = ["protoc", f"-I{root / 'protos'}", f"--descriptor_set_out={out}", "lmserve/v1/lmserve.proto"]
    assert protoc.main(args) == 0
    from google.protobuf import descriptor_pb2

    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    [proto] = files.file
    assert proto.package == "lmserve.v1"
    assert [s.name for s in proto.service] == [
        "Generation", "Embeddings", "Tokenization", "Models", "Moderations", "Reranking", "Responses"
    ]  # fmt: skip
    assert json.dumps([m.name for m in proto.service[0].method]) == json.dumps(
        ["Complete", "CompleteStream", "Chat", "ChatStream"]
    )
