"""`lmserve serve --engine vllm` against vLLM's own OpenAI server, both real, on loopback.

Runs only where vLLM is importable: `make vllm-test` (the venv `make vllm-venv` builds from vLLM's CPU
build); elsewhere the module is skipped with the reason. Two servers start once per module, side by side,
on the same SmolLM2-135M-Instruct folder in float32: lmserve with the vLLM engine (HTTP and gRPC) and
`vllm serve` (the reference). vLLM compiles the model at its first start, which takes several minutes on
two shared cores; later starts take one to three (torch.compile's cache under ~/.cache/vllm).

Requests go to one server at a time, so each runs alone in its engine and float32 results are
reproducible: greedy text, seeded sampled text and logprobs must be the same from both servers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

vllm = pytest.importorskip(
    "vllm", reason="vLLM is not installed in this environment; run these with `make vllm-test` (vLLM's CPU build)"
)

import grpc  # noqa: E402
import httpx  # noqa: E402
import openai  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from lmserve.api.proto import lmserve_pb2 as pb  # noqa: E402
from lmserve.api.proto import lmserve_pb2_grpc as rpc  # noqa: E402
from lmserve.engine.base import RequestRejected  # noqa: E402
from lmserve.engine.vllm_params import to_vllm_sampling  # noqa: E402
from lmserve.engine.vllm_stats import VLLMStatsCollector  # noqa: E402
from lmserve.types import ConstraintKind, SamplingParams, StructuredOutput  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))
from lmload.servers import free_port, launch, stop  # noqa: E402

MAX_MODEL_LEN = 512
BLOCK_SIZE = 128  # passed to both servers (vLLM's CPU default too), so prefix-cache hits are exact multiples
KV_CACHE_GIB = 1
START_TIMEOUT_S = 1800.0  # two engines compiling at once on two shared cores
REQUEST_TIMEOUT_S = 300.0
PEER_MODEL = "peer"


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    base_url: str
    ready_path: str
    log_path: Path
    grpc_port: int = 0
    model: str = ""  # the served model's name, read from /v1/models once ready

    def log_tail(self, num_lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + self.ready_path, timeout=2.0).status_code == 200:
                    self.model = httpx.get(self.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2.0)
        raise TimeoutError(f"{self.name} not ready after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        stop(self.process, grace_s=60)  # the server and the engine processes it spawned (its session)


def _start(name: str, argv: list[str], log_path: Path, base_url: str, ready_path: str, grpc_port: int = 0) -> Server:
    env = dict(os.environ)
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # would override the KV size both servers are given
    env["HF_HUB_OFFLINE"] = "1"
    # vLLM 0.32's CPU build fails to load its AOT-compiled model back ("'function' object has no attribute
    # 'finalize_loading'") and recompiles for minutes at every start; torch.compile's own cache works.
    env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    return Server(name, launch(argv, log_path, env=env), base_url, ready_path, log_path, grpc_port)


@dataclass
class Pair:
    lmserve: Server
    peer: Server


@pytest.fixture(scope="module")
def servers(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    logs = tmp_path_factory.mktemp("vllm-servers")
    http_port, grpc_port, peer_port = free_port(), free_port(), free_port()
    lmserve = _start(
        "lmserve --engine vllm",
        [sys.executable, "-m", "lmserve", "serve", "--engine", "vllm", "--model", str(smollm2_dir),
         "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", str(KV_CACHE_GIB),
         "--block-size", str(BLOCK_SIZE), "--embedding-model", "none", "--host", "127.0.0.1",
         "--port", str(http_port), "--grpc-port", str(grpc_port), "--log-format", "json"],
        logs / "lmserve.log", f"http://127.0.0.1:{http_port}", "/readyz", grpc_port,
    )  # fmt: skip
    peer = _start(
        "vllm serve",
        [str(Path(sys.executable).parent / "vllm"), "serve", str(smollm2_dir), "--served-model-name", PEER_MODEL,
         "--host", "127.0.0.1", "--port", str(peer_port), "--dtype", "float32",
         "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory-bytes", f"{KV_CACHE_GIB}G",
         "--block-size", str(BLOCK_SIZE)],
        logs / "peer.log", f"http://127.0.0.1:{peer_port}", "/health",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        lmserve.wait_ready(deadline)
        peer.wait_ready(deadline)
        yield Pair(lmserve, peer)
    finally:
        lmserve.stop()
        peer.stop()


def _post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=REQUEST_TIMEOUT_S)


def _complete(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    response = _post(server, "/v1/completions", {"model": server.model, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _chat(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    response = _post(server, "/v1/chat/completions", {"model": server.model, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _metrics(server: Server) -> dict[str, float]:
    """Every lmserve_* sample, keyed by name and labels other than `model`."""
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model")
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def _choice(completion: dict[str, Any]) -> tuple[str, str, Any, int]:
    [choice] = completion["choices"]
    return choice["text"], choice["finish_reason"], choice.get("stop_reason"), completion["usage"]["completion_tokens"]


# -- exactness against vLLM's own server ----------------------------------------------------------------

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4,",
]


def test_greedy_completions_equal_vllm_server(servers: Pair) -> None:
    for prompt in PROMPTS:
        body = {"prompt": prompt, "max_tokens": 32, "temperature": 0}
        ours, theirs = _complete(servers.lmserve, body), _complete(servers.peer, body)
        assert _choice(ours) == _choice(theirs), prompt
        assert ours["usage"]["prompt_tokens"] == theirs["usage"]["prompt_tokens"]


def test_greedy_chat_equals_vllm_server(servers: Pair) -> None:
    for question in ["What is the capital of Japan?", "Write a haiku about the sea."]:
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": 40, "temperature": 0}
        ours, theirs = _chat(servers.lmserve, body), _chat(servers.peer, body)
        assert ours["choices"][0]["message"]["content"] == theirs["choices"][0]["message"]["content"], question
        assert ours["choices"][0]["finish_reason"] == theirs["choices"][0]["finish_reason"]
        for field in ("prompt_tokens", "completion_tokens"):
            assert ours["usage"][field] == theirs["usage"][field], question


SAMPLED = {"prompt": "The list of colors: red, blue,", "max_tokens": 20, "temperature": 0.9, "seed": 11}
# Each case changes one sampling parameter of SAMPLED; both servers must give the same text for it (the
# parameter reached vLLM as vLLM's own server passes it), and it must differ from SAMPLED's text (the
# parameter did something, so dropping it in the mapping would fail here).
SAMPLING_CASES: dict[str, dict[str, Any]] = {
    "temperature": {"temperature": 0.3},
    "seed": {"seed": 12},
    "top_k": {"top_k": 2},
    "top_p": {"top_p": 0.3},
    "min_p": {"min_p": 0.3},
    "repetition_penalty": {"repetition_penalty": 1.8},
    "presence_penalty": {"presence_penalty": 2.0},
    "frequency_penalty": {"frequency_penalty": 2.0},
    "logit_bias": {"logit_bias": {"28": 6.0}},  # "," (id 28) becomes likely
    "max_tokens": {"max_tokens": 7},
    "stop": {"stop": [" the"]},
    "stop+include": {"stop": [" the"], "include_stop_str_in_output": True},
    "logprobs": {"logprobs": 3},
}


def test_every_sampling_parameter_reaches_vllm_as_its_server_passes_it(servers: Pair) -> None:
    baseline = _complete(servers.lmserve, SAMPLED)
    assert _choice(baseline) == _choice(_complete(servers.peer, SAMPLED))
    for name, change in SAMPLING_CASES.items():
        body = SAMPLED | change
        ours, theirs = _complete(servers.lmserve, body), _complete(servers.peer, body)
        assert _choice(ours) == _choice(theirs), name
        if name != "logprobs":
            assert _choice(ours)[0] != _choice(baseline)[0], f"{name} changed nothing"
        else:
            ours_lp, theirs_lp = ours["choices"][0]["logprobs"], theirs["choices"][0]["logprobs"]
            assert ours_lp["token_logprobs"] == pytest.approx(theirs_lp["token_logprobs"], abs=1e-4)
            for ours_top, theirs_top in zip(ours_lp["top_logprobs"], theirs_lp["top_logprobs"], strict=True):
                assert sorted(ours_top.values()) == pytest.approx(sorted(theirs_top.values()), abs=1e-4)


def _same_prompt_scores(ours: list[Any], theirs: list[Any]) -> None:
    """vLLM's prompt_logprobs shape on both: per prompt token (the first null) token id -> {logprob, rank, ...}."""
    assert ours[0] is None and theirs[0] is None and len(ours) == len(theirs)
    for ours_pos, theirs_pos in zip(ours[1:], theirs[1:], strict=True):
        assert set(ours_pos) == set(theirs_pos)
        for token_id, value in ours_pos.items():
            assert value["logprob"] == pytest.approx(theirs_pos[token_id]["logprob"], abs=1e-4)
            assert value["rank"] == theirs_pos[token_id]["rank"]


def test_prompt_logprobs_equal_vllm_server(servers: Pair) -> None:
    body = {"prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2}
    ours, theirs = _complete(servers.lmserve, body), _complete(servers.peer, body)
    _same_prompt_scores(ours["choices"][0]["prompt_logprobs"], theirs["choices"][0]["prompt_logprobs"])
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0, "prompt_logprobs": 0}
    _same_prompt_scores(_chat(servers.lmserve, chat)["prompt_logprobs"], _chat(servers.peer, chat)["prompt_logprobs"])


def test_eos_parameters_equal_vllm_server(servers: Pair) -> None:
    """min_tokens, ignore_eos, stop_token_ids and skip_special_tokens, where EOS ends a short chat answer."""
    chat = {"messages": [{"role": "user", "content": "Say hi."}], "temperature": 0, "max_tokens": 48}
    plain = _chat(servers.lmserve, chat)
    assert plain["choices"][0]["finish_reason"] == "stop"
    num_plain = plain["usage"]["completion_tokens"]
    assert num_plain < 40, "the answer must end by EOS for this test to show anything"
    cases = {
        "min_tokens": {"min_tokens": num_plain + 5},
        "ignore_eos": {"ignore_eos": True},
        "ignore_eos+special": {"ignore_eos": True, "skip_special_tokens": False},
        "stop_token_ids": {"stop_token_ids": [plain_token_id(servers, plain)]},
    }
    for name, change in cases.items():
        ours, theirs = _chat(servers.lmserve, chat | change), _chat(servers.peer, chat | change)
        assert ours["choices"][0]["message"]["content"] == theirs["choices"][0]["message"]["content"], name
        assert ours["choices"][0]["finish_reason"] == theirs["choices"][0]["finish_reason"], name
        assert ours["choices"][0].get("stop_reason") == theirs["choices"][0].get("stop_reason"), name
        assert ours["usage"]["completion_tokens"] == theirs["usage"]["completion_tokens"], name
        assert ours["choices"][0]["message"]["content"] != plain["choices"][0]["message"]["content"], name


def plain_token_id(servers: Pair, answer: dict[str, Any]) -> int:
    """The id of the answer's third token (a stop_token_ids case that ends it early)."""
    text = answer["choices"][0]["message"]["content"]
    ids = _post(servers.lmserve, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"]
    return int(ids[2])


# -- streaming, cancel, usage, errors, metrics ---------------------------------------------------------


def test_streaming_equals_non_streaming_with_usage(servers: Pair) -> None:
    client = openai.OpenAI(base_url=servers.lmserve.base_url + "/v1", api_key="none", timeout=REQUEST_TIMEOUT_S)
    whole = client.completions.create(model=servers.lmserve.model, prompt=PROMPTS[2], max_tokens=24, temperature=0)
    chunks = list(
        client.completions.create(
            model=servers.lmserve.model, prompt=PROMPTS[2], max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 1 and "".join(texts) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_cancel_aborts_in_vllm(servers: Pair) -> None:
    """Closing a stream aborts the request inside vLLM: its running count (our gauge, from vLLM's own
    scheduler statistics) goes back to 0 and its KV blocks are freed, long before max_tokens."""
    server = servers.lmserve
    before = _metrics(server)
    body = {"model": server.model, "prompt": "Count:", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S) as response:
        num_events = 0
        for line in response.iter_lines():
            if line.startswith("data: "):
                num_events += 1
            if num_events == 3:
                during = _metrics(server)
                break
    assert during["lmserve_num_requests_running"] == 1
    assert during["lmserve_kv_blocks_used"] >= 1
    deadline = time.monotonic() + 30
    after = _metrics(server)
    while after["lmserve_num_requests_running"] != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        after = _metrics(server)
    assert after["lmserve_num_requests_running"] == 0
    assert after["lmserve_kv_blocks_used"] == 0
    assert _delta(before, after, "lmserve_request_finished_total{finish_reason=abort}") == 1
    # Aborted well before 400 tokens: vLLM stopped generating for it.
    assert _delta(before, after, "lmserve_generation_tokens_total") < 200


def test_structured_outputs_equal_vllm_server(servers: Pair) -> None:
    """A constrained request (regex, choice, JSON schema) through lmserve --engine vllm gives vLLM's own
    server's text: the constraint reached vLLM's structured-output backend as it was sent."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
              "additionalProperties": False}  # fmt: skip
    for constraint in ({"regex": "[0-9]{3}-[0-9]{4}"}, {"choice": ["Paris", "London", "Rome"]}, {"json": schema}):
        body = {"prompt": "The capital of France is", "max_tokens": 40, "temperature": 0,
                "structured_outputs": constraint}  # fmt: skip
        ours = _complete(servers.lmserve, body)["choices"][0]["text"]
        theirs = _complete(servers.peer, body)["choices"][0]["text"]
        assert ours == theirs, (constraint, ours, theirs)
        if "choice" in constraint:
            assert ours in constraint["choice"]
        elif "regex" in constraint:
            assert re.fullmatch(constraint["regex"], ours)
        else:
            assert set(json.loads(ours)) == {"city"}


def test_a_request_timeout_aborts_in_vllm(servers: Pair) -> None:
    """x-request-timeout: the stream ends with finish_reason "timeout" before max_tokens, and the request
    is aborted inside vLLM (running back to 0, its blocks freed)."""
    server = servers.lmserve
    body = {"model": server.model, "prompt": "Count:", "max_tokens": 400, "ignore_eos": True, "stream": True}
    headers = {"x-request-timeout": "3"}
    finishes, num_tokens = [], 0
    with httpx.stream(
        "POST", server.base_url + "/v1/completions", json=body, headers=headers, timeout=REQUEST_TIMEOUT_S
    ) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line.removeprefix("data: "))["choices"][0]
                num_tokens += 1 if choice["text"] else 0
                if choice["finish_reason"] is not None:
                    finishes.append(choice["finish_reason"])
    assert finishes == ["timeout"] and 0 < num_tokens < 400
    deadline = time.monotonic() + 30
    after = _metrics(server)
    while after["lmserve_num_requests_running"] != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        after = _metrics(server)
    assert after["lmserve_num_requests_running"] == 0 and after["lmserve_kv_blocks_used"] == 0


def _grpc_complete(server: Server, prompt_token_ids: list[int], max_tokens: int) -> Any:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = rpc.GenerationStub(channel)
        request = pb.CompletionRequest(
            prompt_token_ids=pb.TokenIds(ids=prompt_token_ids), max_tokens=max_tokens, temperature=0, ignore_eos=True
        )
        return stub.Complete(request, timeout=REQUEST_TIMEOUT_S)


def test_usage_cached_tokens_and_metric_deltas(servers: Pair) -> None:
    """One request alone, then the same prompt again: usage and every engine metric move by exactly the
    work done (prefill in one step, one step per further token, whole 128-token blocks from the cache)."""
    server = servers.lmserve
    prompt = [(i * 37) % 40000 + 1000 for i in range(300)]
    max_tokens = 8
    before = _metrics(server)
    first = _grpc_complete(server, prompt, max_tokens)
    middle = _metrics(server)
    second = _grpc_complete(server, prompt, max_tokens)
    after = _metrics(server)

    assert first.usage.prompt_tokens == 300 and first.usage.completion_tokens == max_tokens
    assert first.usage.cached_tokens == 0
    hits = (300 - 1) // BLOCK_SIZE * BLOCK_SIZE  # whole blocks; the last prompt token is always computed
    assert second.usage.cached_tokens == hits == 256
    assert list(second.choices[0].token_ids) == list(first.choices[0].token_ids)

    assert _delta(before, middle, "lmserve_prompt_tokens_total") == 300
    assert _delta(before, middle, "lmserve_generation_tokens_total") == max_tokens
    assert _delta(before, middle, "lmserve_request_finished_total{finish_reason=length}") == 1
    # One prefill step that also yields the first token, then one step per token.
    assert _delta(before, middle, "lmserve_engine_steps_total") == max_tokens
    assert _delta(before, middle, "lmserve_engine_step_tokens_count") == max_tokens
    assert _delta(before, middle, "lmserve_engine_step_tokens_sum") == 300 + max_tokens - 1
    assert _delta(before, middle, "lmserve_engine_step_sequences_sum") == max_tokens
    assert _delta(before, middle, "lmserve_prefix_cache_query_tokens_total") == 300
    assert _delta(before, middle, "lmserve_prefix_cache_hit_tokens_total") == 0
    assert _delta(before, middle, "lmserve_preemptions_total") == 0
    # The engine's RequestTiming reached the histograms (queue, prefill, decode: one observation each).
    for name in ("queue", "prefill", "decode"):
        assert _delta(before, middle, f"lmserve_request_{name}_time_seconds_count") == 1
        assert _delta(before, middle, f"lmserve_request_{name}_time_seconds_sum") > 0

    assert _delta(middle, after, "lmserve_prefix_cache_query_tokens_total") == 300
    assert _delta(middle, after, "lmserve_prefix_cache_hit_tokens_total") == hits
    assert _delta(middle, after, "lmserve_engine_step_tokens_sum") == 300 - hits + max_tokens - 1
    assert after["lmserve_kv_blocks_capacity"] > 0 and after["lmserve_num_requests_waiting"] == 0


def test_values_vllm_would_change_are_refused_with_the_parameter(servers: Pair) -> None:
    server = servers.lmserve
    for body, param in [
        ({"temperature": 0.005}, "temperature"),
        ({"temperature": 0.7, "seed": -1}, "seed"),
        ({"max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ]:
        response = _post(server, "/v1/completions", {"model": server.model, "prompt": "Hi", "max_tokens": 4} | body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
    # A request after the refusals is served as usual.
    assert _complete(server, {"prompt": "Hi", "max_tokens": 2, "temperature": 0})["usage"]["completion_tokens"] == 2


# -- the mapping and the statistics, on vLLM's own types -------------------------------------------------


def test_every_sampling_field_is_mapped() -> None:
    from vllm.sampling_params import RequestOutputKind
    from vllm.sampling_params import SamplingParams as VLLMSamplingParams

    ours = SamplingParams(
        max_tokens=33, min_tokens=3, temperature=0.7, top_k=9, top_p=0.8, min_p=0.05, repetition_penalty=1.1,
        presence_penalty=0.4, frequency_penalty=-0.3, logit_bias=((5, 1.5), (5, 0.5), (7, -2.0)), seed=123,
        stop=("x", "yz"), stop_token_ids=(4, 6), ignore_eos=True, logprobs=2, skip_special_tokens=False,
        include_stop_str_in_output=True, structured=StructuredOutput(ConstraintKind.REGEX, "[a-z]+"), prompt_logprobs=3,
    )  # fmt: skip
    theirs = to_vllm_sampling(ours, VLLMSamplingParams, RequestOutputKind.DELTA)
    expected = {
        "max_tokens": 33, "min_tokens": 3, "temperature": 0.7, "top_k": 9, "top_p": 0.8, "min_p": 0.05,
        "repetition_penalty": 1.1, "presence_penalty": 0.4, "frequency_penalty": -0.3,
        "logit_bias": {5: 2.0, 7: -2.0}, "seed": 123, "stop": ["x", "yz"], "stop_token_ids": [4, 6],
        "ignore_eos": True, "logprobs": 2, "skip_special_tokens": False, "include_stop_str_in_output": True,
        "prompt_logprobs": 3,
    }  # fmt: skip
    # A field added to our SamplingParams fails here until it is mapped (or refused: speculative_tokens is
    # the native engine's prompt lookup, refused by the vLLM engine, tested with the other refusals).
    assert set(expected) | {"structured", "speculative_tokens"} == set(SamplingParams.__dataclass_fields__)
    assert {name: getattr(theirs, name) for name in expected} == expected
    assert theirs.structured_outputs.regex == "[a-z]+"
    constraints = [
        (StructuredOutput(ConstraintKind.JSON_SCHEMA, '{"type": "object"}'), "json", '{"type": "object"}'),
        (StructuredOutput(ConstraintKind.JSON_OBJECT), "json_object", True),
        (StructuredOutput(ConstraintKind.CHOICE, '["yes", "no"]'), "choice", ["yes", "no"]),
        (StructuredOutput(ConstraintKind.GRAMMAR, 'start: "a"'), "grammar", 'start: "a"'),
    ]
    for constraint, name, value in constraints:
        mapped = to_vllm_sampling(SamplingParams(structured=constraint), VLLMSamplingParams, RequestOutputKind.DELTA)
        assert getattr(mapped.structured_outputs, name) == value
    assert to_vllm_sampling(SamplingParams(), VLLMSamplingParams, RequestOutputKind.DELTA).structured_outputs is None
    assert theirs.n == 1 and theirs.output_kind == RequestOutputKind.DELTA

    for bad, param in [
        (SamplingParams(temperature=0.001), "temperature"),
        (SamplingParams(seed=-1), "seed"),
        (SamplingParams(speculative_tokens=4), "speculative_tokens"),
    ]:
        with pytest.raises(RequestRejected) as info:
            to_vllm_sampling(bad, VLLMSamplingParams, RequestOutputKind.DELTA)
        assert info.value.field == param
    # Values vLLM takes as they are pass: greedy, the smallest sampled temperature, other negative seeds.
    for fine in [SamplingParams(temperature=0.0), SamplingParams(temperature=0.01), SamplingParams(seed=-2)]:
        to_vllm_sampling(fine, VLLMSamplingParams, RequestOutputKind.DELTA)


def test_stats_collector_keeps_vllms_statistics() -> None:
    from vllm.v1.metrics.stats import IterationStats, PrefixCacheStats, SchedulerIterationDetails, SchedulerStats

    collector = VLLMStatsCollector()
    steps: list[Any] = []
    collector.on_step = steps.append
    prefill = SchedulerStats(
        num_running_reqs=2, num_waiting_reqs=3, num_skipped_waiting_reqs=1, kv_cache_usage=0.25,
        prefix_cache_stats=PrefixCacheStats(requests=2, queries=300, hits=128, preempted_requests=1,
                                            preempted_queries=50, preempted_hits=32),
        iteration_details=SchedulerIterationDetails(iteration_index=0, num_ctx_requests=2, num_ctx_tokens=172,
                                                    num_generation_requests=1, num_generation_tokens=1,
                                                    elapsed_ms=40.0),
    )  # fmt: skip
    iteration = IterationStats()
    iteration.num_preempted_reqs = 1
    collector.record(prefill, iteration)
    idle = SchedulerStats(num_running_reqs=0, num_waiting_reqs=0, kv_cache_usage=0.0)  # a step that computed nothing
    collector.record(idle, None)

    assert (collector.num_running, collector.num_waiting, collector.kv_cache_usage) == (0, 0, 0.0)
    assert collector.num_steps == 1 and collector.num_preemptions == 1
    assert (collector.num_prefix_query_tokens, collector.num_prefix_hit_tokens) == (350, 160)
    [step] = steps
    assert (step.num_scheduled_seqs, step.num_batched_tokens, step.num_preempted) == (3, 173, 1)
    assert step.duration_s == pytest.approx(0.040)
