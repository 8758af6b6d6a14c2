"""--tool-call-parser over the chat template's own format: the tiny checkpoint with Llama 3.1's JSON
template served with tool_call_parser "pythonic" (Llama 3.2 / 4 style `[f(a=1)]`). The template does not
write pythonic calls, so the tools are described in a system message in that format; forced calls come
back the same over HTTP and gRPC, whole and streamed, and always parse and validate."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.api.chat_formats import ASK, TEMPLATES, TOOLS, four_ways, openai_client
from tests.api.conftest import LiveServer, template_server


@pytest.fixture(scope="module")
def pythonic(tiny_llama_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    template, dest = TEMPLATES / "llama3.1_json.jinja", tmp_path_factory.mktemp("pythonic") / "model"
    with template_server(tiny_llama_dir, template, dest, cache_dir, tool_call_parser="pythonic") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(pythonic: LiveServer) -> Iterator[openai.OpenAI]:
    with openai_client(pythonic) as c:
        yield c


def test_the_tools_are_described_in_the_chosen_format(pythonic: LiveServer) -> None:
    with httpx.Client(base_url=pythonic.base_url, timeout=30) as http:
        strs = http.post("/tokenize", json={"messages": ASK, "tools": TOOLS, "return_token_strs": True}).json()["token_strs"]
    text = "".join(strs).replace("Ġ", " ").replace("Ċ", "\n")
    assert "[func_name1(param_name1=value1" in text and '"get_weather"' in text
    assert '"parameters": dictionary' not in text  # not handed to the template as `tools`


@pytest.mark.parametrize(
    ("tool_choice", "finish_reason"),
    [("required", "tool_calls"), ({"type": "function", "function": {"name": "get_weather"}}, "stop")],
)
def test_forced_calls_are_the_same_four_ways(client: openai.OpenAI, pythonic: LiveServer, tool_choice: object, finish_reason: str) -> None:
    answers = four_ways(pythonic, client, tools=TOOLS, tool_choice=tool_choice, temperature=1.0, seed=2, max_tokens=80)
    whole = answers[0]
    assert whole.content is None and whole.reasoning is None and whole.finish_reason == finish_reason
    whole.check_calls()
    assert all(a == whole for a in answers[1:])
