"""Hypothesis over every lmserve.v1 request message, sent over a real grpc channel to the real server.

The strategy is built from the message descriptors (every field, nested messages, oneofs, maps, repeated
fields), with values drawn from edges (0, huge ids, NaN, infinities, empty and odd strings) as well as the
ordinary. Each message also goes out once with an unknown field appended. The server may refuse a request
(INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, ...) but must never answer INTERNAL or UNKNOWN, and must
still serve afterwards. Bounded: the `fuzz` server caps max_tokens at 4 and n at 2, and each RPC gets a
fixed, derandomized number of examples.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from lmserve.api.grpc.rpcs import METHODS, Method
from lmserve.api.proto import lmserve_pb2 as pb
from tests.api.conftest import LiveServer, Servers

MAX_EXAMPLES = {"Generation": 12, "Embeddings": 15, "Tokenization": 20, "Models": 3, "Moderations": 12, "Reranking": 4, "Responses": 8}
MAX_DEPTH = 3  # nested messages deeper than this are left unset
# Refusals a client can act on; anything else (INTERNAL, UNKNOWN, DATA_LOSS...) is a server bug.
ACCEPTABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}
# Strings that make sense to the server sometimes, so that fuzzing reaches past the first check.
SEEDS = ["", " ", "hi", "The capital of France is", "smollm2-135m-instruct", "all-minilm-l6-v2", "user", "assistant",
         "system", "tool", "function", "json_object", "json_schema", "text", "auto", "none", "required", "{}",
         '{"type": "object"}', '{"type": "string", "maxLength": 3}', "[a-z]{1,3}", "\x00", "é😀\u202e", "\ud7ff"]
FD = FieldDescriptor
_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (0, 1, 2, 4, 5, 16, 49151, 49152, 30522, low, high, -1) if low <= v <= high]
    return st.sampled_from(edges) | st.integers(max(low, -100), min(high, 100)) | st.integers(low, high)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type in _INT_RANGES:
        return _integers(*_INT_RANGES[field.type])
    if field.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        edges = st.sampled_from([0.0, -0.0, 1.0, 0.5, 2.0, -2.0, 1e-6, 1e30, math.nan, math.inf, -math.inf])
        return edges | st.floats(-3.0, 3.0, width=32 if field.type == FD.TYPE_FLOAT else 64)
    if field.type == FD.TYPE_BOOL:
        return st.booleans()
    if field.type == FD.TYPE_STRING:
        return st.sampled_from(SEEDS) | st.text(max_size=40)
    if field.type == FD.TYPE_BYTES:
        return st.binary(max_size=40)
    if field.type == FD.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values] + [999])
    raise AssertionError(f"unhandled field type {field.type} of {field.full_name}")


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Message:
    """A message of `descriptor`'s type with a random subset of its fields set to random values."""
    message_class = pb.__dict__.get(descriptor.name) or _message_class(descriptor)
    msg = message_class()
    if depth > MAX_DEPTH:
        return msg
    oneof_chosen: set[str] = set()
    for field in descriptor.fields:
        if field.containing_oneof is not None and field.containing_oneof.name in oneof_chosen:
            continue
        if not draw(st.booleans()):
            continue
        if field.containing_oneof is not None:
            oneof_chosen.add(field.containing_oneof.name)
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        if is_map:
            key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            for _ in range(draw(st.integers(0, 3))):
                key = draw(_scalar(key_field))
                container = getattr(msg, field.name)
                if value_field.message_type is not None:
                    container[key].CopyFrom(draw(messages(value_field.message_type, depth + 1)))
                else:
                    container[key] = draw(_scalar(value_field))
        elif field.is_repeated:
            count = draw(st.integers(0, 4))
            if field.message_type is not None:
                getattr(msg, field.name).extend(draw(messages(field.message_type, depth + 1)) for _ in range(count))
            else:
                getattr(msg, field.name).extend(draw(_scalar(field)) for _ in range(count))
        elif field.message_type is not None:
            getattr(msg, field.name).CopyFrom(draw(messages(field.message_type, depth + 1)))
        else:
            setattr(msg, field.name, draw(_scalar(field)))
    return msg


def _message_class(descriptor: Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


def _unknown_field(number: int) -> bytes:
    """An int64 field `number` = 1 on the wire, which no lmserve.v1 message declares."""
    key, out = number << 3, bytearray()
    while True:
        byte, key = key & 0x7F, key >> 7
        out.append(byte | (0x80 if key else 0))
        if not key:
            return bytes(out) + b"\x01"


async def _send(channel: grpc.aio.Channel, method: Method, raw: bytes, metadata: Any) -> tuple[grpc.StatusCode, str]:
    callable_ = (channel.unary_stream if method.is_stream else channel.unary_unary)(
        method.path, request_serializer=None, response_deserializer=None
    )
    try:
        call = callable_(raw, metadata=metadata, timeout=60)
        if method.is_stream:
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_fuzzed_requests_never_fail_inside(servers: Servers, method: Method) -> None:
    server: LiveServer = servers.fuzz
    failures: list[str] = []

    async def run_all(raws: list[bytes]) -> None:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            for raw in raws:
                for payload in (raw, raw + _unknown_field(900)):
                    code, details = await _send(channel, method, payload, server.grpc_metadata)
                    if code not in ACCEPTABLE:
                        request = method.request_type.FromString(raw)
                        failures.append(f"{method.name}({request!r:.400}) -> {code.name}: {details}")
                    elif payload is not raw and code != grpc.StatusCode.INVALID_ARGUMENT:
                        failures.append(f"{method.name} with an unknown field -> {code.name}, not INVALID_ARGUMENT")
            # Still serving: a cheap call that must succeed.
            models = channel.unary_unary("/lmserve.v1.Models/ListModels", request_serializer=None, response_deserializer=None)
            assert await models(b"", metadata=server.grpc_metadata)

    drawn: list[bytes] = []

    @given(msg=messages(method.request_type.DESCRIPTOR))
    @settings(
        max_examples=MAX_EXAMPLES[method.service],
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def collect(msg: Message) -> None:
        drawn.append(msg.SerializeToString())

    collect()
    assert drawn  # ListModelsRequest has no fields: its one possible message
    asyncio.run(run_all(drawn))
    assert not failures, "\n".join(failures)
