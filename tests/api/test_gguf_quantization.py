"""`lmserve serve --quantization q4_1`: the bundled GGUF served through its own Q4_1 blocks (its head through
token_embd's Q8_0 blocks), started as a user starts it (the real command line, in a subprocess, on
loopback), answering greedy completions; and its greedy agreement with the float32 dequantized model (the
API tests' `server`) over a few prompts, reported, not asserted equal: 4-bit weights and 8-bit activations
are not the float model, and where the two first part is the measure."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from tests.api.conftest import LiveServer
from tests.cli_process import cli_server, free_port

pytestmark = pytest.mark.slow  # a server process of its own

MODEL = "smollm2-135m-instruct"
PROMPTS = ["The capital of France is", "Hello, how are you?", "1 2 3 4", "def f(x):", "The sun rises in the"]
MAX_TOKENS = 16


@dataclass(frozen=True)
class QuantizedServer:
    base_url: str
    log_path: Path


@pytest.fixture(scope="module")
def q4_1_server(cache_dir: Path, smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuantizedServer]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("q4_1") / "server.log"
    args = [
        "serve", "--model", MODEL, "--quantization", "q4_1", "--dtype", "float32", "--embedding-model", "none",
        "--port", str(port), "--grpc-port", "0", "--cache-dir", str(cache_dir), "--max-model-len", "256",
        "--num-kv-blocks", "64", "--no-safety",
    ]  # fmt: skip
    with cli_server(args, port, log_path, timeout_s=180) as base_url:
        yield QuantizedServer(base_url, log_path)


def _greedy(base_url: str, prompts: list[str], headers: dict[str, str] | None = None) -> list[str]:
    """Greedy continuations of `prompts`, in one request (the engine batches them)."""
    body = {"model": MODEL, "prompt": prompts, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{base_url}/v1/completions", json=body, headers=headers or {}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == MAX_TOKENS * len(prompts)
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    return [c["text"] for c in choices]


def test_q4_1_server_answers_greedy_completions(q4_1_server: QuantizedServer) -> None:
    log = q4_1_server.log_path.read_text()
    (loaded,) = [line for line in log.splitlines() if "model loaded" in line]
    assert "GGUF q4_1 blocks (head q8_0), qgemm_gguf.c" in loaded
    assert "MiB, bfloat16)" in loaded  # the KV pool: bf16 under float32 activations (kv_cache_dtype)
    (first,) = _greedy(q4_1_server.base_url, ["The capital of France is"])
    assert "Paris" in first
    assert _greedy(q4_1_server.base_url, ["The capital of France is"]) == [first]  # greedy: the same again


def test_q4_1_greedy_agreement_with_float32_is_reported(
    q4_1_server: QuantizedServer, server: LiveServer, smollm2_dir: Path, record_property: pytest.RecordProperty
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    matching: list[int] = []
    identical = 0
    exact_texts = _greedy(server.base_url, PROMPTS, server.headers)
    for quantized_text, exact_text in zip(_greedy(q4_1_server.base_url, PROMPTS), exact_texts, strict=True):
        identical += quantized_text == exact_text
        # the texts tokenized again: the same tokens as generated, up to the first difference
        quantized = tokenizer.encode(quantized_text, add_special_tokens=False)
        exact = tokenizer.encode(exact_text, add_special_tokens=False)
        common = 0
        while common < min(len(quantized), len(exact)) and quantized[common] == exact[common]:
            common += 1
        matching.append(common)
    report = (
        f"q4_1 vs float32 greedy, {len(PROMPTS)} prompts x {MAX_TOKENS} tokens: tokens before the first difference "
        f"{matching}; {identical} of {len(PROMPTS)} continuations identical"
    )
    record_property("q4_1_greedy_agreement", report)
    print(report)
    # A floor, not the figure (it is reported): 4-bit weights may part from float32 late, never at once.
    # Measured 2026-12-07 (AVX-512): [16, 9, 16, 16, 10], 3 of 5 identical.
    assert min(matching) >= 4 and identical >= 1, report
