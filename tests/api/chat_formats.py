"""What the chat-template servers' tests share (test_chat_qwen3.py, test_chat_llama3.py, test_chat_mistral.py):
the tools, and one chat asked four ways (HTTP with the openai SDK and gRPC, whole and streamed), each
read back as the same `Answer` so the tests compare them field for field; and a tool parser's events read
back as content and calls (test_tool_formats.py, test_tools.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import openai

from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.proto import lmserve_pb2_grpc as rpc
from lmserve.api.tool_calls import ToolEvent
from lmserve.api.tools import ToolPlan
from tests.api.conftest import LiveServer

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "chat_templates"
# Bounded arguments (enums, a boolean): a random-weight model writes a schema-valid call in few tokens.
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]}, "metric": {"type": "boolean"}},
    "required": ["city"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {}, "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time now", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@dataclass
class Answer:
    reasoning: str | None
    content: str | None
    calls: list[tuple[str, str]] = field(default_factory=list)  # (name, arguments)
    finish_reason: str | None = None

    def check_calls(self) -> None:
        """Every call names a tool and its arguments validate against that tool's schema."""
        assert self.calls, self
        for name, arguments in self.calls:
            jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def openai_client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=60.0)


def http_answer(client: openai.OpenAI, stream: bool, **kw: Any) -> Answer:
    extra = {k: kw.pop(k) for k in ("chat_template_kwargs", "structured_outputs") if k in kw}
    if not stream:
        resp = client.chat.completions.create(model="m", messages=ASK, stream=False, extra_body=extra or None, **kw)
        choice = resp.choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or ()]
        reasoning = (choice.message.model_extra or {}).get("reasoning_content")
        return Answer(reasoning, choice.message.content, calls, choice.finish_reason)
    reasoning, content, names, args, finish = [], [], {}, {}, None
    seen_content_or_call = False
    for chunk in client.chat.completions.create(model="m", messages=ASK, stream=True, extra_body=extra or None, **kw):
        for choice in chunk.choices:
            delta = choice.delta
            piece = (delta.model_extra or {}).get("reasoning_content")
            if piece:
                assert not seen_content_or_call, "the thinking comes before the answer"
                reasoning.append(piece)
            if delta.content:
                content.append(delta.content)
                seen_content_or_call = True
            for call in delta.tool_calls or ():
                seen_content_or_call = True
                if call.id is not None:
                    names[call.index] = call.function.name
                args[call.index] = args.get(call.index, "") + (call.function.arguments or "")
            finish = choice.finish_reason or finish
    calls = [(names[i], args.get(i, "")) for i in sorted(names)]
    return Answer("".join(reasoning) or None, "".join(content) or None, calls, finish)


def grpc_answer(server: LiveServer, stream: bool, tool_choice: Any = None, logit_bias: dict[str, float] | None = None,
                chat_template_kwargs: dict[str, Any] | None = None, **kw: Any) -> Answer:
    tools = [
        pb.Tool(type="function", function=pb.FunctionDefinition(
            name=t["function"]["name"], description=t["function"]["description"], parameters=json.dumps(t["function"]["parameters"])))
        for t in kw.pop("tools", [])
    ]  # fmt: skip
    choice = None
    if isinstance(tool_choice, str):
        choice = pb.ToolChoice(mode=tool_choice)
    elif isinstance(tool_choice, dict):
        choice = pb.ToolChoice(function_name=tool_choice["function"]["name"])
    req = pb.ChatRequest(
        messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in ASK], tools=tools, tool_choice=choice,
        logit_bias={int(k): v for k, v in (logit_bias or {}).items()},
        chat_template_kwargs=json.dumps(chat_template_kwargs) if chat_template_kwargs else None, **kw,
    )  # fmt: skip
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = rpc.GenerationStub(channel)
        if not stream:
            c = stub.Chat(req, timeout=60).choices[0]
            return Answer(c.reasoning_content or None, c.content or None,
                          [(t.function.name, t.function.arguments) for t in c.tool_calls], c.finish_reason)  # fmt: skip
        reasoning, content, names, args, finish = [], [], {}, {}, None
        for chunk in stub.ChatStream(req, timeout=60):
            for c in chunk.choices:
                reasoning.append(c.reasoning_content)
                content.append(c.content)
                for t in c.tool_calls:
                    if t.id:
                        names[t.index] = t.function.name
                    args[t.index] = args.get(t.index, "") + t.function.arguments
                finish = c.finish_reason or finish
    calls = [(names[i], args.get(i, "")) for i in sorted(names)]
    return Answer("".join(reasoning) or None, "".join(content) or None, calls, finish)


def four_ways(server: LiveServer, client: openai.OpenAI, **kw: Any) -> list[Answer]:
    """The same request (sampled with a seed) over HTTP and gRPC, whole and streamed."""
    return [http_answer(client, False, **dict(kw)), http_answer(client, True, **dict(kw)),
            grpc_answer(server, False, **dict(kw)), grpc_answer(server, True, **dict(kw))]  # fmt: skip


def streamed_calls(plan: ToolPlan, pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """Content and (name, arguments) per call, from OpenAI-shaped events fed piece by piece."""
    parser = plan.parser()
    events: list[ToolEvent] = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    names: dict[int, str] = {}
    args: dict[int, str] = {}
    for e in events:
        if e.id is not None:
            assert e.index not in names, "a call starts once"
            names[e.index] = e.name or ""
        if e.arguments:
            assert e.index in names, "arguments never come before their call's name"
            args[e.index] = args.get(e.index, "") + e.arguments
    content = "".join(e.content for e in events if e.content is not None)
    return content, [(names[i], args.get(i, "")) for i in sorted(names)]
