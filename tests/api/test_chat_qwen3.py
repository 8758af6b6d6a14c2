"""A tiny random-weight checkpoint with Qwen3's real chat template, served with no parser flags: the
template shows Hermes tool calls and <think> reasoning, so both parsers are on. A random model never
thinks or calls by itself, so the output is forced: a required or named tool_choice or a json_schema (a
grammar that lets it think first) and a logit_bias towards the tokens of <think> and </think>, so it
thinks and its thinking ends within max_tokens for some seed.
The same seeded request over HTTP and gRPC, whole and streamed, must give the same thinking, content and
calls; the calls always parse and validate."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.api.chat_formats import ASK, TEMPLATES, TOOLS, Answer, four_ways, grpc_answer, http_answer, openai_client
from tests.api.conftest import LiveServer, template_server


@pytest.fixture(scope="module")
def qwen3(tiny_llama_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with template_server(tiny_llama_dir, TEMPLATES / "qwen3.jinja", tmp_path_factory.mktemp("qwen3") / "model", cache_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(qwen3: LiveServer) -> Iterator[openai.OpenAI]:
    with openai_client(qwen3) as c:
        yield c


def _bias(server: LiveServer, *texts: str) -> dict[str, float]:
    """A logit_bias that makes the tokens of `texts` (and only those) likely. With </think>'s the
    thinking soon ends; with <think>'s too, the model thinks where the grammar lets it choose."""
    ids = {t for text in texts for t in server.state.tokenizer.encode(text, add_special_tokens=False)}
    return {str(t): 100.0 for t in ids}


def test_the_template_renders_tools_and_thinking_switch(client: openai.OpenAI, qwen3: LiveServer) -> None:
    import httpx

    with httpx.Client(base_url=qwen3.base_url, timeout=30) as http:
        body = {"messages": ASK, "tools": TOOLS, "return_token_strs": True}
        text = "".join(http.post("/tokenize", json=body).json()["token_strs"])
        off = "".join(http.post("/tokenize", json={**body, "chat_template_kwargs": {"enable_thinking": False}}).json()["token_strs"])
    assert "<tools>" in text and "get_weather" in text  # Qwen3's template wrote the tools itself
    assert text.replace("Ġ", " ").replace("Ċ", "\n").endswith("assistant\n")
    assert off.replace("Ċ", "\n").endswith("<think>\n\n</think>\n\n")


def _thinking_seed(client: openai.OpenAI, **kw: object) -> tuple[int, Answer]:
    """The first seed whose sampled thinking ends within max_tokens, and its whole HTTP answer (the bias
    makes </think> likely, not certain: a request still thinking at max_tokens ends with "length" and no
    answer, as it should)."""
    for seed in range(10):
        answer = http_answer(client, False, seed=seed, **kw)
        if answer.finish_reason != "length" and answer.reasoning:
            return seed, answer
    raise AssertionError("no seed of 10 thought and ended its thinking")


@pytest.mark.slow
def test_forced_call_after_thinking_is_the_same_four_ways(client: openai.OpenAI, qwen3: LiveServer) -> None:
    # A call's `<tool_call>` and `<think>` share their first token; then `think` is the likely one.
    kw = dict(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0, max_tokens=160,
              logit_bias=_bias(qwen3, "</think>"))  # fmt: skip
    seed, whole = _thinking_seed(client, **kw)
    answers = [http_answer(client, True, seed=seed, **kw), grpc_answer(qwen3, False, seed=seed, **kw),
               grpc_answer(qwen3, True, seed=seed, **kw)]  # fmt: skip
    assert whole.reasoning and "<think>" not in whole.reasoning and "</think>" not in whole.reasoning
    assert whole.content is None and whole.finish_reason == "tool_calls"
    whole.check_calls()
    assert len(whole.calls) == 1
    for other in answers:
        assert other == whole


def test_named_call_with_thinking_off(client: openai.OpenAI, qwen3: LiveServer) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    answers = four_ways(qwen3, client, tools=TOOLS, tool_choice=named, temperature=1.0, seed=3, max_tokens=60,
                        chat_template_kwargs={"enable_thinking": False})  # fmt: skip
    assert answers[0].reasoning is None and answers[0].finish_reason == "stop"  # OpenAI's finish for a named call
    answers[0].check_calls()
    assert [a.calls[0][0] for a in answers] == ["get_weather"] * 4
    assert all(a == answers[0] for a in answers[1:])


def test_structured_answer_after_thinking(client: openai.OpenAI, qwen3: LiveServer) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    kw = dict(temperature=1.0, max_tokens=160, logit_bias=_bias(qwen3, "<think>", "</think>"),
              response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})  # fmt: skip
    seed, whole = _thinking_seed(client, **kw)
    streamed = http_answer(client, True, seed=seed, **kw)
    assert whole == streamed and whole.reasoning
    assert set(json.loads(whole.content or "")) == {"ok"}  # the answer, apart from the thinking, is the JSON
    plain = http_answer(client, False, temperature=0.0, max_tokens=6, chat_template_kwargs={"enable_thinking": False})
    assert plain.reasoning is None and plain == Answer(None, plain.content, [], plain.finish_reason)


def test_bad_chat_template_kwargs_over_grpc_name_the_field(qwen3: LiveServer) -> None:
    import grpc

    from lmserve.api.proto import lmserve_pb2 as pb
    from lmserve.api.proto import lmserve_pb2_grpc as rpc

    with grpc.insecure_channel(qwen3.grpc_target) as channel:
        stub = rpc.GenerationStub(channel)
        for bad in ("{not json", "[1]"):
            req = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="hi")], chat_template_kwargs=bad, max_tokens=2)
            with pytest.raises(grpc.RpcError) as info:
                stub.Chat(req, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert ("lmserve-error-param", "chat_template_kwargs") in info.value.trailing_metadata()


def test_responses_split_the_thinking_into_a_reasoning_item_and_count_its_tokens(
    client: openai.OpenAI, qwen3: LiveServer
) -> None:
    """The Responses API on the same call: the thinking is a reasoning item before the message, whole and
    streamed, and usage counts its tokens: those through the one completing </think>, as chat's logprobs
    of the same seeded request spell them out."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    bias = _bias(qwen3, "<think>", "</think>")
    kw = dict(temperature=1.0, max_tokens=160, logit_bias=bias,
              response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})  # fmt: skip
    seed, whole = _thinking_seed(client, **kw)
    chat = client.chat.completions.create(model="m", messages=ASK, seed=seed, logprobs=True, **kw)
    tokens = [t.token for t in chat.choices[0].logprobs.content]
    thinking = next(k for k in range(1, len(tokens) + 1) if "</think>" in "".join(tokens[:k]))

    request = dict(model="m", input=ASK, temperature=1.0, max_output_tokens=160, extra_body={"seed": seed, "logit_bias": bias},
                   text={"format": {"type": "json_schema", "name": "r", "schema": schema}})  # fmt: skip
    response = client.responses.create(**request)
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == whole.reasoning and response.output_text == whole.content
    assert response.usage.output_tokens == len(tokens)
    assert response.usage.output_tokens_details.reasoning_tokens == thinking < len(tokens)

    with client.responses.stream(**request) as stream:
        events = list(stream)
    done = events[-1]
    assert done.type == "response.completed"
    said = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert said == whole.reasoning and done.response.usage.output_tokens_details.reasoning_tokens == thinking
