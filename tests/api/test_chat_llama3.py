"""A tiny random-weight checkpoint with Llama 3.1's JSON tool-call chat template (vLLM's), served with no
parser flags: the template shows the llama3_json format (`{"name": ..., "parameters": ...}`), and shows no
reasoning. Forced calls (required, several allowed; named) come back the same over HTTP and gRPC, whole
and streamed, and always parse and validate."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.api.chat_formats import ASK, TEMPLATES, TOOLS, four_ways, openai_client
from tests.api.conftest import LiveServer, template_server


@pytest.fixture(scope="module")
def llama3(tiny_llama_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    template = TEMPLATES / "llama3.1_json.jinja"
    with template_server(tiny_llama_dir, template, tmp_path_factory.mktemp("llama3") / "model", cache_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(llama3: LiveServer) -> Iterator[openai.OpenAI]:
    with openai_client(llama3) as c:
        yield c


def test_the_template_writes_the_tools(llama3: LiveServer) -> None:
    with httpx.Client(base_url=llama3.base_url, timeout=30) as http:
        strs = http.post("/tokenize", json={"messages": ASK, "tools": TOOLS, "return_token_strs": True}).json()["token_strs"]
    text = "".join(strs).replace("Ġ", " ").replace("Ċ", "\n")
    assert 'Respond in the format {"name": function name, "parameters"' in text and '"get_weather"' in text


@pytest.mark.parametrize(
    ("tool_choice", "finish_reason"),
    [("required", "tool_calls"), ({"type": "function", "function": {"name": "get_time"}}, "stop")],
)
def test_forced_calls_are_the_same_four_ways(client: openai.OpenAI, llama3: LiveServer, tool_choice: object, finish_reason: str) -> None:
    answers = four_ways(llama3, client, tools=TOOLS, tool_choice=tool_choice, temperature=1.0, seed=5, max_tokens=80)
    whole = answers[0]
    assert whole.content is None and whole.reasoning is None and whole.finish_reason == finish_reason
    whole.check_calls()
    if finish_reason == "stop":
        assert [name for name, _ in whole.calls] == ["get_time"]
    assert all(a == whole for a in answers[1:])
