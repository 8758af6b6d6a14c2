"""Running the real `lmserve` command line in a subprocess, as a user does (`python -m service` is the same
entry point as the `lmserve` script, and finds this checkout's `service/` first)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without any LMSERVE_* setting a developer may have exported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMSERVE_")}
    env.update({"HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    env.update(extra or {})
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "service", *args]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(*args), cwd=REPO_ROOT, env=cli_env(env), capture_output=True, text=True, timeout=timeout
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
