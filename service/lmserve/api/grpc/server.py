"""The gRPC transport: `lmserve.v1` (protos/lmserve/v1/lmserve.proto) over the transport-neutral handlers.

    server = await start_grpc(state, host, port, tls)   # binds, serves; plus grpc.health.v1 and reflection
    ...
    await stop_grpc(server, grace_s)

Each RPC goes through one wrapper (`_unary` or `_stream`) that does what HTTP's middleware does:
accounting (request id from `x-request-id` metadata, in-flight, metrics under transport "grpc", one
access line), the API key from `authorization` metadata, and every APIError mapped through the one error
table to a gRPC status, with its string code (`lmserve-error-code`), the parameter (`lmserve-error-param`),
`retry-after` and the request id in trailing metadata. Messages arrive as raw bytes and are parsed here,
so a malformed message is INVALID_ARGUMENT rather than grpc's own deserialization failure.

A client cancel or an expired deadline cancels the handler's task, which closes the engine streams
(aborting the requests and freeing their KV blocks), exactly as an HTTP disconnect does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from lmserve.api.accounting import RequestOutcome, close_request, observe_error, open_request
from lmserve.api.admission import Caller, authenticate
from lmserve.api.errors import APIError
from lmserve.api.grpc.rpcs import METHODS, PACKAGE, Method
from lmserve.state import readiness

if TYPE_CHECKING:
    from lmserve.state import AppState

log = logging.getLogger(__name__)

TRANSPORT = "grpc"
SERVICES = ("Generation", "Embeddings", "Tokenization", "Models", "Moderations", "Reranking", "Responses")
HEALTH_POLL_S = 0.25
# gRPC status names the accounting gives the HTTP status of (errors use their table entry's).
_HTTP_STATUS = {"OK": 200, "CANCELLED": 499, "DEADLINE_EXCEEDED": 504}


@dataclass(frozen=True)
class GrpcTLS:
    """Server certificate and key (PEM files); with `client_ca`, clients must present a certificate it signed."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        pair = (self.key_file.read_bytes(), self.cert_file.read_bytes())
        client_ca = self.client_ca_file.read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


# -- the wrapper every RPC goes through ----------------------------------------------------------------------


class _Call:
    """One RPC's accounting and error mapping, shared by the unary and the streaming wrapper."""

    def __init__(self, state: AppState, method: Method, context: grpc.aio.ServicerContext) -> None:
        self.state = state
        self.method = method
        self.context = context
        self.metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.record = open_request(state, TRANSPORT, self.metadata.get("x-request-id"))
        self.grpc_status = "OK"
        self.http_status = 200

    def caller_and_request(self, raw: bytes) -> tuple[Caller, Message]:
        client_address = _peer_host(self.context.peer())
        key_id = authenticate(self.state, self.metadata.get("authorization"), client_address)
        try:
            request = self.method.request_type.FromString(raw)
        except DecodeError:
            raise APIError(
                f"The message is not a valid {self.method.request_type.DESCRIPTOR.full_name}.", "invalid_request"
            ) from None
        unknown = _unknown_fields(request)
        if unknown is not None:
            raise APIError(unknown, "unknown_field")
        return Caller(self.record, key_id), request

    def trailers(self, headers: dict[str, str], error: APIError | None = None) -> tuple[tuple[str, str], ...]:
        items = [("x-request-id", self.record.request_id)]
        if error is not None:
            items.append(("lmserve-error-code", error.code))
            if error.param:
                items.append(("lmserve-error-param", error.param))
        items += [(k.lower(), v) for k, v in headers.items() if v.isascii()]
        return tuple(items)

    def succeed(self, caller: Caller) -> None:
        self.context.set_trailing_metadata(self.trailers(caller.response_headers))

    def as_error(self, exc: BaseException) -> APIError:
        if isinstance(exc, APIError):
            return exc
        log.error("unhandled error in %s", self.method.path, exc_info=exc)
        return APIError("Internal server error.", "internal_error")

    async def fail(self, error: APIError) -> None:
        """Record the error and end the RPC with its status (raises, as context.abort does)."""
        observe_error(self.state, self.record, error.code)
        self.grpc_status = error.grpc_status
        self.http_status = error.http_status
        await self.context.abort(
            grpc.StatusCode[error.grpc_status], error.message, trailing_metadata=self.trailers(error.headers, error)
        )

    def cancelled(self) -> None:
        try:
            remaining = self.context.time_remaining()
        except Exception:  # the call is already torn down: no deadline to read
            remaining = None
        self.grpc_status = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
        self.http_status = _HTTP_STATUS[self.grpc_status]

    @contextlib.asynccontextmanager
    async def scope(self, raw: bytes) -> AsyncIterator[tuple[Caller, Message]]:
        """The RPC from its raw message to its end, whatever ends it: authenticated and parsed on entry;
        on the way out its status set (OK, the error's, or the cancel's) and its access line written."""
        try:
            try:
                caller, request = self.caller_and_request(raw)
                _cancel_on_termination(self.context)
                yield caller, request
            except (asyncio.CancelledError, GeneratorExit):
                # A cancel lands either in an await (CancelledError) or, when grpc was sending a stream's
                # message, as the stream's generator being closed (GeneratorExit).
                self.cancelled()
                raise
            except Exception as exc:
                await self.fail(self.as_error(exc))
                raise AssertionError("unreachable: abort raises") from exc
            self.succeed(caller)
        finally:
            self.close()

    def close(self) -> None:
        outcome = RequestOutcome(
            "POST", self.method.path, self.method.path, self.http_status, self.grpc_status, self.metadata.get("traceparent")
        )
        close_request(self.state, self.record, outcome)


def _unknown_fields(request: Message) -> str | None:
    """Why the request is refused for fields this server's schema lacks (a newer client's, a typo in a
    hand-built message), or None. Proto3 would keep and ignore them; like HTTP, lmserve says so instead,
    since a setting silently dropped changes what the client gets."""
    stripped = type(request)()
    stripped.CopyFrom(request)
    stripped.DiscardUnknownFields()  # recursive: nested messages too
    if stripped.ByteSize() == request.ByteSize():
        return None
    name = request.DESCRIPTOR.full_name
    numbers = sorted({f.field_number for f in unknown_fields.UnknownFieldSet(request)})
    where = f"field number {', '.join(map(str, numbers))}" if numbers else "fields in a nested message"
    return f"The {name} holds {where}, unknown to this server's lmserve.v1 schema."


def _peer_host(peer: str | None) -> str | None:
    """'ipv4:127.0.0.1:5000' -> '127.0.0.1'; '[::1]' forms keep their brackets off."""
    if not peer:
        return None
    _, _, address = peer.partition(":")
    host, _, _ = address.rpartition(":")
    return host.strip("[]") or None


def _cancel_on_termination(context: grpc.aio.ServicerContext) -> None:
    """Cancel the running handler as soon as the call ends under it (a client cancel, an expired deadline),
    so that its engine requests are aborted at once; grpc by itself notices a cancelled stream only at its
    next send, which the safety filter's hold or a long prefill can put far off."""
    task = asyncio.current_task()
    assert task is not None

    def on_done(_: object) -> None:
        if context.cancelled() and not task.done():
            task.cancel()

    context.add_done_callback(on_done)


def _unary(state: AppState, method: Method) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Message]]:
    async def behavior(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        async with _Call(state, method, context).scope(raw) as (caller, request):
            return await method.handler(state, caller, request)
        raise AssertionError("unreachable: the scope re-raises or returns")

    return behavior


def _stream(state: AppState, method: Method) -> Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[Message]]:
    async def behavior(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Message]:
        async with _Call(state, method, context).scope(raw) as (caller, request):
            async with contextlib.aclosing(method.handler(state, caller, request)) as messages:
                async for message in messages:
                    yield message

    return behavior


def _handlers(state: AppState) -> dict[str, dict[str, grpc.RpcMethodHandler]]:
    by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
    for m in METHODS:
        if m.is_stream:
            handler = grpc.unary_stream_rpc_method_handler(
                _stream(state, m), request_deserializer=None, response_serializer=m.response_type.SerializeToString
            )
        else:
            handler = grpc.unary_unary_rpc_method_handler(
                _unary(state, m), request_deserializer=None, response_serializer=m.response_type.SerializeToString
            )
        by_service.setdefault(f"{PACKAGE}.{m.service}", {})[m.name] = handler
    return by_service


# -- health and the server --------------------------------------------------------------------------------


class HealthReporter:
    """Keeps grpc.health.v1 in step with readiness: SERVING only when ready (not draining, engine alive)."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.servicer = HealthServicer()
        self.names = ("", *(f"{PACKAGE}.{s}" for s in SERVICES))
        self._task: asyncio.Task[None] | None = None

    async def update(self) -> None:
        ready = readiness(self.state) is None
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.names:
            await self.servicer.set(name, status)

    async def _poll(self) -> None:
        while True:
            await self.update()
            await asyncio.sleep(HEALTH_POLL_S)

    async def start(self) -> None:
        await self.update()
        self._task = asyncio.create_task(self._poll(), name="grpc-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.servicer.enter_graceful_shutdown()


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    port: int  # the bound port (the one the OS picked when asked for 0)
    health: HealthReporter

    async def stop(self, grace_s: float) -> None:
        await self.health.stop()
        await self.server.stop(grace_s)


async def start_grpc(state: AppState, host: str, port: int, tls: GrpcTLS | None = None) -> GrpcServer:
    """Bind and start the gRPC server on the running loop, over `state`."""
    limits = state.config.limits
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limits.max_request_body_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ]
    )
    for service, handlers in _handlers(state).items():
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, handlers)
    health = HealthReporter(state)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    names = [*(f"{PACKAGE}.{s}" for s in SERVICES), health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"gRPC could not bind {address}")
    await server.start()
    await health.start()
    return GrpcServer(server, bound, health)


__all__ = ["GrpcServer", "GrpcTLS", "start_grpc"]
