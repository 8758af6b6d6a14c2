"""Structured outputs and tool calls against the real server (SmolLM2-135M-Instruct, float32), with the
openai SDK, httpx and a grpc channel: every output is checked with jsonschema / re, so a constraint that is
not enforced fails here (this model, asked for JSON at temperature 1, rarely writes valid JSON unaided).
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.proto import lmserve_pb2_grpc as rpc
from tests.api.conftest import LiveServer

MODEL = "smollm2-135m-instruct"
ASK_JSON = [{"role": "user", "content": "Give me an example record as JSON."}]
BATCH = 16  # constrained requests in flight at once, each batch also carrying unconstrained ones

# -- bounded random JSON schemas ------------------------------------------------------------------------

_NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
_LEAVES = st.one_of(
    st.builds(lambda lo, n: {"type": "string", "minLength": lo, "maxLength": lo + n}, st.integers(0, 2), st.integers(1, 8)),
    st.builds(lambda lo, n: {"type": "integer", "minimum": lo, "maximum": lo + n}, st.integers(-1000, 1000), st.integers(0, 5000)),
    # multipleOf bounds a number's digits too (a plain bounded number may have any number of decimals);
    # binary fractions, so that jsonschema's float check is exact.
    st.builds(
        lambda lo, n, step: {"type": "number", "minimum": lo, "maximum": lo + n, "multipleOf": step},
        st.integers(-100, 100),
        st.integers(1, 1000),
        st.sampled_from([0.5, 0.25, 0.125]),
    ),
    st.just({"type": "boolean"}),
    st.lists(st.one_of(st.sampled_from(["red", "green", "blue", "a b"]), st.integers(-5, 5)), min_size=1, max_size=4, unique=True).map(
        lambda values: {"enum": values}
    ),
)


def _object(props: dict[str, Any], required: list[bool]) -> dict[str, Any]:
    names = list(props)
    return {
        "type": "object",
        "properties": props,
        "required": [n for n, r in zip(names, required) if r],
        "additionalProperties": False,
    }


def _containers(children: st.SearchStrategy) -> st.SearchStrategy:
    arrays = st.builds(
        lambda item, lo, n: {"type": "array", "items": item, "minItems": lo, "maxItems": lo + n},
        children,
        st.integers(0, 1),
        st.integers(1, 2),
    )
    objects = st.dictionaries(_NAMES, children, min_size=1, max_size=4).flatmap(
        lambda props: st.lists(st.booleans(), min_size=len(props), max_size=len(props)).map(lambda req: _object(props, req))
    )
    return st.one_of(arrays, objects)


SCHEMAS = st.dictionaries(_NAMES, st.recursive(_LEAVES, _containers, max_leaves=6), min_size=1, max_size=4).flatmap(
    lambda props: st.lists(st.booleans(), min_size=len(props), max_size=len(props)).map(lambda req: _object(props, req))
)


def _chars_bound(schema: dict[str, Any]) -> int:
    """An upper bound on the JSON text's length (hence on its tokens): strings may be all \\uXXXX escapes;
    a bounded integer or a multiple of 1/8 in a bounded range fits 24 characters."""
    if "enum" in schema:
        return max(len(json.dumps(v)) for v in schema["enum"])
    kind = schema["type"]
    if kind == "string":
        return 2 + 6 * schema["maxLength"]
    if kind in ("integer", "number"):
        return 24
    if kind == "boolean":
        return 5
    if kind == "array":
        return 2 + schema["maxItems"] * (_chars_bound(schema["items"]) + 2)
    return 2 + sum(len(json.dumps(k)) + 4 + _chars_bound(v) for k, v in schema["properties"].items())


def _chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(model=MODEL, **kwargs)


def _draw_schemas(num: int) -> list[dict[str, Any]]:
    """`num` distinct schemas from hypothesis, reproducibly, spread over a 400-example run (its first examples
    are the smallest), each with a length bound of at most 200 characters (under the max_tokens cap of 256)."""
    seen: list[dict[str, Any]] = []

    @given(SCHEMAS)
    @settings(max_examples=400, derandomize=True, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    def collect(schema: dict[str, Any]) -> None:
        if schema not in seen and _chars_bound(schema) <= 200:
            seen.append(schema)

    collect()
    assert len(seen) >= num

    def spread(pool: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
        return [pool[i * len(pool) // count] for i in range(min(count, len(pool)))]

    # At least 12 with enums and 12 with arrays, whatever share of them the draw happens to hold (hypothesis's
    # draw is reproducible, but its mix has moved with the tests that ran before in the same process).
    enums = [s for s in seen if "enum" in json.dumps(s)]
    arrays = [s for s in seen if '"array"' in json.dumps(s) and s not in enums]
    picked = spread(enums, 12) + spread(arrays, 12)
    return picked + spread([s for s in seen if s not in picked], num - len(picked))


@pytest.mark.slow
def test_random_json_schemas_validate_in_mixed_batches(server: LiveServer) -> None:
    """32 hypothesis schemas at temperature 1, sixteen at a time, each batch beside unconstrained requests."""
    schemas = _draw_schemas(32)
    # A batch runs as long as its longest output (up to 256 tokens): minutes on a loaded 2-core machine.
    openai_client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0, timeout=600.0)
    assert sum('"array"' in json.dumps(s) for s in schemas) >= 10 and sum("enum" in json.dumps(s) for s in schemas) >= 10

    def constrained(i: int) -> tuple[int, Any]:
        schema = schemas[i]
        resp = _chat(
            openai_client,
            messages=ASK_JSON,
            temperature=1.0,
            seed=i,
            max_tokens=_chars_bound(schema),
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}},
        )
        return i, resp

    def unconstrained(i: int) -> Any:
        return _chat(openai_client, messages=ASK_JSON, temperature=1.0, seed=1000 + i, max_tokens=48)

    with ThreadPoolExecutor(max_workers=BATCH + 4) as pool:
        for start in range(0, len(schemas), BATCH):
            plain = [pool.submit(unconstrained, start + k) for k in range(4)]
            results = list(pool.map(constrained, range(start, min(start + BATCH, len(schemas)))))
            for i, resp in results:
                choice = resp.choices[0]
                assert choice.finish_reason == "stop", f"schema {i} {schemas[i]}: {choice.finish_reason}, {choice.message.content!r}"
                jsonschema.validate(json.loads(choice.message.content), schemas[i])
            for future in plain:
                assert future.result().choices[0].finish_reason in ("stop", "length")
    openai_client.close()


class Pet(BaseModel):
    name: str = Field(max_length=16)
    species: str = Field(max_length=12)
    age: int = Field(ge=0, le=40)
    vaccinated: bool
    toys: list[str] = Field(max_length=3)


def test_sdk_parse_returns_a_pydantic_object(openai_client: openai.OpenAI) -> None:
    completion = openai_client.beta.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a pet as JSON."}],
        response_format=Pet,
        temperature=1.0,
        seed=5,
        max_tokens=200,
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, Pet), message.content
    assert 0 <= message.parsed.age <= 40 and len(message.parsed.toys) <= 3
    assert completion.choices[0].finish_reason == "stop"


def test_regex_and_choice_on_chat_and_completions(openai_client: openai.OpenAI) -> None:
    pattern = r"(red|blue|green)-[0-9]{2}-[a-z]{3,6}"  # not PII: the safety filter would redact a phone number
    choices = ["positive", "negative", "neutral"]

    def run(i: int) -> tuple[str, str]:
        if i % 3 == 0:
            resp = openai_client.completions.create(
                model=MODEL, prompt="Product code:", temperature=1.0, seed=i, max_tokens=30,
                extra_body={"structured_outputs": {"regex": pattern}},
            )
            return "regex", resp.choices[0].text
        if i % 3 == 1:
            resp = _chat(openai_client, messages=[{"role": "user", "content": "A product code?"}], temperature=1.0, seed=i,
                         max_tokens=30, extra_body={"structured_outputs": {"regex": pattern}})
            return "regex", resp.choices[0].message.content
        resp = _chat(openai_client, messages=[{"role": "user", "content": "I loved this film. Sentiment?"}], temperature=1.0,
                     seed=i, max_tokens=8, extra_body={"structured_outputs": {"choice": choices}})
        return "choice", resp.choices[0].message.content

    with ThreadPoolExecutor(max_workers=12) as pool:
        outputs = list(pool.map(run, range(12)))
    for kind, text in outputs:
        if kind == "regex":
            assert re.fullmatch(pattern, text), text
        else:
            assert text in choices


def test_json_object_grammar_and_the_length_finish(http: httpx.Client) -> None:
    resp = http.post("/v1/completions", json={"prompt": "A JSON object:", "max_tokens": 64, "temperature": 0.7, "seed": 1,
                                               "response_format": {"type": "json_object"}})
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["text"]), dict)
    lark = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,3}/'
    resp = http.post("/v1/chat/completions", json={"messages": ASK_JSON, "max_tokens": 20, "temperature": 1.0, "seed": 2,
                                                   "structured_outputs": {"grammar": lark}})
    assert re.fullmatch(r"The answer is [0-9]{1,3}\.", resp.json()["choices"][0]["message"]["content"])
    # A constrained request cut by max_tokens: finish_reason "length" and the partial text, as OpenAI does.
    schema = {"type": "object", "properties": {"story": {"type": "string", "minLength": 100}}, "required": ["story"]}
    resp = http.post("/v1/chat/completions", json={"messages": ASK_JSON, "max_tokens": 6, "temperature": 1.0, "seed": 3,
                                                   "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"].startswith('{"story": "')
    assert resp.json()["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
         "response_format.json_schema.schema", "uniqueItems"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex", "unclosed group"),
        ({"structured_outputs": {"grammar": "start: nothing_here"}}, "structured_outputs.grammar", "unknown name"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag", "Extra inputs"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs", "not both"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "needs"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": {
            "type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 64} for i in range(300)}}}}},
         "response_format.json_schema.schema", "at most 16384"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}},
         "tool_choice", "not among the tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name", "1-64"),
        ({"tool_choice": "required"}, "tool_choice", "requires tools"),
    ],
)
def test_bad_constraints_are_a_400_naming_the_problem(http: httpx.Client, body: dict[str, Any], param: str, fragment: str) -> None:
    resp = http.post("/v1/chat/completions", json={"messages": ASK_JSON, "max_tokens": 4, **body})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and fragment in error["message"], error


# -- tool calls -------------------------------------------------------------------------------------------

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}}, "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": TIME}},
]
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMA_OF = {"get_weather": WEATHER, "get_time": TIME}


def _check_call(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), SCHEMA_OF[name])


@pytest.mark.slow
def test_tool_choice_required_and_named_non_streaming(openai_client: openai.OpenAI) -> None:
    for seed in range(3):
        resp = _chat(openai_client, messages=ASK_WEATHER, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed,
                     max_tokens=150, parallel_tool_calls=False)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        _check_call(call.function.name, call.function.arguments)
    named = _chat(openai_client, messages=ASK_WEATHER, tools=TOOLS, temperature=1.0, seed=9, max_tokens=150,
                  tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named.choices[0].finish_reason == "stop"  # OpenAI's finish for a named tool_choice
    [call] = named.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    _check_call("get_time", call.function.arguments)


def test_tool_calls_stream_as_openai_deltas(openai_client: openai.OpenAI) -> None:
    stream = _chat(openai_client, messages=ASK_WEATHER, tools=TOOLS, tool_choice="required", temperature=1.0, seed=4,
                   max_tokens=150, stream=True, n=2)
    calls: dict[tuple[int, int], dict[str, str]] = {}
    finish: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            for piece in choice.delta.tool_calls or ():
                call = calls.setdefault((choice.index, piece.index), {"id": "", "name": "", "arguments": ""})
                if piece.id:
                    assert not call["id"], "a call's id comes once, on its first piece"
                    call["id"], call["name"] = piece.id, piece.function.name
                call["arguments"] += piece.function.arguments or ""
            assert not choice.delta.content, "a required tool call has no content"
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert finish == {0: "tool_calls", 1: "tool_calls"}
    assert {k[0] for k in calls} == {0, 1}
    for call in calls.values():
        assert call["id"].startswith("call_")
        _check_call(call["name"], call["arguments"])


def test_tool_choice_auto_and_none_answer_in_openai_shape(openai_client: openai.OpenAI, http: httpx.Client) -> None:
    auto = _chat(openai_client, messages=ASK_WEATHER, tools=TOOLS, temperature=0.0, max_tokens=60)
    # SmolLM2's template ignores `tools`: the tools are described in a system message, which /tokenize
    # renders too.
    tokenized = http.post("/tokenize", json={"messages": ASK_WEATHER, "tools": TOOLS, "return_token_strs": True}).json()
    assert auto.usage.prompt_tokens == tokenized["count"]
    assert "<tool_call>" in "".join(tokenized["token_strs"]) and "get_weather" in "".join(tokenized["token_strs"])
    message = auto.choices[0].message
    if message.tool_calls:  # the model chose to call: then the calls parse and finish_reason says so
        assert auto.choices[0].finish_reason == "tool_calls"
        for call in message.tool_calls:
            assert call.function.name in SCHEMA_OF and isinstance(json.loads(call.function.arguments), dict)
    else:
        assert isinstance(message.content, str) and "<tool_call>" not in message.content
    none = _chat(openai_client, messages=ASK_WEATHER, tools=TOOLS, tool_choice="none", temperature=0.0, max_tokens=8)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")
    # A conversation carrying an earlier call and its result renders and runs.
    history = ASK_WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    followup = _chat(openai_client, messages=history, tools=TOOLS, tool_choice="none", temperature=0.0, max_tokens=8)
    assert followup.choices[0].message.content


# -- gRPC -------------------------------------------------------------------------------------------------


def test_grpc_structured_outputs_and_tools(server: LiveServer) -> None:
    schema = {"type": "object", "properties": {"word": {"enum": ["alpha", "beta"]}, "n": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["word", "n"], "additionalProperties": False}
    with grpc.insecure_channel(server.grpc_target) as channel:
        gen = rpc.GenerationStub(channel)
        md = server.grpc_metadata
        resp = gen.Chat(pb.ChatRequest(
            messages=[pb.ChatMessage(role="user", content="JSON please")], max_tokens=40, temperature=1.0, seed=1,
            response_format=pb.ResponseFormat(type="json_schema", json_schema=pb.JsonSchemaFormat(name="s", schema=json.dumps(schema))),
        ), metadata=md)
        jsonschema.validate(json.loads(resp.choices[0].content), schema)
        completion = gen.Complete(pb.CompletionRequest(
            prompt="Colour:", max_tokens=8, temperature=1.0, seed=2,
            structured_outputs=pb.StructuredOutputs(choice=pb.ChoiceList(choices=["red", "green"])),
        ), metadata=md)
        assert completion.choices[0].text in ("red", "green")
        tools = [pb.Tool(type="function", function=pb.FunctionDefinition(name=t["function"]["name"], parameters=json.dumps(t["function"]["parameters"])))
                 for t in TOOLS]
        request = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="Weather in Paris?")], max_tokens=150, temperature=1.0,
                                 seed=3, tools=tools, tool_choice=pb.ToolChoice(function_name="get_weather"))
        unary = gen.Chat(request, metadata=md)
        [call] = unary.choices[0].tool_calls
        assert call.function.name == "get_weather" and unary.choices[0].finish_reason == "stop"
        _check_call("get_weather", call.function.arguments)
        name, arguments, finish = "", "", ""
        for chunk in gen.ChatStream(request, metadata=md):
            for choice in chunk.choices:
                for piece in choice.tool_calls:
                    name = name or piece.function.name
                    arguments += piece.function.arguments
                finish = choice.finish_reason or finish
        assert name == "get_weather" and finish == "stop"
        assert json.loads(arguments) == json.loads(call.function.arguments)  # same seed, same call
        with pytest.raises(grpc.RpcError) as info:
            gen.Chat(pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")], max_tokens=4,
                                    structured_outputs=pb.StructuredOutputs(regex="[a-")), metadata=md)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unclosed character class" in info.value.details()
        assert dict(info.value.trailing_metadata())["lmserve-error-param"] == "structured_outputs.regex"
