"""`lmserve serve --engine vllm --lora-modules` against `vllm serve --enable-lora`, both real, on loopback,
on SmolLM2-135M-Instruct in float32 with two random PEFT adapters: each adapter's greedy text is vLLM's own
server's, one adapter given at start and one loaded at run time; unloading refuses it afterwards; bad
folders are refused before vLLM sees them. Runs where vLLM is importable (`make vllm-test`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

vllm = pytest.importorskip(
    "vllm", reason="vLLM is not installed in this environment; run these with `make vllm-test` (vLLM's CPU build)"
)

import httpx  # noqa: E402

from tests.checkpoints.lora_adapters import save_random_lora  # noqa: E402
from tests.engine.test_vllm_backend import KV_CACHE_GIB, MAX_MODEL_LEN, START_TIMEOUT_S, Server, _start  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))
from lmload.servers import free_port  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@dataclass
class LoraPair:
    lmserve: Server
    peer: Server
    adapters: dict[str, Path]


@pytest.fixture(scope="module")
def lora_servers(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoraPair]:
    root = tmp_path_factory.mktemp("vllm-lora")
    adapters = {
        "qv": save_random_lora(smollm2_dir, root / "qv", r=8, alpha=16, targets=["q_proj", "v_proj"], seed=5),
        "mlp": save_random_lora(smollm2_dir, root / "mlp", r=16, alpha=16, targets=["gate_proj", "up_proj", "down_proj"], seed=6),
    }
    http_port, peer_port = free_port(), free_port()
    common = ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--max-loras", "2", "--max-lora-rank", "16"]
    lmserve = _start(
        "lmserve --engine vllm --lora-modules",
        [sys.executable, "-m", "lmserve", "serve", "--engine", "vllm", "--model", str(smollm2_dir), *common,
         "--kv-cache-memory", str(KV_CACHE_GIB), "--embedding-model", "none", "--no-safety", "--host", "127.0.0.1",
         "--port", str(http_port), "--grpc-port", "0", "--lora-modules", f"qv={adapters['qv']}", "--allow-runtime-lora"],
        root / "lmserve.log", f"http://127.0.0.1:{http_port}", "/readyz",
    )  # fmt: skip
    peer = _start(
        "vllm serve --enable-lora",
        [str(Path(sys.executable).parent / "vllm"), "serve", str(smollm2_dir), "--served-model-name", "peer", *common,
         "--host", "127.0.0.1", "--port", str(peer_port), "--kv-cache-memory-bytes", f"{KV_CACHE_GIB}G",
         "--enable-lora", "--lora-modules", *(f"{n}={p}" for n, p in adapters.items())],
        root / "peer.log", f"http://127.0.0.1:{peer_port}", "/health",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        lmserve.wait_ready(deadline)
        peer.wait_ready(deadline)
        yield LoraPair(lmserve, peer, adapters)
    finally:
        lmserve.stop()
        peer.stop()


def _text(server: Server, model: str, prompt: str) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0}
    reply = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def test_adapters_through_vllm_equal_vllms_own_server(lora_servers: LoraPair) -> None:
    ours, peer = lora_servers.lmserve, lora_servers.peer
    cards = httpx.get(f"{ours.base_url}/v1/models", timeout=30).json()["data"]
    assert [(c["id"], c["parent"]) for c in cards] == [(ours.model, None), ("qv", ours.model)]
    load = httpx.post(f"{ours.base_url}/v1/load_lora_adapter", timeout=300,
                      json={"lora_name": "mlp", "lora_path": str(lora_servers.adapters["mlp"])})  # fmt: skip
    assert load.status_code == 200, load.text
    for prompt in PROMPTS:
        base = _text(ours, ours.model, prompt)
        assert base == _text(peer, "peer", prompt)
        for name in ("qv", "mlp"):
            adapted = _text(ours, name, prompt)
            assert adapted == _text(peer, name, prompt), (name, prompt)
    assert _text(ours, "qv", PROMPTS[0]) != _text(ours, ours.model, PROMPTS[0]), "the adapter changed nothing"
    unload = httpx.post(f"{ours.base_url}/v1/unload_lora_adapter", json={"lora_name": "mlp"}, timeout=60)
    assert unload.status_code == 200, unload.text
    gone = httpx.post(f"{ours.base_url}/v1/completions", json={"model": "mlp", "prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_bad_adapters_are_refused_before_vllm(lora_servers: LoraPair, tmp_path: Path) -> None:
    ours = lora_servers.lmserve
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 64, "lora_alpha": 16}')
    reply = httpx.post(f"{ours.base_url}/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": str(empty)}, timeout=60)
    assert reply.status_code == 400 and "rank 64 is above --max-lora-rank 16" in reply.json()["error"]["message"]
    assert _text(ours, "qv", PROMPTS[0])  # still serving
