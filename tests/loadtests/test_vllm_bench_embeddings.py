"""vLLM's own load generator against lmserve's embeddings endpoint, as vLLM's users run it: `vllm bench serve
--backend openai-embeddings` sends vLLM's `truncate_prompt_tokens: -1` with every request, and every request
must succeed. Runs where vLLM is importable (`make vllm-test`, in vLLM's CPU build's venv); skipped elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmload.servers import free_port, launch, stop, wait_ready
from lmserve.checkpoints.bundled import require_bundled

pytest.importorskip(
    "vllm", reason="vLLM is not installed in this environment; `make vllm-test` runs this (vllm bench serve loads it)"
)

NUM_PROMPTS = 16


def test_vllm_bench_serve_loads_the_embeddings_endpoint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    tokenizer = require_bundled("all-minilm-l6-v2")
    port = free_port()
    argv = [sys.executable, "-m", "lmserve", "serve", "--model", str(tiny_llama_dir), "--host", "127.0.0.1",
            "--port", str(port), "--grpc-port", "0", "--no-safety"]  # fmt: skip
    server = launch(argv, tmp_path / "server.log")
    try:
        wait_ready(server, f"http://127.0.0.1:{port}/readyz", 300, "lmserve")
        bench = [str(Path(sys.prefix) / "bin" / "vllm"), "bench", "serve", "--backend", "openai-embeddings",
                 "--endpoint", "/v1/embeddings", "--base-url", f"http://127.0.0.1:{port}", "--model", "all-minilm-l6-v2",
                 "--tokenizer", str(tokenizer), "--dataset-name", "random", "--random-input-len", "300",
                 "--random-output-len", "1", "--num-prompts", str(NUM_PROMPTS), "--max-concurrency", "4", "--seed", "0"]  # fmt: skip
        # 300-token inputs are longer than the model's 256: truncate_prompt_tokens -1 is what lets them through.
        done = subprocess.run(bench, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-3000:]
        summary = " ".join(done.stdout.split())
        assert f"Successful requests: {NUM_PROMPTS}" in summary, output[-3000:]
    finally:
        stop(server)
