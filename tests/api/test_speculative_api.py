"""Prompt-lookup speculative decoding through the real server: per-request opt-in on HTTP and gRPC, the
same greedy text as without it, its acceptance counters in /metrics, and bad values refused."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest

from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.proto import lmserve_pb2_grpc as rpc
from tests.api.conftest import LiveServer
from tests.api.test_metrics import scrape, wait_idle

MODEL = "smollm2-135m-instruct"
# An extractive task: the answer repeats the prompt's words, so earlier n-grams predict the next tokens.
PARAGRAPH = (
    "The committee met on Tuesday to review the budget for the new library. After a long discussion, "
    "the members agreed to fund the reading room, the children's corner and the archive, and to ask the "
    "city for a second grant in the spring."
)
PROMPT = f"Repeat this paragraph word for word.\n\n{PARAGRAPH}\n\nRepeated:\n\n"


def complete(http: httpx.Client, **extra: object) -> dict:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 48, "temperature": 0.0, **extra}
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_speculative_greedy_text_is_the_plain_text_and_is_counted(http: httpx.Client) -> None:
    plain = complete(http, speculative_tokens=0)
    before = wait_idle(http)
    fast = complete(http, speculative_tokens=5)
    after = scrape(http)
    assert fast["choices"][0]["text"] == plain["choices"][0]["text"]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [fast["usage"][k] for k in counts] == [plain["usage"][k] for k in counts]
    # The second run of the same prompt reads its prefix from the cache (whole blocks of it).
    assert fast["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    drafted = after.minus(before, "lmserve_spec_decode_draft_tokens_total")
    accepted = after.minus(before, "lmserve_spec_decode_accepted_tokens_total")
    # The model repeats the paragraph, so most drafts are right; every step drafts at most 5.
    assert 0 < accepted <= drafted and accepted >= 10, (accepted, drafted)
    ratio = after.value("lmserve_spec_decode_acceptance_ratio")
    assert 0.0 < ratio <= 1.0


def test_speculative_sampling_streams_valid_text(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "temperature": 0.7, "seed": 11, "stream": True,
            "speculative_tokens": 4, "logprobs": None}  # fmt: skip
    texts: list[str] = []
    with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                texts.append(httpx.Response(200, content=line[6:]).json()["choices"][0]["text"])
    again = complete(http, temperature=0.7, seed=11, speculative_tokens=4, max_tokens=24)
    assert "".join(texts) == again["choices"][0]["text"]  # a seed reproduces a speculative sample too


@pytest.mark.parametrize("value", [-1, 33, "four"])
def test_bad_speculative_tokens_is_a_400_naming_it(http: httpx.Client, value: object) -> None:
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "speculative_tokens": value})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "speculative_tokens" and error["type"] == "invalid_request_error"


def test_grpc_speculative_tokens_gives_the_same_text(server: LiveServer, http: httpx.Client) -> None:
    plain = complete(http)

    async def call() -> pb.CompletionResponse:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            req = pb.CompletionRequest(model=MODEL, prompt=PROMPT, max_tokens=48, temperature=0.0, speculative_tokens=5)
            return await rpc.GenerationStub(channel).Complete(req, metadata=server.grpc_metadata)

    resp = asyncio.run(call())
    assert resp.choices[0].text == plain["choices"][0]["text"]
