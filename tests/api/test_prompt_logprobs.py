"""vLLM's prompt_logprobs and return_tokens_as_token_ids on the real server, over HTTP (the openai SDK, httpx)
and gRPC: the prompt's scores equal transformers' (float32, the bundled SmolLM2), whole and streamed, and bad
values get a clear 400 / INVALID_ARGUMENT."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.proto import lmserve_pb2_grpc as rpc
from tests.api.conftest import LiveServer

MODEL = "smollm2-135m-instruct"
PROMPT = "The quick brown fox jumps over the lazy dog"
NUM_TOP = 2


@pytest.fixture(scope="module")
def prompt_ids(server: LiveServer) -> list[int]:
    return server.state.tokenizer.encode(PROMPT)


@pytest.fixture(scope="module")
def expected(smollm2_dir: Path, prompt_ids: list[int]) -> torch.Tensor:
    """transformers' float32 log_softmax after each prompt position but the last: [len - 1, vocab]."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([prompt_ids])).logits[0, :-1], dim=-1)


def check_json_scores(got: list[Any], prompt_ids: list[int], expected: torch.Tensor) -> None:
    """vLLM's shape: one entry per prompt token, the first null, each token id -> {logprob, rank, decoded_token}
    for the prompt's token and the top NUM_TOP."""
    assert len(got) == len(prompt_ids) and got[0] is None
    for position, entry in enumerate(got[1:]):
        row, token_id = expected[position], prompt_ids[position + 1]
        top_lp, top_ids = torch.topk(row, NUM_TOP)
        assert str(token_id) in entry and str(int(top_ids[0])) in entry
        assert len(entry) == len({token_id, *top_ids.tolist()})
        mine = entry[str(token_id)]
        assert mine["logprob"] == pytest.approx(row[token_id].item(), abs=1e-4)
        chosen = row[token_id]  # its rank, up to tokens within 1e-4 of it (rounding may order those apart)
        assert int((row > chosen + 1e-4).sum()) + 1 <= mine["rank"] <= int((row > chosen - 1e-4).sum()) + 1
        assert entry[str(int(top_ids[0]))]["rank"] == 1
        assert entry[str(int(top_ids[0]))]["logprob"] == pytest.approx(top_lp[0].item(), abs=1e-4)
        assert isinstance(mine["decoded_token"], str)


def test_completions_whole_and_streamed(openai_client, prompt_ids: list[int], expected: torch.Tensor) -> None:
    extra = {"prompt_logprobs": NUM_TOP}
    whole = openai_client.completions.create(
        model=MODEL, prompt=prompt_ids, max_tokens=2, temperature=0, n=2, extra_body=extra
    ).model_dump()
    for choice in whole["choices"]:  # each choice carries its prompt's scores
        check_json_scores(choice["prompt_logprobs"], prompt_ids, expected)
    chunks = [
        c.model_dump()
        for c in openai_client.completions.create(
            model=MODEL, prompt=prompt_ids, max_tokens=3, temperature=0, stream=True, extra_body=extra
        )
    ]
    carrying = [c for c in chunks if c["choices"] and c["choices"][0].get("prompt_logprobs") is not None]
    assert carrying == [chunks[0]], "the scores come once, in the choice's first chunk"
    check_json_scores(chunks[0]["choices"][0]["prompt_logprobs"], prompt_ids, expected)
    plain = openai_client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=2, temperature=0).model_dump()
    assert plain["choices"][0]["prompt_logprobs"] is None
    assert plain["choices"][0]["text"] == whole["choices"][0]["text"]


def test_chat_whole_and_streamed(http: httpx.Client, server: LiveServer) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2, "temperature": 0,
            "prompt_logprobs": 0}  # fmt: skip
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    whole = resp.json()
    scores = whole["prompt_logprobs"]  # top level, as vLLM puts it
    assert scores[0] is None and len(scores) == whole["usage"]["prompt_tokens"]
    assert all(len(entry) == 1 and next(iter(entry.values()))["rank"] >= 1 for entry in scores[1:])
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
        events = [line.removeprefix("data: ") for line in streamed.iter_lines() if line.startswith("data: {")]
    first, *rest = [httpx.Response(200, content=e).json() for e in events]
    assert first["choices"][0]["delta"]["role"] == "assistant" and first["prompt_logprobs"] == scores
    assert all("prompt_logprobs" not in chunk for chunk in rest)


def test_return_tokens_as_token_ids(openai_client, http: httpx.Client) -> None:
    common = dict(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True)
    named = openai_client.completions.create(**common, extra_body={"return_tokens_as_token_ids": True}).model_dump()
    plain = openai_client.completions.create(**common).model_dump()
    tokens = named["choices"][0]["logprobs"]["tokens"]
    assert all(re.fullmatch(r"token_id:\d+", t) for t in tokens)
    ids = [int(t.split(":")[1]) for t in tokens]
    assert http.post("/detokenize", json={"model": MODEL, "tokens": ids}).json()["prompt"] == plain["choices"][0]["text"]
    assert named["choices"][0]["logprobs"]["token_logprobs"] == plain["choices"][0]["logprobs"]["token_logprobs"]
    assert all(k.startswith("token_id:") for top in named["choices"][0]["logprobs"]["top_logprobs"] if top for k in top)
    chat = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0,
        "logprobs": True, "top_logprobs": 1, "return_tokens_as_token_ids": True,
    }).json()  # fmt: skip
    content = chat["choices"][0]["logprobs"]["content"]
    assert all(re.fullmatch(r"token_id:\d+", t["token"]) and bytes(t["bytes"]).decode() == t["token"] for t in content)


@pytest.mark.parametrize("value", [-1, 21, "many"])
def test_bad_prompt_logprobs_get_a_400(http: httpx.Client, value: Any) -> None:
    for path, body in [
        ("/v1/completions", {"prompt": PROMPT}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]}),
    ]:
        resp = http.post(path, json={"model": MODEL, "max_tokens": 1, "prompt_logprobs": value, **body})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "prompt_logprobs"


def test_grpc(server: LiveServer, prompt_ids: list[int], expected: torch.Tensor) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = rpc.GenerationStub(channel)
        req = pb.CompletionRequest(
            model=MODEL, prompt_token_ids=pb.TokenIds(ids=prompt_ids), max_tokens=2, temperature=0,
            prompt_logprobs=NUM_TOP, logprobs=1, return_tokens_as_token_ids=True,
        )  # fmt: skip
        [choice] = stub.Complete(req, metadata=server.grpc_metadata).choices
        # Entry i scores prompt token i + 1 (the first has nothing before it).
        assert [e.token_id for e in choice.prompt_logprobs] == prompt_ids[1:]
        for position, entry in enumerate(choice.prompt_logprobs):
            assert entry.logprob == pytest.approx(expected[position, entry.token_id].item(), abs=1e-4)
            assert len(entry.top_logprobs) == NUM_TOP and entry.rank >= 1
        assert [t.token for t in choice.logprobs] == [f"token_id:{i}" for i in choice.token_ids]
        chat = pb.ChatRequest(
            model=MODEL, messages=[pb.ChatMessage(role="user", content=PROMPT)], max_tokens=2, temperature=0,
            prompt_logprobs=0,
        )  # fmt: skip
        chunks = list(stub.ChatStream(chat, metadata=server.grpc_metadata))
        scored = [c for c in chunks if c.choices and c.choices[0].prompt_logprobs]
        assert len(scored) == 1 and scored[0] is chunks[0] and chunks[0].choices[0].role == "assistant"
        assert len(scored[0].choices[0].prompt_logprobs) == chunks[-1].usage.prompt_tokens - 1
        with pytest.raises(grpc.RpcError) as info:
            stub.Complete(pb.CompletionRequest(model=MODEL, prompt=PROMPT, prompt_logprobs=21), metadata=server.grpc_metadata)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt_logprobs" in (info.value.details() or "")
