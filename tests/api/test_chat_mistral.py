"""A tiny random-weight checkpoint with Mistral's tool-call chat template (vLLM's), served with no
parser flags: the template shows the mistral format (`[TOOL_CALLS][{"name": ..., "arguments": ...}]`), and no
reasoning. Its tokenizer holds [TOOL_CALLS] as a special token, as Mistral's do, so requests with tools
decode special tokens (the marker must reach the parser) and hide the others again (the end-of-turn token).
Forced calls (required, one; named) come back the same over HTTP and gRPC, whole and streamed,
and always parse and validate."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.api.chat_formats import ASK, TEMPLATES, TOOLS, four_ways, openai_client
from tests.api.conftest import LiveServer, template_server


@pytest.fixture(scope="module")
def mistral(tiny_llama_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    template = TEMPLATES / "mistral.jinja"
    dest = tmp_path_factory.mktemp("mistral") / "model"
    # As in Mistral's tokenizers, [TOOL_CALLS] is a special token (an unused one of SmolLM2's, renamed).
    with template_server(tiny_llama_dir, template, dest, cache_dir, renamed_specials={"<gh_stars>": "[TOOL_CALLS]"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(mistral: LiveServer) -> Iterator[openai.OpenAI]:
    with openai_client(mistral) as c:
        yield c


def test_the_template_writes_the_tools(mistral: LiveServer) -> None:
    with httpx.Client(base_url=mistral.base_url, timeout=30) as http:
        strs = http.post("/tokenize", json={"messages": ASK, "tools": TOOLS, "return_token_strs": True}).json()["token_strs"]
    text = "".join(strs).replace("Ġ", " ").replace("Ċ", "\n")
    assert text.startswith("<|im_start|>[AVAILABLE_TOOLS]") and "'name': 'get_weather'" in text  # tools|string: Python's repr
    assert mistral.state.tokenizer.encode("[TOOL_CALLS]", add_special_tokens=False) == [7]  # one special token


@pytest.mark.parametrize(
    ("tool_choice", "finish_reason"),
    [("required", "tool_calls"), ({"type": "function", "function": {"name": "get_time"}}, "stop")],
)
def test_forced_calls_are_the_same_four_ways(client: openai.OpenAI, mistral: LiveServer, tool_choice: object, finish_reason: str) -> None:
    # One call (a random model, free to add calls, may write them until max_tokens; test_chat_llama3.py has several).
    answers = four_ways(mistral, client, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False, temperature=1.0,
                        seed=5, max_tokens=80)  # fmt: skip
    whole = answers[0]
    assert whole.content is None and whole.reasoning is None and whole.finish_reason == finish_reason
    whole.check_calls()
    assert len(whole.calls) == 1
    if finish_reason == "stop":
        assert [name for name, _ in whole.calls] == ["get_time"]
    assert all(a == whole for a in answers[1:])
