"""`--engine vllm` settings: flags -> VLLMConfig -> vLLM's engine arguments, the refusals, and the one-line
error where vLLM is not installed. None of this needs vLLM (the engine itself: test_vllm_backend.py)."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest

from lmserve.cli import build_parser, main, serve_config_from_args
from lmserve.config import EngineConfig, ServeConfig, VLLMConfig
from lmserve.engine.vllm_params import vllm_engine_kwargs
from tests.cli_process import call_cli, free_port


def _config(*argv: str, env: dict[str, str] | None = None) -> ServeConfig:
    env = env or {}
    return serve_config_from_args(build_parser(env).parse_args(["serve", *argv]), env)


def test_unset_flags_leave_vllms_defaults_and_the_native_ones() -> None:
    config = _config("--engine", "vllm")
    assert config.vllm == VLLMConfig()
    # The native engine's defaults are unchanged by None-valued flags; its kernels go into --cache-dir's cache.
    assert config.engine == replace(EngineConfig(), cache_dir=config.cache_dir)
    kwargs = vllm_engine_kwargs(Path("/m"), "m", config.engine, config.vllm)
    assert kwargs == {
        "model": "/m", "tokenizer": "/m", "served_model_name": "m", "dtype": "auto", "max_model_len": None,
        "enable_prefix_caching": True, "tensor_parallel_size": 1, "pipeline_parallel_size": 1,
        "disable_log_stats": True, "enable_logging_iteration_details": True,
    }  # fmt: skip


def test_every_pass_through_flag_reaches_vllms_arguments() -> None:
    config = _config(
        "--engine", "vllm", "--tensor-parallel-size", "4", "--pipeline-parallel-size", "2",
        "--gpu-memory-utilization", "0.85", "--distributed-executor-backend", "ray", "--max-model-len", "4096",
        "--dtype", "bfloat16", "--kv-cache-memory", "1.5", "--no-enable-prefix-caching", "--block-size", "32",
        "--num-kv-blocks", "900", "--max-num-seqs", "64", "--max-num-batched-tokens", "8192",
    )  # fmt: skip
    kwargs = vllm_engine_kwargs(Path("/m"), "m", config.engine, config.vllm)
    assert kwargs == {
        "model": "/m", "tokenizer": "/m", "served_model_name": "m", "dtype": "bfloat16", "max_model_len": 4096,
        "enable_prefix_caching": False, "tensor_parallel_size": 4, "pipeline_parallel_size": 2,
        "disable_log_stats": True, "enable_logging_iteration_details": True, "gpu_memory_utilization": 0.85,
        "distributed_executor_backend": "ray", "kv_cache_memory_bytes": 3 * 2**29, "block_size": 32,
        "num_gpu_blocks_override": 900, "max_num_seqs": 64, "max_num_batched_tokens": 8192,
    }  # fmt: skip
    # The same flags still configure the native engine when it is chosen, and then leave VLLMConfig alone.
    native = _config("--kv-cache-memory", "1.5", "--block-size", "32", "--max-num-seqs", "64")
    assert (native.engine.kv_cache_memory_bytes, native.engine.block_size, native.engine.max_num_seqs) == (
        3 * 2**29, 32, 64,
    )  # fmt: skip
    assert native.vllm == VLLMConfig()


def test_environment_variables_set_the_vllm_flags() -> None:
    env = {
        "LMSERVE_ENGINE": "vllm", "LMSERVE_TENSOR_PARALLEL_SIZE": "2", "LMSERVE_PIPELINE_PARALLEL_SIZE": "3",
        "LMSERVE_GPU_MEMORY_UTILIZATION": "0.5", "LMSERVE_DISTRIBUTED_EXECUTOR_BACKEND": "mp",
        "LMSERVE_KV_CACHE_GIB": "2",
    }  # fmt: skip
    config = _config(env=env)
    assert config.engine_kind == "vllm"
    assert config.vllm == VLLMConfig(
        tensor_parallel_size=2, pipeline_parallel_size=3, gpu_memory_utilization=0.5,
        distributed_executor_backend="mp", kv_cache_memory_bytes=2 * 2**30,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tensor-parallel-size", "2"], "need --engine vllm"),
        (["--gpu-memory-utilization", "0.5"], "need --engine vllm"),
        (["--engine", "vllm", "--device", "cpu"], "--device is not used with --engine vllm"),
        (["--engine", "vllm", "--attention", "torch"], "--attention is not used with --engine vllm"),
        (["--engine", "vllm", "--num-threads", "2"], "--num-threads is not used with --engine vllm"),
        (["--engine", "vllm", "--quantization", "int8"], "--quantization is not used with --engine vllm"),
        (["--enable-prefix-caching", "--no-prefix-caching"], "contradict"),
        (["--engine", "vllm", "--speculative-tokens", "4"], "--speculative-tokens is the native engine's"),
        (["--prompt-lookup-min", "5", "--prompt-lookup-max", "3"], "--prompt-lookup-min must be"),
        (["--speculative-tokens", "-1"], "argument --speculative-tokens: must be"),
        # Out-of-range values are argparse's errors, with its usage above the line.
        (["--engine", "vllm", "--gpu-memory-utilization", "1.5"], "argument --gpu-memory-utilization: must be"),
        (["--engine", "vllm", "--tensor-parallel-size", "0"], "argument --tensor-parallel-size: must be"),
        (["--engine", "vllm", "--distributed-executor-backend", "slurm"], "argument --distributed-executor-backend"),
    ],
)
def test_inconsistent_flags_exit_2_with_one_error_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["serve", *argv])
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert len(errors) == 1 and message in errors[0], errors


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here, so its absence cannot be shown"
)
def test_without_vllm_the_engine_exits_2_with_one_error_line(smollm2_dir: Path) -> None:
    result = call_cli(
        "serve", "--engine", "vllm", "--model", str(smollm2_dir), "--embedding-model", "none",
        "--port", str(free_port()), "--grpc-port", "0",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: --engine vllm needs vLLM 0.32.0"), result.stderr
    assert "make vllm-venv" in lines[-1] and "Traceback" not in result.stderr


def test_lora_flags_reach_vllms_lora_arguments(tmp_path: Path) -> None:
    config = _config(
        "--engine", "vllm", "--lora-modules", f"sql={tmp_path / 'sql'}", '{"name": "chat", "path": "/a/chat"}',
        "--max-loras", "3", "--max-lora-rank", "32", "--max-cpu-loras", "6",
    )  # fmt: skip
    assert config.engine.lora_modules == (("sql", tmp_path / "sql"), ("chat", Path("/a/chat")))
    kwargs = vllm_engine_kwargs(Path("/m"), "m", config.engine, config.vllm)
    assert {k: kwargs[k] for k in ("enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras")} == {
        "enable_lora": True, "max_loras": 3, "max_lora_rank": 32, "max_cpu_loras": 6,
    }  # fmt: skip
    runtime = _config("--engine", "vllm", "--allow-runtime-lora", env={"LMSERVE_MAX_LORAS": "2"})
    assert vllm_engine_kwargs(Path("/m"), "m", runtime.engine, runtime.vllm)["max_cpu_loras"] == 2
    env = _config(env={"LMSERVE_LORA_MODULES": "a=/x/a, b=/x/b"})
    assert env.engine.lora_modules == (("a", Path("/x/a")), ("b", Path("/x/b"))) and env.engine.lora_enabled
