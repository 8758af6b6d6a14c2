"""The benchmarks' one way to run a server: `python -m lmserve serve` (or a peer's OpenAI-compatible
server) on loopback on a free port, polled until its ready route answers 200 within a bounded time, then
stopped (SIGTERM to its process group, SIGKILL after a grace period) and waited for.

The process handling itself is lmload.servers', which the load tests and the vLLM tests start their
servers with: one launcher for the repository, which this module gives the benchmarks' shape.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchkit.repo import LOADTESTS_DIR, REPO_ROOT

# loadtests/ is a folder of scripts, not a package: its lmload package is importable from the folder.
if str(LOADTESTS_DIR) not in sys.path:
    sys.path.append(str(LOADTESTS_DIR))

from lmload.servers import free_port, launch, stop, wait_ready  # noqa: E402

DEFAULT_START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ServerCommand:
    argv: list[str]
    ready_path: str  # answers 200 once the server serves: lmserve's /readyz, vLLM's and llama.cpp's /health


@dataclass(frozen=True)
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    model: str  # the first id its /v1/models lists: what requests (and `vllm bench serve`) name

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, grace_s: float = 90.0) -> None:
        stop(self.process, grace_s=grace_s)


def lmserve_command(port: int, *flags: str, grpc_port: int = 0) -> ServerCommand:
    """`lmserve serve` on loopback without an embedding model (no benchmark here loads one) and with warnings
    only in its log; `flags` add to or override these (argparse keeps a repeated flag's last value)."""
    argv = [
        sys.executable, "-m", "lmserve", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--grpc-port", str(grpc_port), "--embedding-model", "none", "--log-level", "warning", *flags,
    ]  # fmt: skip
    return ServerCommand(argv, "/readyz")


def start_server(
    name: str,
    command_for: Callable[[int], ServerCommand],
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    timeout_s: float = DEFAULT_START_TIMEOUT_S,
    poll_s: float = 0.5,
) -> Server:
    """Start `command_for(port)` on a free port in its own session, from the repository root, its output in
    a fresh `log_path` (or this process's); return once it serves. RuntimeError if it exits first or is not
    ready within `timeout_s`; stopped if anything (an interrupt too) ends the wait."""
    port = free_port()
    command = command_for(port)
    if log_path is not None:
        log_path.unlink(missing_ok=True)
    process = launch(command.argv, log_path, env=env, cwd=REPO_ROOT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, base_url + command.ready_path, timeout_s, name, poll_s=poll_s)
        model = str(httpx.get(base_url + "/v1/models", timeout=30).json()["data"][0]["id"])
    except (RuntimeError, TimeoutError, httpx.HTTPError) as exc:
        stop(process)
        raise RuntimeError(f"{exc}" + (f"; see {log_path}" if log_path is not None else "")) from None
    except BaseException:  # Ctrl-C or SIGTERM while it starts: nobody else holds it yet to stop it
        stop(process)
        raise
    return Server(name, process, port, model)


@contextmanager
def serving(
    name: str,
    command_for: Callable[[int], ServerCommand],
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    timeout_s: float = DEFAULT_START_TIMEOUT_S,
    grace_s: float = 90.0,
) -> Iterator[Server]:
    """start_server, stopped however the block ends."""
    server = start_server(name, command_for, env, log_path, timeout_s)
    try:
        yield server
    finally:
        server.stop(grace_s)



def exit_on_sigterm() -> None:
    """SIGTERM (e.g. from `timeout`) unwinds like an exception, through the finally blocks that stop servers."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
