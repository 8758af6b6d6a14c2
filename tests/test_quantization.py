"""`--quantization int8` end to end: a tiny random checkpoint served by the real `lmserve serve` answers a
greedy completion with the tokens that the int8 model itself gives; the refusals come before any weight
is read; and the agreement of int8 with float32 greedy decoding on the bundled model, measured (printed,
not asserted: int8 is an approximation, and a near-tie may go either way)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmserve.config import EngineConfig
from lmserve.engine.modeling import kernel_cache
from lmserve.engine.modeling.attention import SeqLayout
from lmserve.engine.modeling.forward_path import ForwardPath
from lmserve.engine.runner import ModelRunner
from lmserve.tokenizer import Tokenizer
from tests.cli_process import cli_server, free_port
from tests.test_cli import FileWatch, _serve_fails_before_loading

CPU_HAS_VNNI_BF16 = kernel_cache.cpu_has_int8_bf16()
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


@pytest.mark.slow
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


@pytest.mark.parametrize(
    "activations",
    [
        "float32",
        pytest.param("bfloat16", marks=pytest.mark.skipif(not CPU_HAS_VNNI_BF16, reason="no AVX-512 VNNI and BF16 here")),
    ],
)
def test_int8_greedy_agreement_with_float32_on_the_bundled_model(activations: str, smollm2_dir: Path, cache_dir: Path) -> None:
    """Measured, not asserted equal: the share of greedy tokens that int8 (under float32 activations, qgemm.c, or
    bf16 ones, qgemm_vnni.c) gives as float32 does, before the first difference and overall (printed with -s);
    the first 4 tokens of each prompt must agree."""
    tokenizer = Tokenizer.from_folder(smollm2_dir)
    num_tokens, same, prefix = 10, 0, 0
    prompt_ids = [tokenizer.encode(prompt) for prompt in PROMPTS]
    runner = ModelRunner(smollm2_dir, EngineConfig(dtype="float32", num_kv_blocks=8, cache_dir=cache_dir))
    f32 = [greedy(runner, ids, num_tokens) for ids in prompt_ids]
    # What the server runs with --quantization int8: its decode steps in the decoder stack, over a bf16 cache.
    config = EngineConfig(dtype=activations, quantization="int8", num_kv_blocks=8, cache_dir=cache_dir)
    runner = ModelRunner(smollm2_dir, config)
    assert runner.forward_path is ForwardPath.DECODER_STACK and runner.kv_caches.dtype == torch.bfloat16
    int8 = [greedy(runner, ids, num_tokens) for ids in prompt_ids]
    for prompt, a_ids, b_ids in zip(PROMPTS, f32, int8):
        same += sum(a == b for a, b in zip(a_ids, b_ids))
        common = next((i for i, (a, b) in enumerate(zip(a_ids, b_ids)) if a != b), num_tokens)
        prefix += common
        assert common >= 4, (prompt, tokenizer.decode(a_ids), tokenizer.decode(b_ids))
    total = num_tokens * len(PROMPTS)
    print(f"\nint8 ({activations} activations) vs float32 greedy on smollm2-135m-instruct: {same}/{total} tokens "
          f"equal position by position, {prefix}/{total} before the first difference")  # fmt: skip


@pytest.fixture
def watched_model(tiny_llama_dir: Path) -> Iterator[tuple[Path, FileWatch]]:
    watch = FileWatch(tiny_llama_dir)
    watch.touched()
    yield tiny_llama_dir, watch
    watch.close()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--dtype", "float16"], {}, "--quantization int8 computes with float32 activations, not float16"),
        (["--dtype", "float32", "--device", "cuda"], {}, "--quantization int8 runs on CPU only"),
        (["--dtype", "float32"], {"CC": "/nonexistent/cc"}, "there is no C compiler (/nonexistent/cc)"),
        (["--engine", "vllm"], {}, "--quantization is not used with --engine vllm"),
    ],
    ids=["fp16", "cuda", "no-compiler", "vllm"],
)
def test_int8_refusals_come_before_any_weight_is_read(
    watched_model, tmp_path: Path, args: list[str], env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # cli_env copies the test process's environment
    line = _serve_fails_before_loading(watched_model, "--quantization", "int8", *args, tmp_path=tmp_path)
    assert line.startswith("error: ") and message in line, line


@pytest.mark.parametrize(
    ("flags", "dtype", "refusal"),
    [
        (b"avx512f avx512bw avx512vl avx512_vnni avx512_bf16", "bfloat16", None),
        (b"avx512f avx512bw avx512vl avx512_vnni avx512_bf16", "auto", None),
        (b"avx512f avx512bw avx512vl avx512_bf16", "bfloat16", "needs a CPU with AVX-512 VNNI and BF16: add --dtype float32"),
        (b"avx512f avx512bw avx512vl avx512_bf16", "auto", "with bfloat16 activations (auto on this CPU) needs a CPU"),
        (b"avx2 fma", "auto", None),  # auto is float32 there
        (b"avx2 fma avx512_vnni", "bfloat16", "needs a CPU with AVX-512 VNNI and BF16"),
    ],
    ids=["vnni-bf16", "vnni-auto", "no-vnni-bf16", "no-vnni-auto", "avx2-auto", "avx2-bf16"],
)
def test_int8_takes_bf16_activations_where_the_cpu_has_vnni_and_bf16(
    flags: bytes, dtype: str, refusal: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """preflight's answer for --quantization int8 by the CPU's flags: bf16 activations (qgemm_vnni.c) where AVX-512
    VNNI and BF16 are, else float32 only, the refusal naming the flag that helps."""
    from lmserve import preflight

    monkeypatch.setattr(kernel_cache, "cpu_flags", lambda: b"flags\t: " + flags)
    engine = EngineConfig(dtype=dtype, device="cpu", quantization="int8")
    if refusal is None:
        preflight.check_quantization(engine)
    else:
        with pytest.raises(preflight.PreflightError, match=refusal.replace("(", r"\(").replace(")", r"\)")):
            preflight.check_quantization(engine)
    q8 = EngineConfig(dtype="bfloat16", device="cpu", quantization="q8_0")  # the GGUF modes stay float32-only
    with pytest.raises(preflight.PreflightError, match="computes with float32 activations, not bfloat16"):
        preflight.check_quantization(q8)


@pytest.mark.skipif(
    not CPU_HAS_VNNI_BF16, reason="this CPU has no AVX-512 VNNI and BF16: --quantization int8 runs under float32 activations here"
)
@pytest.mark.slow
def test_int8_with_dtype_auto_serves_bf16_activations_where_the_cpu_has_vnni(
    tiny_llama_dir: Path, tmp_path: Path, cache_dir: Path
) -> None:
    """`lmserve serve --quantization int8` with the default dtype (bf16 on this CPU) loads qgemm_vnni.c's weights
    and answers a greedy completion with the tokens the same int8 model gives in-process."""
    from openai import OpenAI

    port = free_port()
    log_path = tmp_path / "server.log"
    args = [
        "serve", "--model", str(tiny_llama_dir), "--embedding-model", "none", "--port", str(port), "--grpc-port", "0",
        "--quantization", "int8", "--num-kv-blocks", "64", "--no-safety", "--log-format", "text",
        "--cache-dir", str(cache_dir),
    ]  # fmt: skip
    tokenizer = Tokenizer.from_folder(tiny_llama_dir)
    prompt_ids = tokenizer.encode(PROMPTS[1])
    with cli_server(args, port, log_path) as base:
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        completion = client.completions.create(model=tiny_llama_dir.name, prompt=prompt_ids, max_tokens=8, temperature=0.0)
    assert completion.usage.completion_tokens == 8
    loaded = [line for line in log_path.read_text().splitlines() if "model loaded" in line]
    assert len(loaded) == 1 and "int8 with bf16 activations, qgemm_vnni.c" in loaded[0], loaded
    config = EngineConfig(dtype="bfloat16", quantization="int8", num_kv_blocks=8, cache_dir=cache_dir)
    want = greedy(ModelRunner(tiny_llama_dir, config), prompt_ids, 8)
    assert completion.choices[0].text == tokenizer.decode(want)


def test_bad_quantization_flag_and_variable_are_one_error_each() -> None:
    from tests.cli_process import call_cli

    flag = call_cli("serve", "--quantization", "int4")
    assert flag.returncode == 2 and "argument --quantization" in flag.stderr and "Traceback" not in flag.stderr
    variable = call_cli("serve", env={"LMSERVE_QUANTIZATION": "fp8"})
    assert variable.returncode == 2 and "error: LMSERVE_QUANTIZATION='fp8'" in variable.stderr
