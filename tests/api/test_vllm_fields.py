"""vLLM's extra request fields that vLLM's clients send (`vllm bench serve` among them), on both
transports: truncate_prompt_tokens and truncation_side (completions, chat, embeddings), add_special_tokens,
priority. Each is honoured or refused with a clear 400, never an `unknown_field`."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest

from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.proto import lmserve_pb2_grpc as rpc
from tests.api.conftest import MAX_MODEL_LEN, LiveServer

MODEL = "smollm2-135m-instruct"
TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm windowsill. " * 3


def _post(http: httpx.Client, path: str, body: dict) -> dict:
    resp = http.post(path, json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _error(http: httpx.Client, path: str, body: dict) -> dict:
    resp = http.post(path, json=body)
    assert resp.status_code == 400, resp.text
    return resp.json()["error"]


def _ids(http: httpx.Client, text: str) -> list[int]:
    return _post(http, "/tokenize", {"model": MODEL, "prompt": text})["tokens"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncated_completion_is_the_completion_of_the_kept_tokens(http: httpx.Client, side: str) -> None:
    ids = _ids(http, TEXT)
    keep = 7
    kept = ids[-keep:] if side == "left" else ids[:keep]
    greedy = {"model": MODEL, "max_tokens": 6, "temperature": 0}
    cut = _post(http, "/v1/completions", {**greedy, "prompt": TEXT, "truncate_prompt_tokens": keep, "truncation_side": side})
    whole = _post(http, "/v1/completions", {**greedy, "prompt": kept})
    assert cut["usage"]["prompt_tokens"] == keep
    assert cut["choices"][0]["text"] == whole["choices"][0]["text"]
    # Echo shows the prompt as the model saw it.
    echoed = _post(http, "/v1/completions", {**greedy, "prompt": TEXT, "truncate_prompt_tokens": keep, "echo": True,
                                             "truncation_side": side, "max_tokens": 1})  # fmt: skip
    assert echoed["choices"][0]["text"].startswith(_post(http, "/detokenize", {"model": MODEL, "tokens": kept})["prompt"])


def test_minus_one_keeps_what_fits_the_context(http: httpx.Client) -> None:
    long_text = "word " * (MAX_MODEL_LEN + 50)
    too_long = _error(http, "/v1/completions", {"model": MODEL, "prompt": long_text, "max_tokens": 1})
    assert too_long["code"] == "context_length_exceeded"
    body = {"model": MODEL, "prompt": long_text, "max_tokens": 1, "truncate_prompt_tokens": -1, "truncation_side": "left"}
    assert _post(http, "/v1/completions", body)["usage"]["prompt_tokens"] == MAX_MODEL_LEN - 1
    over = _error(http, "/v1/completions", {**body, "truncate_prompt_tokens": MAX_MODEL_LEN})
    assert over["param"] == "truncate_prompt_tokens" and f"at most {MAX_MODEL_LEN - 1}" in over["message"]
    below = _error(http, "/v1/completions", {**body, "truncate_prompt_tokens": -2})
    assert (below["param"], below["code"]) == ("truncate_prompt_tokens", "invalid_value")


def test_chat_truncates_the_rendered_prompt(http: httpx.Client) -> None:
    messages = [{"role": "user", "content": TEXT}]
    whole = _post(http, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 1})
    cut = _post(http, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 1,
                                               "truncate_prompt_tokens": 10, "truncation_side": "left"})  # fmt: skip
    assert whole["usage"]["prompt_tokens"] > 10 and cut["usage"]["prompt_tokens"] == 10


def test_priority_and_add_special_tokens(http: httpx.Client) -> None:
    base = {"model": MODEL, "prompt": "Hello", "max_tokens": 1}
    _post(http, "/v1/completions", {**base, "priority": 0, "add_special_tokens": False})
    refused = _error(http, "/v1/completions", {**base, "priority": 3})
    assert (refused["param"], refused["code"]) == ("priority", "unsupported_value")
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1}
    plain = _post(http, "/v1/chat/completions", chat)["usage"]["prompt_tokens"]
    special = _post(http, "/v1/chat/completions", {**chat, "add_special_tokens": True})["usage"]["prompt_tokens"]
    expected_extra = len(_ids(http, ""))  # what the tokenizer adds to any text (0 for SmolLM2's, which adds none)
    assert special == plain + expected_extra
    side = _error(http, "/v1/completions", {**base, "truncate_prompt_tokens": 2, "truncation_side": "middle"})
    assert side["param"] == "truncation_side"


def test_embeddings_truncate_as_vllm_bench_sends(http: httpx.Client) -> None:
    long_text = "word " * 400  # beyond the embedding model's 256-token limit
    refused = _error(http, "/v1/embeddings", {"input": long_text})
    assert refused["code"] == "context_length_exceeded"
    fitted = _post(http, "/v1/embeddings", {"input": [long_text, "short"], "truncate_prompt_tokens": -1})
    first = fitted["data"][0]["embedding"]
    assert fitted["usage"]["prompt_tokens"] == 256 + len(_post(http, "/tokenize", {"model": "all-minilm-l6-v2", "prompt": "short"})["tokens"])
    ids = _post(http, "/tokenize", {"model": "all-minilm-l6-v2", "prompt": long_text})["tokens"]
    same = _post(http, "/v1/embeddings", {"input": [ids[:256]]})["data"][0]["embedding"]
    assert max(abs(a - b) for a, b in zip(first, same, strict=True)) < 1e-6
    cut = _post(http, "/v1/embeddings", {"input": "one two three four five six", "truncate_prompt_tokens": 4})
    assert cut["usage"]["prompt_tokens"] == 4


def test_the_fields_over_grpc(server: LiveServer) -> None:
    async def go() -> None:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            gen, emb = rpc.GenerationStub(channel), rpc.EmbeddingsStub(channel)
            md = server.grpc_metadata
            cut = await gen.Complete(pb.CompletionRequest(prompt=TEXT, max_tokens=1, truncate_prompt_tokens=5), metadata=md)
            assert cut.usage.prompt_tokens == 5
            chat = await gen.Chat(
                pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=TEXT)], max_tokens=1, truncate_prompt_tokens=9,
                               truncation_side="left"), metadata=md)  # fmt: skip
            assert chat.usage.prompt_tokens == 9
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await gen.Complete(pb.CompletionRequest(prompt="hi", max_tokens=1, priority=2), metadata=md)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert dict(info.value.trailing_metadata() or ())["lmserve-error-param"] == "priority"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await gen.Complete(pb.CompletionRequest(prompt="hi", max_tokens=1, truncation_side="up"), metadata=md)
            assert dict(info.value.trailing_metadata() or ())["lmserve-error-param"] == "truncation_side"
            out = await emb.Embed(pb.EmbedRequest(input=["word " * 400], truncate_prompt_tokens=-1), metadata=md)
            assert out.usage.prompt_tokens == 256

    asyncio.run(go())
