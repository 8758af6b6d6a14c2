"""Running the real `lmserve` command line in a subprocess, as a user does (`python -m lmserve` is the same
entry point as the `lmserve` script, and finds this checkout's `service/lmserve` through the editable install)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without any LMSERVE_* setting a developer may have exported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMSERVE_")}
    env.update({"HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    env.update(extra or {})
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmserve", *args]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(*args), cwd=REPO_ROOT, env=cli_env(env), capture_output=True, text=True, timeout=timeout
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(proc: subprocess.Popen[bytes], base: str, log_path: Path, timeout_s: float = 120.0) -> None:
    """Until GET {base}/readyz answers 200; fails with the server's log if it exits first or the time passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, log_path.read_text()
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{base} not ready in {timeout_s} s:\n{log_path.read_text()}"
        time.sleep(0.2)


@contextmanager
def cli_server(args: list[str], port: int, log_path: Path, timeout_s: float = 120.0) -> Iterator[str]:
    """`lmserve` with `args` (which serve HTTP on `port`) in a subprocess, its output in `log_path`; yields its
    base URL once /readyz answers 200 (failing with the log if it exits first), terminates it after."""
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cli_command(*args), cwd=REPO_ROOT, env=cli_env(), stdout=log_file, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base, log_path, timeout_s)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
