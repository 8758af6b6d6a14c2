"""Raw HTTP (httpx) against the real server: shapes, probes, metrics, limits, errors, disconnects."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.api.conftest import (
    HEADERS_KEY,
    LIMITED_RPM,
    MAX_BODY_BYTES,
    MAX_MODEL_LEN,
    LiveServer,
    Servers,
    metric_value,
)

MODEL = "smollm2-135m-instruct"


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# -- tokenize / detokenize --------------------------------------------------------------------------------


def test_tokenize_prompt_and_detokenize(http: httpx.Client) -> None:
    resp = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True})
    assert resp.status_code == 200
    body = resp.json()
    assert body["count"] == len(body["tokens"]) == 2
    assert body["max_model_len"] == MAX_MODEL_LEN
    assert body["token_strs"] == ["Hello", " world"]
    back = http.post("/detokenize", json={"tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": "Hello world"}


def test_tokenize_messages_uses_chat_template(http: httpx.Client) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    with_prompt = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()
    without = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert with_prompt["count"] > without["count"]
    text = http.post("/detokenize", json={"tokens": with_prompt["tokens"]}).json()["prompt"]
    assert "Hi" in text and text.rstrip().endswith("assistant")


def test_tokenize_rejects_both_or_neither(http: httpx.Client) -> None:
    resp = http.post("/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "b"}]})
    assert resp.status_code == 400
    assert http.post("/tokenize", json={}).status_code == 400
    bad = http.post("/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and _error(bad)["param"] == "tokens"


# -- probes, models, version, docs ------------------------------------------------------------------------


def test_probes_are_open_and_ready(server: LiveServer) -> None:
    with httpx.Client(base_url=server.base_url) as anonymous:  # no API key
        assert anonymous.get("/livez").json() == {"status": "ok", "reason": None}
        assert anonymous.get("/readyz").status_code == 200
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get("/v1/models").status_code == 401
        assert anonymous.get("/metrics").status_code == 401
        assert anonymous.get("/openapi.json").status_code == 401


def test_readyz_reports_draining(server: LiveServer, http: httpx.Client) -> None:
    server.state.lifecycle.draining = True
    try:
        resp = http.get("/readyz")
        assert resp.status_code == 503
        assert "draining" in _error(resp)["message"]
        assert http.get("/livez").status_code == 200  # alive, just not taking new work
    finally:
        server.state.lifecycle.draining = False
    assert http.get("/readyz").status_code == 200


def test_models_and_version(http: httpx.Client) -> None:
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    cards = {m["id"]: m for m in models["data"]}
    assert set(cards) == {MODEL, "all-minilm-l6-v2"}
    assert cards[MODEL]["object"] == "model" and cards[MODEL]["owned_by"] == "lmserve"
    assert cards[MODEL]["max_model_len"] == MAX_MODEL_LEN
    assert (cards[MODEL]["family"], cards["all-minilm-l6-v2"]["family"]) == ("llama (native)", "bert (transformers)")
    assert http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    missing = http.get("/v1/models/nope")
    assert missing.status_code == 404 and _error(missing)["code"] == "model_not_found"
    assert http.get("/version").json()["version"]


def test_openapi_declares_400_not_422(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    for path, item in schema["paths"].items():
        for method, op in item.items():
            assert "422" not in op["responses"], (path, method)
    assert "400" in schema["paths"]["/v1/completions"]["post"]["responses"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert "ErrorResponse" in schema["components"]["schemas"]
    assert http.get("/docs").status_code == 200


# -- errors -----------------------------------------------------------------------------------------------


def test_malformed_json_is_400(http: httpx.Client) -> None:
    resp = http.post("/v1/completions", content=b'{"model": "x", "prompt": ', headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert _error(resp)["code"] == "invalid_json"


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain", "application/json; charset=utf-8"])
def test_json_body_is_read_whatever_the_content_type(http: httpx.Client, content_type: str | None) -> None:
    # `curl -d` sends application/x-www-form-urlencoded; some clients send nothing or text/plain.
    headers = {"content-type": content_type} if content_type else {}
    body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    resp = http.post("/v1/completions", content=body, headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 2
    embed = http.post("/v1/embeddings", content=json.dumps({"input": "a cat"}), headers=headers)
    assert embed.status_code == 200 and len(embed.json()["data"][0]["embedding"]) == 384


def test_a_body_that_is_not_json_names_the_content_type_it_came_with(http: httpx.Client) -> None:
    form = http.post("/v1/completions", content="prompt=Hello&max_tokens=2",
                     headers={"content-type": "application/x-www-form-urlencoded"})
    error = _error(form)
    assert form.status_code == 400 and error["code"] == "invalid_json"
    assert "The body was sent with content-type: application/x-www-form-urlencoded" in error["message"]
    assert "send it with content-type: application/json" in error["message"]
    bare = _error(http.post("/v1/chat/completions", content="hello"))
    assert bare["code"] == "invalid_json" and "content-type: (none)" in bare["message"]
    as_json = _error(http.post("/v1/completions", content="{bad", headers={"content-type": "application/json"}))
    assert as_json["code"] == "invalid_json" and "content-type" not in as_json["message"]


def test_validation_errors_are_400_with_param(http: httpx.Client) -> None:
    missing = http.post("/v1/completions", json={"model": MODEL})
    assert missing.status_code == 400
    err = _error(missing)
    assert err["code"] == "missing_field" and err["param"] == "prompt"
    assert err["type"] == "invalid_request_error"

    wrong = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]})
    assert wrong.status_code == 400
    assert _error(wrong)["param"] == "messages[0].role"

    too_many = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 99})
    assert too_many.status_code == 400 and _error(too_many)["param"] == "n"
    stops = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stop": list("abcdefg")})
    assert stops.status_code == 400 and _error(stops)["param"] == "stop"
    cap = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 100000})
    assert cap.status_code == 400 and _error(cap)["param"] == "max_tokens"
    bias = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logit_bias": {"abc": 1}})
    assert bias.status_code == 400 and _error(bias)["param"].startswith("logit_bias")
    not_object = http.post("/v1/completions", json=[1, 2])
    assert not_object.status_code == 400


def test_unknown_route_and_method(http: httpx.Client) -> None:
    resp = http.get("/v2/nothing")
    assert resp.status_code == 404
    assert _error(resp)["code"] == "not_found"
    resp = http.get("/v1/completions")
    assert resp.status_code == 405
    assert _error(resp)["code"] == "method_not_allowed"
    assert "POST" in resp.headers["allow"]


def test_body_limit_counts_streamed_bytes(server: LiveServer) -> None:
    """413 also for a chunked body without Content-Length: the limit is enforced while reading."""

    def chunks():
        yield b'{"model": "smollm2-135m-instruct", "prompt": "'
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b"a" * 1024
        yield b'"}'

    with httpx.Client(base_url=server.base_url, headers=server.headers) as client:
        resp = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert _error(resp)["code"] == "request_too_large"


def test_cors_and_open_metrics_only_when_configured(servers: Servers) -> None:
    preflight = {
        "Origin": "http://allowed.test",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    fuzz = httpx.options(f"{servers.fuzz.base_url}/v1/completions", headers=preflight)
    assert fuzz.status_code == 200
    assert fuzz.headers["access-control-allow-origin"] == "http://allowed.test"
    main = httpx.options(f"{servers.main.base_url}/v1/completions", headers=preflight)
    assert "access-control-allow-origin" not in main.headers
    assert httpx.get(f"{servers.fuzz.base_url}/metrics").status_code == 200  # metrics_open on that server
    assert httpx.get(f"{servers.main.base_url}/metrics").status_code == 401


def test_auth_rejects_wrong_scheme_and_accepts_second_key(server: LiveServer) -> None:
    with httpx.Client(base_url=server.base_url) as client:
        resp = client.get("/v1/models", headers={"Authorization": f"Basic {server.api_key}"})
        assert resp.status_code == 401 and _error(resp)["code"] == "invalid_api_key"
        assert resp.headers["www-authenticate"].startswith("Bearer")
        assert client.get("/v1/models", headers={"Authorization": "Bearer test-key-other"}).status_code == 200


def test_rate_limit_headers(servers: Servers) -> None:
    limited = servers.limited
    with httpx.Client(base_url=limited.base_url, headers={"Authorization": f"Bearer {HEADERS_KEY}"}) as client:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
        remaining = []
        for _ in range(LIMITED_RPM):
            resp = client.post("/v1/completions", json=body)
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-ratelimit-limit-requests"] == str(LIMITED_RPM)
            assert resp.headers["x-ratelimit-limit-tokens"] == "600"
            remaining.append(int(resp.headers["x-ratelimit-remaining-requests"]))
        assert remaining == [2, 1, 0]
        resp = client.post("/v1/completions", json=body)
        assert resp.status_code == 429
        assert _error(resp)["code"] == "rate_limit_exceeded"
        assert 1 <= int(resp.headers["retry-after"]) <= 20
        assert resp.headers["x-ratelimit-reset-requests"].endswith("s")


def test_token_rate_limit_refuses_oversized_request(servers: Servers) -> None:
    limited = servers.limited
    with httpx.Client(base_url=limited.base_url, headers={"Authorization": f"Bearer {limited.api_key}"}) as client:
        # n * max_tokens alone is more than the 600 tokens/min budget: it could never pass.
        resp = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 200, "n": 4})
    assert resp.status_code == 429
    assert "tokens per minute" in _error(resp)["message"]


# -- metrics ----------------------------------------------------------------------------------------------


def test_metrics_move(http: httpx.Client) -> None:
    before = http.get("/metrics").text
    labels = {"endpoint": "/v1/completions", "transport": "http", "status": "200"}
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "ignore_eos": True})
    assert resp.status_code == 200
    embedded = http.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "hello"})
    assert embedded.status_code == 200
    after = http.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    # Samples, not the HELP and TYPE lines, which name every metric whatever it has counted.
    sampled = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    gauges = (
        "lmserve_requests_in_flight",
        "lmserve_num_requests_running",
        "lmserve_num_requests_waiting",
        "lmserve_kv_blocks_used",
        "lmserve_kv_blocks_capacity",
    )
    assert set(gauges) <= sampled, set(gauges) - sampled

    def moved(name: str, labels: dict[str, str] | None = None) -> float:
        return metric_value(text, name, labels) - metric_value(before, name, labels)

    assert moved("lmserve_requests_total", labels) == 1
    assert moved("lmserve_generation_tokens_total") == 3
    assert moved("lmserve_prompt_tokens_total") == resp.json()["usage"]["prompt_tokens"]
    assert moved("lmserve_embedding_tokens_total") == embedded.json()["usage"]["total_tokens"]
    for histogram in (
        "lmserve_time_to_first_token_seconds",
        "lmserve_time_per_output_token_seconds",
        "lmserve_e2e_request_latency_seconds",
    ):
        assert moved(f"{histogram}_count") == 1, histogram  # the one completion, once
    assert moved("lmserve_rate_limited_total") == moved("lmserve_overloaded_total") == 0
    assert metric_value(text, "lmserve_kv_blocks_capacity") == 256


# -- disconnects ------------------------------------------------------------------------------------------


def _kv_used(http: httpx.Client) -> float:
    return metric_value(http.get("/metrics").text, "lmserve_kv_blocks_used")


def _wait_kv_back(http: httpx.Client, baseline: float, timeout_s: float = 10.0) -> float:
    deadline = time.monotonic() + timeout_s
    used = _kv_used(http)
    while used > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
        used = _kv_used(http)
    return used


def _wait_admission_free(server: LiveServer, timeout_s: float = 5.0) -> int:
    deadline = time.monotonic() + timeout_s
    while server.state.admission.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    return server.state.admission.in_flight


def test_stream_disconnect_frees_kv_blocks(server: LiveServer, http: httpx.Client) -> None:
    baseline = _kv_used(http)
    before = http.get("/metrics").text
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 250, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            seen = 0
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    seen += 1
                    if seen == 2:
                        assert _kv_used(http) > baseline  # blocks are held while it runs
                        break
    # Leaving the blocks closed the connection mid-stream.
    assert _wait_kv_back(http, baseline) == baseline
    assert _wait_admission_free(server) == 0
    after = http.get("/metrics").text
    aborted = {"finish_reason": "abort"}
    assert metric_value(after, "lmserve_request_finished_total", aborted) == metric_value(
        before, "lmserve_request_finished_total", aborted
    ) + 1
    generated = metric_value(after, "lmserve_generation_tokens_total") - metric_value(
        before, "lmserve_generation_tokens_total"
    )
    assert generated < 250  # aborted, not run to the end


def test_non_stream_disconnect_aborts(server: LiveServer, http: httpx.Client) -> None:
    baseline = _kv_used(http)
    before = http.get("/metrics").text
    payload = json.dumps({"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 250, "ignore_eos": True})
    raw = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n{payload}"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(raw)
        deadline = time.monotonic() + 10
        while _kv_used(http) == baseline and time.monotonic() < deadline:
            time.sleep(0.05)
    assert _wait_kv_back(http, baseline) == baseline
    assert _wait_admission_free(server) == 0
    after = http.get("/metrics").text
    aborted = {"finish_reason": "abort"}
    assert metric_value(after, "lmserve_request_finished_total", aborted) == metric_value(
        before, "lmserve_request_finished_total", aborted
    ) + 1


# -- streaming format ------------------------------------------------------------------------------------


def test_sse_wire_format(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("prompt", [[], [[]], ""])
def test_empty_prompts_rejected(http: httpx.Client, prompt: object) -> None:
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
    assert resp.status_code == 400
    assert _error(resp)["param"] == "prompt"


# -- request shapes --------------------------------------------------------------------------------------


def test_token_prompts_with_echo(http: httpx.Client) -> None:
    ids = http.post("/tokenize", json={"prompt": "Hello there"}).json()["tokens"]
    resp = http.post(
        "/v1/completions", json={"model": MODEL, "prompt": [ids, ids], "max_tokens": 2, "temperature": 0, "echo": True}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["text"].startswith("Hello there") for c in body["choices"])
    assert body["usage"]["prompt_tokens"] == 2 * len(ids)


def test_embedding_token_inputs(http: httpx.Client) -> None:
    one = http.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": [101, 7592, 102]}).json()
    assert len(one["data"]) == 1 and one["usage"]["prompt_tokens"] == 3
    two = http.post("/v1/embeddings", json={"input": [[101, 7592, 102], [101, 102]]}).json()
    assert [d["index"] for d in two["data"]] == [0, 1]
    # Padded batch vs alone: equal up to float32 rounding.
    assert two["data"][0]["embedding"] == pytest.approx(one["data"][0]["embedding"], abs=1e-5)
    bad = http.post("/v1/embeddings", json={"input": [[10**6]]})
    assert bad.status_code == 400 and _error(bad)["param"].startswith("input")


def test_chat_tools_reach_the_template_and_n2_streams(http: httpx.Client) -> None:
    tools = [{"type": "function", "function": {"name": "get_time", "description": "now", "parameters": {"type": "object"}}}]
    resp = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "time?"}], "tools": tools, "max_tokens": 2},
    )
    assert resp.status_code == 200, resp.text
    message = resp.json()["choices"][0]["message"]
    # Two tokens cannot make a call (auto leaves it to the model), so it is content, and tool_calls is absent.
    assert message["tool_calls"] is None and isinstance(message["content"], str)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "n": 2, "seed": 7, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as stream:
        events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert mine[-1]["finish_reason"] == "length"
