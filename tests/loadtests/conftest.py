"""The load tests' fixtures: loadtests/ on sys.path, and a real lmserve server process on loopback.

Locust monkey-patches the process it is imported into (gevent), so nothing here imports it: the
scenarios and the sweep run as subprocesses, exactly as a user runs them, against `python -m service
serve` started with small limits (max_queue 8, so that the overload shape meets 503s quickly).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOADTESTS = ROOT / "loadtests"
sys.path.insert(0, str(LOADTESTS))  # the lmload package; only its Locust-free modules are imported here

from lmload.servers import free_port, launch, stop, wait_ready  # noqa: E402

API_KEY = "load-test-key"
MAX_QUEUE = 8  # admitted generation/embedding requests; the smoke run stays under it, the overload run not
STARTUP_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class LmserveProcess:
    url: str
    grpc_target: str
    api_key: str
    tokenizer_dir: Path
    log_path: Path

    def env(self) -> dict[str, str]:
        """The environment of a Locust run against it (settings by the documented variables)."""
        return {**os.environ, "LMSERVE_API_KEY": self.api_key, "LMSERVE_GRPC_TARGET": self.grpc_target}


@pytest.fixture(scope="session")
def lmserve_process(
    cache_dir: Path, smollm2_dir: Path, minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LmserveProcess]:
    port, grpc_port = free_port(), free_port()
    log_path = tmp_path_factory.mktemp("lmserve") / "serve.log"
    env = {
        **os.environ,
        "LMSERVE_API_KEYS": API_KEY,
        "LMSERVE_MAX_QUEUE": str(MAX_QUEUE),
        "LMSERVE_DRAIN_TIMEOUT_S": "2",
        "HF_HUB_OFFLINE": "1",
    }
    argv = [
        sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--grpc-port", str(grpc_port), "--cache-dir", str(cache_dir), "--kv-cache-memory", "0.125",
        "--max-model-len", "512", "--log-level", "warning",
        # One engine thread: Locust shares the 2 cores, and OpenMP threads that wait on a busy core crawl.
        "--num-threads", "1",
        # The safety filter releases streamed text a sentence at a time, so a short answer can arrive in
        # one chunk and leave no inter-token latency to report: the scenarios are tested without it.
        "--no-safety",
    ]
    proc = launch(argv, log_path, env=env, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(proc, f"{url}/readyz", STARTUP_TIMEOUT_S, "lmserve", poll_s=0.25)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"{exc}:\n{log_path.read_text()[-3000:]}")
        yield LmserveProcess(url, f"127.0.0.1:{grpc_port}", API_KEY, smollm2_dir, log_path)
    finally:
        stop(proc, grace_s=30)
