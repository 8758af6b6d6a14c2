"""The official openai SDK against the real server: the happy paths and every error class."""

from __future__ import annotations

import base64
import threading

import httpx
import numpy as np
import openai
import pytest

from tests.api.conftest import MAX_BODY_BYTES, MAX_MODEL_LEN, OVERLOAD_KEY, LiveServer, Servers

MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"


# -- completions ----------------------------------------------------------------------------------------


def test_completion_greedy_is_deterministic(openai_client: openai.OpenAI) -> None:
    first = openai_client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    second = openai_client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert first.object == "text_completion"
    assert first.model == MODEL
    assert first.choices[0].text == second.choices[0].text
    assert first.choices[0].text.strip()
    assert first.choices[0].finish_reason in ("length", "stop")
    usage = first.usage
    assert usage is not None and usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens == 5  # "The capital of France is" in SmolLM2's tokenizer


def test_completion_n2_with_seed_is_reproducible(openai_client: openai.OpenAI) -> None:
    def run() -> list[str]:
        resp = openai_client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, n=2, seed=1234
        )
        assert [c.index for c in resp.choices] == [0, 1]
        assert resp.usage is not None and resp.usage.prompt_tokens == 4  # counted once, not per choice
        return [c.text for c in resp.choices]

    a, b = run(), run()
    assert a == b  # same seed -> same texts; choice j uses seed + j
    single = openai_client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=1235
    )
    assert single.choices[0].text == a[1]


def test_completion_multiple_prompts_index_layout(openai_client: openai.OpenAI) -> None:
    resp = openai_client.completions.create(model=MODEL, prompt=["Hello", "Goodbye"], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert resp.choices[0].text == resp.choices[1].text  # greedy: both choices of prompt 0 agree
    assert resp.choices[2].text == resp.choices[3].text


def test_completion_logprobs_and_echo(openai_client: openai.OpenAI) -> None:
    prompt = "The quick brown fox"
    resp = openai_client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=2)
    lp = resp.choices[0].logprobs
    assert lp is not None and lp.tokens is not None
    assert len(lp.tokens) == resp.usage.completion_tokens
    assert "".join(lp.tokens) == resp.choices[0].text
    assert all(x is not None and x <= 0.0 for x in lp.token_logprobs)
    for tok, top in zip(lp.tokens, lp.top_logprobs, strict=True):
        assert tok in top and len(top) >= 2
        assert top[tok] == max(top.values())  # greedy picks the most likely token
    assert lp.text_offset[0] == 0

    echoed = openai_client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=1
    )
    assert echoed.choices[0].text == prompt + resp.choices[0].text
    elp = echoed.choices[0].logprobs
    n_prompt = echoed.usage.prompt_tokens
    assert elp.token_logprobs[:n_prompt] == [None] * n_prompt  # prompt tokens are not scored
    assert elp.text_offset[n_prompt] == len(prompt)


def test_completion_stop_string(openai_client: openai.OpenAI) -> None:
    free = openai_client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = free.choices[0].text
    assert "," in text
    resp = openai_client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[","])
    assert resp.choices[0].finish_reason == "stop"
    assert "," not in resp.choices[0].text
    assert resp.choices[0].text == text[: text.index(",")]


def test_completion_stream(openai_client: openai.OpenAI) -> None:
    full = openai_client.completions.create(model=MODEL, prompt="Water boils at", max_tokens=8, temperature=0)
    chunks = list(
        openai_client.completions.create(
            model=MODEL,
            prompt="Water boils at",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]


# -- chat ------------------------------------------------------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": [{"type": "text", "text": "Say hello."}]},
]


def test_chat_non_stream_and_stream_agree(openai_client: openai.OpenAI) -> None:
    resp = openai_client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    assert resp.object == "chat.completion"
    msg = resp.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert resp.usage.completion_tokens <= 10

    stream = openai_client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_completion_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == msg.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        resp.choices[0].finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == resp.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens


def test_chat_logprobs(openai_client: openai.OpenAI) -> None:
    resp = openai_client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


# -- embeddings ------------------------------------------------------------------------------------------


def test_embeddings_float_base64_dimensions(openai_client: openai.OpenAI) -> None:
    texts = ["a cat sat on the mat", "quantum chromodynamics"]
    floats = openai_client.embeddings.create(model=EMBED_MODEL, input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    assert len(floats.data[0].embedding) == 384
    assert floats.usage.prompt_tokens > 0
    vec = np.asarray(floats.data[0].embedding)
    assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-4)

    # The SDK asks for base64 itself and decodes it; check the raw wire format too.
    raw = openai_client.embeddings.with_raw_response.create(model=EMBED_MODEL, input=texts, encoding_format="base64")
    payload = raw.http_response.json()
    decoded = np.frombuffer(base64.b64decode(payload["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, vec, rtol=0, atol=1e-7)

    # all-MiniLM-L6-v2 is no Matryoshka model: its vectors are not cut short (test_embedding_checkpoints.py cuts)
    with pytest.raises(openai.BadRequestError) as error:
        openai_client.embeddings.create(model=EMBED_MODEL, input=texts[0], dimensions=64)
    assert error.value.body["param"] == "dimensions" and "Matryoshka" in error.value.body["message"]


# -- errors through the SDK's exception types -------------------------------------------------------------


def test_error_context_length_exceeded(openai_client: openai.OpenAI) -> None:
    prompt = "hello " * (MAX_MODEL_LEN - 100)
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.completions.create(model=MODEL, prompt=prompt, max_tokens=200)
    assert info.value.code == "context_length_exceeded"
    assert info.value.body["param"] == "max_tokens"
    assert "reduce max_tokens to at most" in info.value.message


def test_context_length_error_names_the_prompt_when_it_alone_is_too_long(openai_client: openai.OpenAI) -> None:
    too_long = "hello " * (MAX_MODEL_LEN + 10)
    for max_tokens in (5, None):  # whatever max_tokens says, the prompt is what must change
        with pytest.raises(openai.BadRequestError) as info:
            openai_client.completions.create(model=MODEL, prompt=too_long, **({"max_tokens": max_tokens} if max_tokens else {}))
        assert (info.value.code, info.value.body["param"]) == ("context_length_exceeded", "prompt")
        assert "leaves no room for a completion" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": too_long}], max_tokens=5)
    assert (info.value.code, info.value.body["param"]) == ("context_length_exceeded", "messages")
    # Prompt and output together too long: the output's field, under the name the client used.
    fits = "hello " * (MAX_MODEL_LEN // 2)
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": fits}], max_completion_tokens=MAX_MODEL_LEN // 2
        )
    assert (info.value.code, info.value.body["param"]) == ("context_length_exceeded", "max_completion_tokens")


def test_error_bad_params(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.completions.create(model=MODEL, prompt="x", max_tokens=5, temperature=5.0)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.completions.create(model=MODEL, prompt="x", max_tokens=5, n=2, best_of=3)
    assert info.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.completions.create(model=MODEL, prompt="x", suffix="y")
    assert info.value.body["param"] == "suffix"
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
        )
    assert "image" in info.value.message.lower()
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(
            model=MODEL, messages=MESSAGES, response_format={"type": "xml"}
        )
    assert info.value.body["param"] == "response_format.type"


def test_error_model_not_found(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        openai_client.embeddings.create(model=MODEL, input="x")  # a generation model is not an embedder


def test_error_authentication(server: LiveServer) -> None:
    bad = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.code == "invalid_api_key"
    assert info.value.response.headers["www-authenticate"].startswith("Bearer")


def test_error_request_too_large(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        openai_client.completions.create(model=MODEL, prompt="x" * (MAX_BODY_BYTES + 10), max_tokens=2)
    assert info.value.status_code == 413
    assert info.value.code == "request_too_large"


def test_error_rate_limit(servers: Servers) -> None:
    limited = servers.limited
    client = openai.OpenAI(base_url=f"{limited.base_url}/v1", api_key=limited.api_key, max_retries=0)
    with pytest.raises(openai.RateLimitError) as info:
        for _ in range(10):
            client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert info.value.code == "rate_limit_exceeded"
    headers = info.value.response.headers
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-remaining-requests"] == "0"


def test_error_server_overloaded(servers: Servers) -> None:
    """max_queue=1: while one generation is in flight, the next gets 503 server_overloaded."""
    limited = servers.limited
    started = threading.Event()
    done = threading.Event()

    def hold_slot() -> None:
        with httpx.Client(base_url=limited.base_url, timeout=60) as c, c.stream(
            "POST",
            "/v1/completions",
            headers={"Authorization": f"Bearer {OVERLOAD_KEY}"},
            json={"model": MODEL, "prompt": "Count:", "max_tokens": 64, "ignore_eos": True, "stream": True},
        ) as resp:
            for _ in resp.iter_lines():
                started.set()
                if done.is_set():
                    break

    holder = threading.Thread(target=hold_slot)
    holder.start()
    try:
        assert started.wait(30)
        client = openai.OpenAI(base_url=f"{limited.base_url}/v1", api_key=OVERLOAD_KEY, max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
        assert info.value.status_code == 503
        assert info.value.code == "server_overloaded"
        assert info.value.response.headers["retry-after"] == "1"
    finally:
        done.set()
        holder.join(30)
