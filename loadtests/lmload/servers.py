"""Server processes for the benchmarks and the tests that start them: launched in a session of their own
(so that stopping one ends the engine processes it spawned, and only them), polled until a ready route
answers 200, stopped by process group (SIGTERM, then SIGKILL after a grace period)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(
    argv: list[str], log_path: Path | None = None, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start `argv` in its own session, its output appended to `log_path` (or inherited)."""
    if log_path is None:
        return subprocess.Popen(argv, cwd=cwd, env=env, start_new_session=True)
    with log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(
    process: subprocess.Popen[bytes], url: str, timeout_s: float, what: str, poll_s: float = 0.5,
    log_path: Path | None = None,
) -> None:
    """Until GET `url` answers 200; RuntimeError if the process exits first, TimeoutError (after stopping
    it) if `timeout_s` passes; either says the end of `log_path`, where the process's output went."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} before it was ready{_log_tail(log_path)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    stop(process)
    raise TimeoutError(f"{what} was not ready within {timeout_s:.0f} s{_log_tail(log_path)}")


def _log_tail(log_path: Path | None, num_chars: int = 6000) -> str:
    if log_path is None or not log_path.exists():
        return ""
    return ":\n" + log_path.read_text(errors="replace")[-num_chars:]


def stop(process: subprocess.Popen[bytes], grace_s: float = 90.0) -> None:
    """SIGTERM to the process's group (it drains), SIGKILL if it outlives `grace_s`."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
