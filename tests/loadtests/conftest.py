"""The load tests' fixtures: loadtests/ on sys.path, and real lmserve server processes on loopback.

Locust monkey-patches the process it is imported into (gevent), so nothing here imports it: the
scenarios and the sweep run as subprocesses, exactly as a user runs them, against `python -m lmserve
serve` started with small limits (max_queue 8, so that the overload shape meets 503s quickly). Three
servers, each started once for the session and only when a test asks for it: `lmserve_process` with
`--no-safety` (the engine's own figures: every scenario, the overload shape, the sweep),
`lmserve_default_policy` with the packaged safety policy (the documented run), and `lmserve_filtering`
with a policy that blocks every output, so that each generation ends with finish_reason content_filter.
The two with safety are started together (their start-ups overlap).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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


# Blocks any output text (and nothing on input): every generation ends with finish_reason content_filter.
FILTER_EVERYTHING_POLICY = r"""
version: 1
categories:
  blocklist: {input: off, output: block, patterns: ['\S']}
"""


@dataclass(frozen=True)
class LmserveProcess:
    url: str
    grpc_target: str
    api_key: str
    tokenizer_dir: Path
    log_path: Path

    def env(self, grpc: bool = True) -> dict[str, str]:
        """The environment of a Locust run against it (settings by the documented variables); `grpc`
        False: no gRPC target, as a run that names none."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMSERVE_")}
        env["LMSERVE_API_KEY"] = self.api_key
        if grpc:
            env["LMSERVE_GRPC_TARGET"] = self.grpc_target
        return env


@dataclass
class _Launched:
    proc: subprocess.Popen[bytes]
    server: LmserveProcess


def _launch(cache_dir: Path, tokenizer_dir: Path, log_dir: Path, *safety_args: str) -> _Launched:
    port, grpc_port = free_port(), free_port()
    log_path = log_dir / "serve.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LMSERVE_")},
        "LMSERVE_API_KEYS": API_KEY,
        "LMSERVE_MAX_QUEUE": str(MAX_QUEUE),
        "LMSERVE_DRAIN_TIMEOUT_S": "2",
        "HF_HUB_OFFLINE": "1",
    }
    argv = [
        sys.executable, "-m", "lmserve", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--grpc-port", str(grpc_port), "--cache-dir", str(cache_dir), "--kv-cache-memory", "0.125",
        "--max-model-len", "512", "--log-level", "warning",
        # One engine thread: Locust shares the 2 cores, and OpenMP threads that wait on a busy core crawl.
        "--num-threads", "1", *safety_args,
    ]
    proc = launch(argv, log_path, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    return _Launched(proc, LmserveProcess(url, f"127.0.0.1:{grpc_port}", API_KEY, tokenizer_dir, log_path))


def _wait_ready(launched: _Launched) -> None:
    try:
        wait_ready(launched.proc, f"{launched.server.url}/readyz", STARTUP_TIMEOUT_S, "lmserve", poll_s=0.25)
    except (RuntimeError, TimeoutError) as exc:
        pytest.fail(f"{exc}:\n{launched.server.log_path.read_text()[-3000:]}")


@contextmanager
def _running(*launched: _Launched) -> Iterator[None]:
    try:
        for one in launched:
            _wait_ready(one)
        yield
    finally:
        for one in launched:
            stop(one.proc, grace_s=30)


@pytest.fixture(scope="session")
def lmserve_process(
    cache_dir: Path, smollm2_dir: Path, minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LmserveProcess]:
    """Without the safety filter: the engine's own figures, every generation runs to max_tokens."""
    launched = _launch(cache_dir, smollm2_dir, tmp_path_factory.mktemp("lmserve"), "--no-safety")
    with _running(launched):
        yield launched.server


@pytest.fixture(scope="session")
def _safety_servers(
    cache_dir: Path, smollm2_dir: Path, minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LmserveProcess, LmserveProcess]]:
    policy_dir = tmp_path_factory.mktemp("filter-everything")
    policy = policy_dir / "policy.yaml"
    policy.write_text(FILTER_EVERYTHING_POLICY)
    default = _launch(cache_dir, smollm2_dir, tmp_path_factory.mktemp("lmserve-default-policy"))
    filtering = _launch(cache_dir, smollm2_dir, policy_dir, "--safety-policy", str(policy))
    with _running(default, filtering):
        yield default.server, filtering.server


@pytest.fixture(scope="session")
def lmserve_default_policy(_safety_servers: tuple[LmserveProcess, LmserveProcess]) -> LmserveProcess:
    """With the packaged safety policy, as `make serve` runs it: toxic output ends with content_filter,
    streamed text comes word by word."""
    return _safety_servers[0]


@pytest.fixture(scope="session")
def lmserve_filtering(_safety_servers: tuple[LmserveProcess, LmserveProcess]) -> LmserveProcess:
    """With FILTER_EVERYTHING_POLICY: every generation ends with content_filter."""
    return _safety_servers[1]
