"""Hostile and malformed input over both transports: every one is a 4xx (gRPC: INVALID_ARGUMENT and
friends) with a message that names what is wrong, never a 5xx, a hang or a dead server.

Cases already covered elsewhere are not repeated here: malformed JSON and non-JSON bodies, a streamed
body over the limit and `prompt: ""` (test_http.py); garbage protobuf bytes, an over-size message and
out-of-vocabulary ids to Detokenize (test_grpc.py).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import httpx
import pytest

from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.proto import lmserve_pb2_grpc as rpc
from tests.api.conftest import MAX_BODY_BYTES, LiveServer

MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
VOCAB = 49152  # SmolLM2's
EMBED_VOCAB = 30522  # all-MiniLM-L6-v2's


def _error(resp: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert resp.status_code == status, resp.text[:300]
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


def _post_raw(http: httpx.Client, path: str, content: bytes) -> httpx.Response:
    return http.post(path, content=content, headers={"content-type": "application/json"})


# -- bytes that are not what they claim -------------------------------------------------------------------


def test_invalid_utf8_body_is_400_naming_utf8(http: httpx.Client) -> None:
    body = b'{"model": "smollm2-135m-instruct", "prompt": "caf\xe9 \xff\xfe", "max_tokens": 2}'
    error = _error(_post_raw(http, "/v1/completions", body))
    assert error["code"] == "invalid_json" and "UTF-8" in error["message"]
    error = _error(_post_raw(http, "/v1/embeddings", b'{"input": "\xc3\x28"}'))
    assert error["code"] == "invalid_json" and "UTF-8" in error["message"]


def test_lone_surrogate_escape_is_400(http: httpx.Client) -> None:
    """Valid JSON, but "\\ud800" decodes to a lone surrogate, which no UTF-8 encoder accepts."""
    for path, body in (
        ("/v1/completions", b'{"model": "smollm2-135m-instruct", "prompt": "a\\ud800b", "max_tokens": 2}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}'),
        ("/v1/embeddings", b'{"input": ["ok", "\\ud83d"]}'),
        ("/tokenize", b'{"prompt": "\\ud800"}'),
    ):
        error = _error(_post_raw(http, path, body))
        assert "surrogate" in error["message"], (path, error)


def test_ten_megabyte_body_is_413_before_it_is_parsed(http: httpx.Client) -> None:
    body = json.dumps({"model": MODEL, "prompt": "a" * (10 << 20)}).encode()
    error = _error(_post_raw(http, "/v1/completions", body), 413)
    assert error["code"] == "request_too_large" and str(MAX_BODY_BYTES) in error["message"]


def test_ten_megabyte_grpc_message_is_resource_exhausted(server: LiveServer) -> None:
    async def go() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await rpc.EmbeddingsStub(channel).Embed(
                    pb.EmbedRequest(input=["a" * (10 << 20)]), metadata=server.grpc_metadata
                )
            return info.value

    assert asyncio.run(go()).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    "path,template",
    [
        ("/v1/completions", '{"model": "smollm2-135m-instruct", "prompt": %s}'),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"x": %s}}'),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], '
                                 '"response_format": {"type": "json_schema", "json_schema": {"schema": {"a": %s}}}}'),
        ("/v1/embeddings", '{"input": %s}'),
    ],
)
def test_json_nested_ten_thousand_deep_is_400(http: httpx.Client, path: str, template: str) -> None:
    depth = 10_000
    for nested in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
        error = _error(_post_raw(http, path, (template % nested).encode()))
        assert error["code"] in ("invalid_json", "invalid_value", "invalid_type"), error
        assert "nest" in error["message"] or "depth" in error["message"] or "Invalid value" in error["message"], error


# -- numbers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,literal",
    [
        ("temperature", "NaN"),
        ("temperature", "Infinity"),
        ("top_p", "NaN"),
        ("top_p", "-Infinity"),
        ("presence_penalty", "NaN"),
        ("frequency_penalty", "Infinity"),
        ("min_p", "NaN"),
        ("repetition_penalty", "NaN"),
        ("max_tokens", "NaN"),
        ("seed", "Infinity"),
        ("n", "NaN"),
    ],
)
def test_nan_and_infinity_are_400_naming_the_field(http: httpx.Client, field: str, literal: str) -> None:
    body = f'{{"model": "{MODEL}", "prompt": "hi", "max_tokens": 2, "{field}": {literal}}}'.replace(
        '"max_tokens": 2, "max_tokens"', '"max_tokens"'
    )
    error = _error(_post_raw(http, "/v1/completions", body.encode()))
    assert error["param"] == field, error


def test_nan_in_logit_bias_and_embedding_dimensions(http: httpx.Client) -> None:
    error = _error(_post_raw(http, "/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "logit_bias": {"5": NaN}}'))
    assert error["param"].startswith("logit_bias"), error
    error = _error(_post_raw(http, "/v1/embeddings", b'{"input": "hi", "dimensions": Infinity}'))
    assert error["param"] == "dimensions", error


@pytest.mark.parametrize(
    "path,field,value",
    [
        ("/v1/completions", "max_tokens", -1),
        ("/v1/completions", "max_tokens", 0),
        ("/v1/completions", "n", -3),
        ("/v1/completions", "temperature", -0.5),
        ("/v1/completions", "top_k", -7),
        ("/v1/completions", "min_tokens", -1),
        ("/v1/completions", "logprobs", -1),
        ("/v1/completions", "seed", -(2**64)),
        ("/v1/chat/completions", "top_logprobs", -1),
        ("/v1/chat/completions", "max_completion_tokens", -5),
        ("/v1/embeddings", "dimensions", -1),
    ],
)
def test_negative_numbers_are_400_naming_the_field(http: httpx.Client, path: str, field: str, value: int | float) -> None:
    body: dict[str, Any] = {"input": "hi"} if path == "/v1/embeddings" else {"max_tokens": 2}
    if path == "/v1/completions":
        body["prompt"] = "hi"
    elif path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": "hi"}]
    body[field] = value
    error = _error(http.post(path, json=body))
    assert error["param"] == field, error


# -- prompts ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [" ", "   \n\t  ", ["ok", "\n"], "\u3000\u00a0"])
def test_whitespace_only_prompt_is_400(http: httpx.Client, prompt: object) -> None:
    error = _error(http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2}))
    assert error["param"] == "prompt" and "whitespace" in error["message"], error


@pytest.mark.parametrize("text", ["", " ", "\t\n"])
def test_empty_or_whitespace_embedding_input_is_400(http: httpx.Client, text: str) -> None:
    for payload in (text, ["fine", text]):
        error = _error(http.post("/v1/embeddings", json={"input": payload}))
        assert error["param"] == "input", error


def test_out_of_vocabulary_token_ids_are_400(http: httpx.Client) -> None:
    for prompt in ([VOCAB], [[5, 6], [7, VOCAB + 10**6]], [10**12]):
        error = _error(http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2}))
        assert error["param"] == "prompt" and "vocabulary" in error["message"], error
    error = _error(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stop_token_ids": [VOCAB]}))
    assert error["param"] == "stop_token_ids", error
    error = _error(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "logit_bias": {str(VOCAB): 1}}))
    assert error["param"].startswith("logit_bias"), error
    error = _error(http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": [[101, EMBED_VOCAB]]}))
    assert error["param"] == "input" and "not a token id" in error["message"], error
    error = _error(http.post("/detokenize", json={"tokens": [1, VOCAB]}))
    assert error["param"] == "tokens" and "vocabulary" in error["message"], error


# -- unknown fields ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temprature": 0.5}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "guided_json": {"type": "object"}}),
        ("/v1/embeddings", {"input": "hi", "encoding": "base64"}),
        ("/tokenize", {"prompt": "hi", "add_bos": False}),
        ("/detokenize", {"tokens": [1, 2], "skip_special": True}),
        ("/v1/moderations", {"input": "hi", "threshold": 0.1}),
    ],
)
def test_unknown_fields_are_400_naming_the_field(http: httpx.Client, path: str, body: dict[str, Any]) -> None:
    (unknown,) = [k for k in body if k not in ("model", "prompt", "max_tokens", "messages", "input", "tokens")]
    error = _error(http.post(path, json=body))
    assert (error["code"], error["param"]) == ("unknown_field", unknown), error
    assert f"'{unknown}'" in error["message"], error


# -- the same over gRPC -----------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_grpc_bad_input_is_invalid_argument(server: LiveServer) -> None:
    nan, inf = float("nan"), float("inf")
    prompt_field = pb.CompletionRequest.DESCRIPTOR.fields_by_name["prompt"].number
    cases: list[tuple[str, bytes, str | None]] = [
        # (method path, raw request, the lmserve-error-param expected, or None)
        ("/lmserve.v1.Generation/Complete", pb.CompletionRequest(prompt="hi", temperature=nan).SerializeToString(), "temperature"),
        ("/lmserve.v1.Generation/Complete", pb.CompletionRequest(prompt="hi", top_p=inf).SerializeToString(), "top_p"),
        ("/lmserve.v1.Generation/Complete", pb.CompletionRequest(prompt="hi", presence_penalty=-inf).SerializeToString(), "presence_penalty"),
        ("/lmserve.v1.Generation/Complete", pb.CompletionRequest(prompt="hi", max_tokens=0).SerializeToString(), "max_tokens"),
        ("/lmserve.v1.Generation/Complete", pb.CompletionRequest(prompt="hi", n=0).SerializeToString(), "n"),
        ("/lmserve.v1.Generation/Complete", pb.CompletionRequest(prompt="   \n").SerializeToString(), "prompt"),
        ("/lmserve.v1.Generation/Complete", pb.CompletionRequest(prompt="").SerializeToString(), "prompt"),
        ("/lmserve.v1.Generation/Complete",
         pb.CompletionRequest(prompt_token_ids=pb.TokenIds(ids=[VOCAB])).SerializeToString(), "prompt"),
        ("/lmserve.v1.Generation/CompleteStream",
         pb.CompletionRequest(prompt_token_ids=pb.TokenIds(ids=[])).SerializeToString(), "prompt"),
        ("/lmserve.v1.Generation/Complete",
         pb.CompletionRequest(prompt="hi", stop_token_ids=[VOCAB]).SerializeToString(), "stop_token_ids"),
        ("/lmserve.v1.Generation/Chat",
         pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="hi")], temperature=nan).SerializeToString(), "temperature"),
        ("/lmserve.v1.Embeddings/Embed", pb.EmbedRequest(input=["ok", " \t"]).SerializeToString(), "input"),
        ("/lmserve.v1.Embeddings/Embed",
         pb.EmbedRequest(input_token_ids=[pb.TokenIds(ids=[101, EMBED_VOCAB])]).SerializeToString(), "input"),
        ("/lmserve.v1.Embeddings/Embed", pb.EmbedRequest(input=["hi"], dimensions=0).SerializeToString(), "dimensions"),
        # Invalid UTF-8 in a string field: protobuf itself refuses to parse it.
        ("/lmserve.v1.Generation/Complete", bytes([prompt_field << 3 | 2, 3]) + b"\xff\xfeA", None),
        # A field number the schema does not have (an unknown field): refused, not silently dropped.
        ("/lmserve.v1.Generation/Complete",
         pb.CompletionRequest(prompt="hi", max_tokens=2).SerializeToString() + _varint(999 << 3 | 0) + _varint(1), None),
        ("/lmserve.v1.Tokenization/Tokenize",
         pb.TokenizeRequest(prompt="hi").SerializeToString() + _varint(77 << 3 | 2) + b"\x01x", None),
    ]

    async def go() -> list[str]:
        problems = []
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            for path, raw, param in cases:
                is_stream = path.endswith("Stream")
                method = (channel.unary_stream if is_stream else channel.unary_unary)(
                    path, request_serializer=None, response_deserializer=None
                )
                try:
                    call = method(raw, metadata=server.grpc_metadata)
                    if is_stream:
                        async for _ in call:
                            pass
                    else:
                        await call
                    problems.append(f"{path} {raw[:40]!r}: succeeded")
                    continue
                except grpc.aio.AioRpcError as error:
                    trailers = dict(error.trailing_metadata() or ())
                    if error.code() != grpc.StatusCode.INVALID_ARGUMENT or not error.details():
                        problems.append(f"{path} {raw[:40]!r}: {error.code()} {error.details()}")
                    elif param is not None and trailers.get("lmserve-error-param") != param:
                        problems.append(f"{path} {raw[:40]!r}: param {trailers.get('lmserve-error-param')} != {param}")
            ok = await rpc.ModelsStub(channel).ListModels(pb.ListModelsRequest(), metadata=server.grpc_metadata)
            assert ok.data
        return problems

    problems = asyncio.run(go())
    assert not problems, "\n".join(problems)
