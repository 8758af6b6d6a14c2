"""The Responses API against the real server: the official openai SDK on /v1/responses (plain, streamed,
json_schema, forced function tools, previous_response_id, the store's owners and bound) and the
lmserve.v1 Responses service over a grpc channel. Greedy answers are compared with the chat path's."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import replace

import grpc
import httpx
import jsonschema
import openai
import pytest

from lmserve.api.presentation import PresentedChoice, ToolCallPiece
from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.response_output import OutputAssembler
from lmserve.api.proto import lmserve_pb2_grpc as rpc
from lmserve.api.response_store import ResponseStore, StoredResponse
from lmserve.app import make_server, with_config
from tests.api.conftest import OTHER_KEY, LiveServer, Servers

MODEL = "smollm2-135m-instruct"
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 12}},
    "required": ["answer"],
    "additionalProperties": False,
}


def _client(server: LiveServer, key: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, timeout=60.0)


def _chat_text(client: openai.OpenAI, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int]:
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)  # type: ignore[arg-type]
    assert chat.usage is not None
    return chat.choices[0].message.content or "", chat.usage.prompt_tokens


def test_create_is_the_chat_answer_and_chains_by_previous_response_id(openai_client: openai.OpenAI, http: httpx.Client) -> None:
    first = openai_client.responses.create(
        model=MODEL, instructions="Answer briefly.", input="Name a color.", max_output_tokens=6, temperature=0
    )
    assert first.object == "response" and first.id.startswith("resp-") and first.model == MODEL
    assert first.status == "incomplete" and first.incomplete_details is not None
    assert first.incomplete_details.reason == "max_output_tokens"
    [message] = first.output
    assert message.type == "message" and message.role == "assistant" and message.status == "incomplete"
    turn1 = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a color."}]
    text, prompt_tokens = _chat_text(openai_client, turn1, 6)
    assert first.output_text == text and text
    assert first.usage is not None
    assert (first.usage.input_tokens, first.usage.output_tokens, first.usage.total_tokens) == (prompt_tokens, 6, prompt_tokens + 6)
    assert first.usage.output_tokens_details.reasoning_tokens == 0
    assert first.instructions == "Answer briefly." and first.max_output_tokens == 6

    second = openai_client.responses.create(
        model=MODEL, previous_response_id=first.id, input="Another one.", max_output_tokens=4, temperature=0
    )
    assert second.previous_response_id == first.id
    # The earlier turn's input and output come first; its instructions do not (as OpenAI does).
    turn2 = [turn1[1], {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "Another one."}]
    text2, prompt_tokens2 = _chat_text(openai_client, turn2, 4)
    assert second.output_text == text2
    assert second.usage is not None and second.usage.input_tokens == prompt_tokens2
    counted = http.post("/tokenize", json={"model": MODEL, "messages": turn2}).json()["count"]
    assert counted == prompt_tokens2
    assert openai_client.responses.retrieve(second.id).output_text == text2


def test_stream_sends_the_typed_events_in_order(openai_client: openai.OpenAI) -> None:
    whole = openai_client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=5, temperature=0, store=False)
    events = list(openai_client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=5, temperature=0, stream=True))
    types = [e.type for e in events]
    num_deltas = types.count("response.output_text.delta")
    assert num_deltas >= 1
    assert types == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * num_deltas,
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.incomplete",
    ]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress"  # type: ignore[union-attr]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert deltas == whole.output_text == events[-1].response.output_text  # type: ignore[union-attr]
    assert events[-1].response.usage.output_tokens == 5  # type: ignore[union-attr]
    with pytest.raises(openai.NotFoundError):  # store=False: not kept
        openai_client.responses.retrieve(whole.id)


def test_json_schema_text_format_is_followed(openai_client: openai.OpenAI) -> None:
    response = openai_client.responses.create(
        model=MODEL, input="What is the capital of France? Answer in JSON.", max_output_tokens=40, temperature=0,
        text={"format": {"type": "json_schema", "name": "answer", "schema": ANSWER_SCHEMA, "strict": True}},
    )  # fmt: skip
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), ANSWER_SCHEMA)
    assert response.text is not None and response.text.format.type == "json_schema"


def test_forced_function_tool_streamed_then_its_output_sent_back(openai_client: openai.OpenAI) -> None:
    with openai_client.responses.stream(
        model=MODEL, input="What is the weather in Paris?", tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=40, temperature=0,
    ) as stream:  # fmt: skip
        types = [event.type for event in stream]
        called = stream.get_final_response()
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert "response.function_call_arguments.delta" in types
    assert types[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert called.status == "completed"
    [call] = called.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER_TOOL["parameters"])

    # The call's result as the next turn's input: the prompt is chat's for the same conversation.
    output = "Sunny, 24 C"
    reply = openai_client.responses.create(
        model=MODEL, previous_response_id=called.id, tools=[WEATHER_TOOL], max_output_tokens=2, temperature=0,  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": output}],
    )  # fmt: skip
    chat_tool = {"type": "function", "function": {k: v for k, v in WEATHER_TOOL.items() if k != "type"}}
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        ]},
        {"role": "tool", "tool_call_id": call.call_id, "content": output},
    ]  # fmt: skip
    chat = openai_client.chat.completions.create(
        model=MODEL, messages=messages, tools=[chat_tool], max_tokens=2, temperature=0  # type: ignore[arg-type, list-item]
    )
    assert reply.usage is not None and chat.usage is not None
    assert reply.usage.input_tokens == chat.usage.prompt_tokens
    # The tools' system turn and the question came from the prefix cache (16-token blocks).
    assert reply.usage.input_tokens_details.cached_tokens >= called.usage.input_tokens // 16 * 16 - 16  # type: ignore[union-attr]
    assert reply.output_text == (chat.choices[0].message.content or "")


def test_another_key_cannot_read_use_or_delete_a_stored_response(server: LiveServer, openai_client: openai.OpenAI) -> None:
    mine = openai_client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, temperature=0)
    with _client(server, OTHER_KEY) as other:
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(mine.id)
        with pytest.raises(openai.NotFoundError) as info:
            other.responses.create(model=MODEL, previous_response_id=mine.id, input="Hi", max_output_tokens=2)
        assert info.value.body["param"] == "previous_response_id"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            other.responses.delete(mine.id)
    assert openai_client.responses.retrieve(mine.id).output_text == mine.output_text
    openai_client.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve(mine.id)


def test_a_blocked_answer_ends_incomplete_for_content_filter(servers: Servers) -> None:
    """The guarded server's policy blocks "Paris" in output: the presented finish_reason becomes the status."""
    with _client(servers.guarded, servers.guarded.api_key) as client:
        response = client.responses.create(model=MODEL, input="What is the capital of France?", max_output_tokens=12, temperature=0)
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "content_filter"
    assert "Paris" not in response.output_text and response.output[0].status == "incomplete"


def test_bad_requests_are_clear_400s(openai_client: openai.OpenAI) -> None:
    cases = [
        ({"input": [{"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0].type"),
        ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "Hi", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
        ({"input": "Hi", "max_output_tokens": 10**6}, "max_output_tokens"),
        ({"input": [{"type": "computer_call"}]}, "input[0].type"),
        ({"input": "Hi", "truncation": "auto"}, "truncation"),
        ({"input": "Hi", "include": ["reasoning.encrypted_content"]}, "include"),
    ]
    for body, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            openai_client.responses.create(model=MODEL, **body)  # type: ignore[arg-type]
        assert info.value.body["param"] == param, body  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.responses.create(model=MODEL, input="Hi", extra_headers={"x-request-timeout": "soon"})
    assert info.value.body["param"] == "x-request-timeout"  # type: ignore[index]


def test_the_store_keeps_both_bounds() -> None:
    def entry(i: int, num_bytes: int) -> StoredResponse:
        return StoredResponse(f"resp-{i}", "key-a", None, (), num_bytes)

    store = ResponseStore(max_responses=3, max_bytes=100)
    for i in range(4):
        store.put(entry(i, 10))
    assert [store.get("key-a", f"resp-{i}") is not None for i in range(4)] == [False, True, True, True]
    store.put(entry(4, 85))  # over the byte bound: the oldest go until it holds
    assert [store.get("key-a", f"resp-{i}") is not None for i in range(5)] == [False, False, False, True, True]
    assert store.num_bytes == 95 and store.get("key-b", "resp-4") is None
    store.put(entry(5, 101))  # larger than the whole bound: not kept, nothing evicted
    assert len(store) == 2


def test_reasoning_text_and_calls_become_items_in_order() -> None:
    """What a reasoning parser sets (PresentedChoice.reasoning) comes first, as a reasoning item."""
    assembler = OutputAssembler()

    def piece(**kw: object) -> PresentedChoice:
        fields = {"index": 0, "is_first": False, "content": "", "token_ids": [1], "logprobs": None, "finish_reason": None}
        return PresentedChoice(**{**fields, **kw})  # type: ignore[arg-type]

    events = assembler.feed(piece(reasoning="Think", is_first=True)) + assembler.feed(piece(reasoning="ing."))
    events += assembler.feed(piece(content="Calling."))
    events += assembler.feed(piece(tool_calls=[ToolCallPiece(0, "call_1", "f", '{"a"')]))
    events += assembler.feed(piece(tool_calls=[ToolCallPiece(0, None, None, ": 1}")], finish_reason="tool_calls"))
    events += assembler.finish()
    assert [e.type.removeprefix("response.") for e in events] == [
        "output_item.added", "reasoning_text.delta", "reasoning_text.delta", "reasoning_text.done", "output_item.done",
        "output_item.added", "content_part.added", "output_text.delta",
        "output_text.done", "content_part.done", "output_item.done",
        "output_item.added", "function_call_arguments.delta", "function_call_arguments.delta",
        "function_call_arguments.done", "output_item.done",
    ]  # fmt: skip
    assert [(i.type, i.text, i.arguments, i.status) for i in assembler.items] == [
        ("reasoning", "Thinking.", "", "completed"), ("message", "Calling.", "", "completed"),
        ("function_call", "", '{"a": 1}', "completed"),
    ]  # fmt: skip
    assert [e.output_index for e in events if e.type.endswith("item.done")] == [0, 1, 2]


@pytest.fixture(scope="module")
def tiny_store_server(server: LiveServer) -> Iterator[LiveServer]:
    """The main server's models under a store of two responses: a second HTTP server on the same loop."""
    config = server.state.config
    state = with_config(server.state, replace(config, limits=replace(config.limits, responses_store_max_responses=2)))
    http_server = make_server(state, host="127.0.0.1", port=0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    assert server.loop is not None
    task = asyncio.run_coroutine_threadsafe(http_server.serve(sockets=[sock]), server.loop)
    deadline = time.monotonic() + 30
    while not http_server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield replace(server, port=sock.getsockname()[1], state=state)
    finally:
        http_server.should_exit = True
        task.result(30)
        sock.close()


def test_the_oldest_stored_response_is_evicted(tiny_store_server: LiveServer) -> None:
    with _client(tiny_store_server, tiny_store_server.api_key) as client:
        ids = [client.responses.create(model=MODEL, input=f"Count {i}", max_output_tokens=1, temperature=0).id for i in range(3)]
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(ids[0])
        assert [client.responses.retrieve(i).id for i in ids[1:]] == ids[1:]


# -- gRPC -----------------------------------------------------------------------------------------------------


def test_grpc_responses_unary_streamed_get_and_delete(server: LiveServer, openai_client: openai.OpenAI) -> None:
    over_http = openai_client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=5, temperature=0, store=False)
    req = pb.CreateResponseRequest(model=MODEL, input="Say hello.", max_output_tokens=5, temperature=0)
    other = (("authorization", f"Bearer {OTHER_KEY}"),)

    async def go() -> None:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = rpc.ResponsesStub(channel)
            unary = await stub.CreateResponse(req, metadata=server.grpc_metadata)
            assert unary.output_text == over_http.output_text and unary.status == "incomplete"
            assert unary.incomplete_reason == "max_output_tokens" and unary.usage.output_tokens == 5
            assert [i.type for i in unary.output] == ["message"]

            events = [e async for e in stub.CreateResponseStream(req, metadata=server.grpc_metadata)]
            assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
            assert events[-1].type == "response.incomplete" and [e.sequence_number for e in events] == list(range(len(events)))
            assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == unary.output_text

            got = await stub.GetResponse(pb.ResponseIdRequest(response_id=unary.id), metadata=server.grpc_metadata)
            assert got == unary
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetResponse(pb.ResponseIdRequest(response_id=unary.id), metadata=other)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            deleted = await stub.DeleteResponse(pb.ResponseIdRequest(response_id=unary.id), metadata=server.grpc_metadata)
            assert deleted.deleted
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetResponse(pb.ResponseIdRequest(response_id=unary.id), metadata=server.grpc_metadata)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

            tools = [pb.Tool(function=pb.FunctionDefinition(name="get_weather", parameters=json.dumps(WEATHER_TOOL["parameters"])))]
            forced = pb.CreateResponseRequest(
                model=MODEL, input="Weather in Paris?", tools=tools, tool_choice=pb.ToolChoice(mode="required"),
                parallel_tool_calls=False, max_output_tokens=40, temperature=0, store=False,
            )  # fmt: skip
            called = await stub.CreateResponse(forced, metadata=server.grpc_metadata)
            assert called.status == "completed"
            [call] = called.output
            assert call.type == "function_call" and call.name == "get_weather"
            jsonschema.validate(json.loads(call.arguments), WEATHER_TOOL["parameters"])

    asyncio.run(go())
