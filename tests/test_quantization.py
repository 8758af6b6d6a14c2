"""`--quantization int8` end to end: a tiny random checkpoint served by the real `lmserve serve` answers a
greedy completion with the tokens that the int8 model itself gives; the refusals come before any weight
is read; and the agreement of int8 with float32 greedy decoding on the bundled model, measured (printed,
not asserted: int8 is an approximation, and a near-tie may go either way)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from service.config import EngineConfig
from service.engine.modeling.attention import SeqLayout
from service.engine.modeling.forward_path import ForwardPath
from service.engine.runner import ModelRunner
from service.tokenizer import Tokenizer
from tests.cli_process import cli_server, free_port
from tests.test_cli import FileWatch, _serve_fails_before_loading

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@torch.inference_mode()
def greedy(runner: ModelRunner, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """Greedy tokens straight from the runner: the prompt in one prefill, then one token per step over its
    KV cache (one sequence, blocks 0, 1, ...), without the engine's scheduler or sampler."""
    ids = list(prompt_ids)
    block_size = runner.kv_spec.block_size
    start = 0
    for _ in range(num_tokens):
        blocks = list(range(-(-len(ids) // block_size)))
        meta = runner.attention_metadata([SeqLayout(0, len(ids) - start, start, blocks)])
        hidden = runner.forward(torch.tensor(ids[start:]), torch.arange(start, len(ids)), meta)
        ids.append(int(runner.model.compute_logits(hidden[-1:]).argmax()))
        start = len(ids) - 1
    return ids[len(prompt_ids) :]


@pytest.fixture
def int8_server(tiny_llama_dir: Path, tmp_path: Path, cache_dir: Path) -> Iterator[tuple[str, Path]]:
    port = free_port()
    log_path = tmp_path / "server.log"
    args = [
        "serve", "--model", str(tiny_llama_dir), "--embedding-model", "none", "--port", str(port), "--grpc-port", "0",
        "--quantization", "int8", "--dtype", "float32", "--num-kv-blocks", "64", "--no-safety", "--log-format", "text",
        "--cache-dir", str(cache_dir),
    ]  # fmt: skip
    with cli_server(args, port, log_path) as base:
        yield base, log_path


def test_int8_server_answers_a_greedy_completion_with_the_int8_models_tokens(
    int8_server: tuple[str, Path], tiny_llama_dir: Path, cache_dir: Path
) -> None:
    from openai import OpenAI

    base, log_path = int8_server
    tokenizer = Tokenizer.from_folder(tiny_llama_dir)
    prompt_ids = tokenizer.encode(PROMPTS[0])
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    completion = client.completions.create(model=tiny_llama_dir.name, prompt=prompt_ids, max_tokens=8, temperature=0.0)
    assert completion.usage.completion_tokens == 8 and completion.choices[0].finish_reason == "length"
    loaded = [line for line in log_path.read_text().splitlines() if "model loaded" in line]
    assert len(loaded) == 1 and "weights prepacked for int8, qgemm.c" in loaded[0], loaded

    config = EngineConfig(dtype="float32", quantization="int8", num_kv_blocks=8, cache_dir=cache_dir)
    want = greedy(ModelRunner(tiny_llama_dir, config), prompt_ids, 8)
    assert completion.choices[0].text == tokenizer.decode(want)


def test_int8_greedy_agreement_with_float32_on_the_bundled_model(smollm2_dir: Path, cache_dir: Path) -> None:
    """Measured, not asserted equal: the share of greedy tokens that int8 gives as float32 does, before
    the first difference and overall (printed with -s); the first 4 tokens of each prompt must agree."""
    tokenizer = Tokenizer.from_folder(smollm2_dir)
    config = dict(dtype="float32", num_kv_blocks=8, cache_dir=cache_dir)
    num_tokens, same, prefix = 10, 0, 0
    prompt_ids = [tokenizer.encode(prompt) for prompt in PROMPTS]
    runner = ModelRunner(smollm2_dir, EngineConfig(**config))
    f32 = [greedy(runner, ids, num_tokens) for ids in prompt_ids]
    # What the server runs with --quantization int8: its decode steps in the decoder stack, over a bf16 cache.
    runner = ModelRunner(smollm2_dir, EngineConfig(quantization="int8", **config))
    assert runner.forward_path is ForwardPath.DECODER_STACK and runner.kv_caches.dtype == torch.bfloat16
    int8 = [greedy(runner, ids, num_tokens) for ids in prompt_ids]
    for prompt, a_ids, b_ids in zip(PROMPTS, f32, int8):
        same += sum(a == b for a, b in zip(a_ids, b_ids))
        common = next((i for i, (a, b) in enumerate(zip(a_ids, b_ids)) if a != b), num_tokens)
        prefix += common
        assert common >= 4, (prompt, tokenizer.decode(a_ids), tokenizer.decode(b_ids))
    total = num_tokens * len(PROMPTS)
    print(f"\nint8 vs float32 greedy on smollm2-135m-instruct: {same}/{total} tokens equal position by position, "
          f"{prefix}/{total} before the first difference")  # fmt: skip


@pytest.fixture
def watched_model(tiny_llama_dir: Path) -> Iterator[tuple[Path, FileWatch]]:
    watch = FileWatch(tiny_llama_dir)
    watch.touched()
    yield tiny_llama_dir, watch
    watch.close()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--dtype", "bfloat16"], {}, "--quantization int8 computes with float32 activations, not bfloat16"),
        (["--dtype", "float32", "--device", "cuda"], {}, "--quantization int8 runs on CPU only"),
        (["--dtype", "float32"], {"CC": "/nonexistent/cc"}, "there is no C compiler (/nonexistent/cc)"),
        (["--engine", "vllm"], {}, "--quantization is not used with --engine vllm"),
    ],
    ids=["bf16", "cuda", "no-compiler", "vllm"],
)
def test_int8_refusals_come_before_any_weight_is_read(
    watched_model, tmp_path: Path, args: list[str], env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # cli_env copies the test process's environment
    line = _serve_fails_before_loading(watched_model, "--quantization", "int8", *args, tmp_path=tmp_path)
    assert line.startswith("error: ") and message in line, line


def test_bad_quantization_flag_and_variable_are_one_error_each() -> None:
    from tests.cli_process import run_cli

    flag = run_cli("serve", "--quantization", "int4")
    assert flag.returncode == 2 and "argument --quantization" in flag.stderr and "Traceback" not in flag.stderr
    variable = run_cli("serve", env={"LMSERVE_QUANTIZATION": "fp8"})
    assert variable.returncode == 2 and "error: LMSERVE_QUANTIZATION='fp8'" in variable.stderr
