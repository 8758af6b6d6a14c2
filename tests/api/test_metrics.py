"""Prometheus metrics against the real server: known traffic, exact deltas of every counter it moves.

Each test waits for the engine to be idle, scrapes /metrics, sends its requests, scrapes again and
compares the difference with what the responses report (usage, finish reasons, status codes).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from dataclasses import replace

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lmserve.api.http.app import create_app
from lmserve.app import with_config
from lmserve.metrics import Metrics
from tests.api.conftest import LiveServer

MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scrape:
    """One /metrics scrape, parsed."""

    def __init__(self, text: str) -> None:
        self.samples: Samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        """The sum of every `name` sample whose labels include `labels` (0 when there is none)."""
        want = set(labels.items())
        return sum(v for (n, got), v in self.samples.items() if n == name and want <= got)

    def minus(self, before: Scrape, name: str, **labels: str) -> float:
        return self.value(name, **labels) - before.value(name, **labels)


def scrape(client: httpx.Client) -> Scrape:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    return Scrape(resp.text)


def wait_idle(client: httpx.Client, timeout_s: float = 30.0) -> Scrape:
    """A scrape taken once no sequence is running or waiting (earlier tests' aborts may still be ending)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = scrape(client)
        busy = now.value("lmserve_num_requests_running") + now.value("lmserve_num_requests_waiting")
        if busy == 0:
            return now
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.05)


def scrape_counted(client: httpx.Client, before: Scrape, num_answers: int, timeout_s: float = 10.0) -> Scrape:
    """A scrape taken once `num_answers` more non-/metrics responses are counted.

    A request is counted just after its last byte is sent, so a client can be a moment ahead."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = scrape(client)
        counted = now.minus(before, "lmserve_requests_total") - now.minus(
            before, "lmserve_requests_total", endpoint="/metrics"
        )
        if counted >= num_answers or time.monotonic() > deadline:
            return now
        time.sleep(0.02)


def random_prompt(length: int, vocab_size: int) -> list[int]:
    """Token ids no earlier request has sent, so the prefix cache cannot already hold them."""
    rng = random.Random(uuid.uuid4().int)
    return [rng.randrange(1000, vocab_size) for _ in range(length)]


def test_generation_counters_match_usage(server: LiveServer, http: httpx.Client) -> None:
    tokenizer = server.state.tokenizer
    eos_id = min(tokenizer.eos_token_ids)
    hello_id = tokenizer.encode("Hello", add_special_tokens=False)[0]
    before = wait_idle(http)

    usages: list[dict[str, int]] = []
    finish_reasons: list[str] = []

    def post(path: str, body: dict) -> dict:
        resp = http.post(path, json={"model": MODEL, "temperature": 0.0, **body})
        assert resp.status_code == 200, resp.text
        out = resp.json()
        usages.append(out["usage"])
        finish_reasons.extend(c["finish_reason"] for c in out["choices"])
        return out

    post("/v1/completions", {"prompt": ["The sky is", "One, two,"], "max_tokens": 4, "ignore_eos": True})
    post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "ignore_eos": True})
    # Forced end of sequence on the first token: finish_reason stop, one output token.
    post("/v1/completions", {"prompt": "Go", "max_tokens": 5, "logit_bias": {str(eos_id): 100}})
    # A stop string matched on the first token's text: stop, one output token, empty text.
    stopped = post(
        "/v1/completions", {"prompt": "Go", "max_tokens": 5, "logit_bias": {str(hello_id): 100}, "stop": ["Hello"]}
    )
    assert stopped["choices"][0]["text"] == ""
    # Streamed, with usage in the last chunk.
    body = {
        "model": MODEL,
        "prompt": "Count:",
        "max_tokens": 5,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    usages.append(chunks[-1]["usage"])
    finish_reasons.extend(c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"])
    # Two client errors, refused before the engine.
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "temperature": 5}).status_code == 400
    assert http.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404

    after = scrape_counted(http, before, 7)
    assert finish_reasons == ["length", "length", "length", "stop", "stop", "length"]
    num_sequences = len(finish_reasons)
    completion_tokens = [2 * 4, 3, 1, 1, 5]  # per request, as sent above
    assert [u["completion_tokens"] for u in usages] == completion_tokens
    num_multi_token_sequences = 2 + 1 + 1  # TPOT needs two tokens: not the two one-token sequences

    assert after.minus(before, "lmserve_requests_total", endpoint="/v1/completions", status="200") == 4
    assert after.minus(before, "lmserve_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert after.minus(before, "lmserve_requests_total", endpoint="/v1/completions", status="400") == 1
    assert after.minus(before, "lmserve_requests_total", endpoint="/v1/completions", status="404") == 1
    assert after.minus(before, "lmserve_errors_total", code="invalid_value") == 1
    assert after.minus(before, "lmserve_errors_total", code="model_not_found") == 1
    assert after.minus(before, "lmserve_errors_total") == 2

    model = {"model": MODEL}
    assert after.minus(before, "lmserve_prompt_tokens_total", **model) == sum(u["prompt_tokens"] for u in usages)
    assert after.minus(before, "lmserve_generation_tokens_total", **model) == sum(completion_tokens)
    assert after.minus(before, "lmserve_request_prompt_tokens_sum", **model) == sum(u["prompt_tokens"] for u in usages)
    assert after.minus(before, "lmserve_request_generation_tokens_sum", **model) == sum(completion_tokens)
    assert after.minus(before, "lmserve_request_finished_total", finish_reason="length", **model) == 4
    assert after.minus(before, "lmserve_request_finished_total", finish_reason="stop", **model) == 2
    assert after.minus(before, "lmserve_request_finished_total", finish_reason="abort", **model) == 0
    per_sequence = (
        "lmserve_time_to_first_token_seconds_count",
        "lmserve_request_queue_time_seconds_count",
        "lmserve_request_prefill_time_seconds_count",
        "lmserve_request_decode_time_seconds_count",
        "lmserve_request_prompt_tokens_count",
        "lmserve_request_generation_tokens_count",
    )
    for name in per_sequence:
        assert after.minus(before, name, **model) == num_sequences, name
    assert after.minus(before, "lmserve_time_per_output_token_seconds_count", **model) == num_multi_token_sequences
    assert after.minus(before, "lmserve_e2e_request_latency_seconds_count", **model) == 5  # one per request
    assert after.minus(before, "lmserve_embedding_tokens_total") == 0
    assert after.value("lmserve_num_requests_running", **model) == 0


def test_engine_counters_match_the_work_done(server: LiveServer, http: httpx.Client) -> None:
    """One prompt of random token ids, alone: one prefill step, then a decode step per further token.
    Sent again, it reuses every whole block but the one holding its last token."""
    stats = server.state.engine.stats()
    prompt_len, max_tokens = 100, 5
    prompt = random_prompt(prompt_len, server.state.tokenizer.vocab_size)
    body = {"model": MODEL, "prompt": prompt, "temperature": 0.0, "ignore_eos": True}
    model = {"model": MODEL}
    before = wait_idle(http)

    resp = http.post("/v1/completions", json={**body, "max_tokens": max_tokens})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == max_tokens
    first = scrape_counted(http, before, 1)
    assert first.minus(before, "lmserve_engine_steps_total", **model) == max_tokens
    assert first.minus(before, "lmserve_engine_step_sequences_count", **model) == max_tokens
    assert first.minus(before, "lmserve_engine_step_sequences_sum", **model) == max_tokens
    assert first.minus(before, "lmserve_engine_step_tokens_sum", **model) == prompt_len + max_tokens - 1
    assert first.minus(before, "lmserve_prefix_cache_query_tokens_total", **model) == prompt_len
    assert first.minus(before, "lmserve_prefix_cache_hit_tokens_total", **model) == 0
    assert first.minus(before, "lmserve_preemptions_total", **model) == 0

    resp = http.post("/v1/completions", json={**body, "max_tokens": 1})
    assert resp.status_code == 200
    second = scrape_counted(http, first, 1)
    reused = (prompt_len - 1) // stats.block_size * stats.block_size  # 96 with blocks of 16
    assert second.minus(first, "lmserve_prefix_cache_query_tokens_total", **model) == prompt_len
    assert second.minus(first, "lmserve_prefix_cache_hit_tokens_total", **model) == reused
    assert second.minus(first, "lmserve_engine_steps_total", **model) == 1
    assert second.minus(first, "lmserve_engine_step_tokens_sum", **model) == prompt_len - reused
    assert second.value("lmserve_kv_blocks_capacity", **model) == stats.num_kv_blocks_total
    assert second.value("lmserve_kv_blocks_used", **model) == 0
    assert second.value("lmserve_kv_cache_usage_ratio", **model) == 0.0


def test_embedding_counters_match_usage(http: httpx.Client) -> None:
    before = wait_idle(http)
    inputs = ["the same sentence, three times"] * 3  # equal lengths: one batch, no padding
    resp = http.post("/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": inputs})
    assert resp.status_code == 200
    usage = resp.json()["usage"]
    after = scrape_counted(http, before, 1)
    model = {"model": EMBEDDING_MODEL}
    assert after.minus(before, "lmserve_requests_total", endpoint="/v1/embeddings", status="200") == 1
    assert after.minus(before, "lmserve_embedding_tokens_total", **model) == usage["prompt_tokens"]
    assert after.minus(before, "lmserve_embedding_batches_total", **model) == 1
    assert after.minus(before, "lmserve_embedding_batch_inputs_count", **model) == 1
    assert after.minus(before, "lmserve_embedding_batch_inputs_sum", **model) == len(inputs)
    assert after.minus(before, "lmserve_embedding_padding_tokens_total", **model) == 0
    assert after.minus(before, "lmserve_prompt_tokens_total") == 0


def test_rate_limit_and_overload_rejections_are_counted(server: LiveServer) -> None:
    """An in-process app over the shared models with its own key and limits (2 requests/min, one slot)
    and fresh metrics: the test holds the only admission slot, so two requests get 503 and the third,
    over the request rate, 429. None of them reaches the engine."""
    key = "test-key-metrics"
    config = server.state.config
    state = with_config(
        server.state,
        replace(config, api_keys=(key,), limits=replace(config.limits, requests_per_minute=2, max_queue=1)),
    )
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 1}

    async def traffic() -> tuple[list[int], str]:
        transport = httpx.ASGITransport(app=create_app(state))
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://in-process", headers=headers) as client:
            held = state.admission.admit()
            try:
                statuses = [(await client.post("/v1/completions", json=body)).status_code for _ in range(3)]
            finally:
                held.release()
            return statuses, (await client.get("/metrics")).text

    statuses, text = asyncio.run(traffic())
    assert statuses == [503, 503, 429]
    metrics = Scrape(text)
    assert metrics.value("lmserve_overloaded_total") == 2
    assert metrics.value("lmserve_rate_limited_total") == 1
    assert metrics.value("lmserve_errors_total", code="server_overloaded") == 2
    assert metrics.value("lmserve_errors_total", code="rate_limit_exceeded") == 1
    assert metrics.value("lmserve_requests_total", endpoint="/v1/completions", transport="http", status="503") == 2
    assert metrics.value("lmserve_requests_total", endpoint="/v1/completions", transport="http", status="429") == 1
    assert metrics.value("lmserve_requests_in_flight", transport="http") == 1  # the scrape itself
    assert metrics.value("lmserve_request_finished_total") == 0
    assert metrics.value("lmserve_safety_decisions_total") == 0


def test_safety_decisions_are_counted_by_direction_category_and_action() -> None:
    metrics = Metrics(MODEL)
    metrics.observe_safety("input", "injection", "block")
    metrics.observe_safety("input", "injection", "block")
    metrics.observe_safety("output", "pii", "redact")
    scraped = Scrape(metrics.render().decode())
    assert scraped.value("lmserve_safety_decisions_total", direction="input", category="injection", action="block") == 2
    assert scraped.value("lmserve_safety_decisions_total", direction="output", action="redact") == 1
    assert scraped.value("lmserve_safety_decisions_total") == 3
