"""The suite's one way to run `lmserve`: the real command line in a subprocess, as a user does (`python -m
lmserve` is the same entry point as the `lmserve` script, and finds this checkout's `service/lmserve` through
the editable install), started and stopped by the load tests' launcher (lmload.servers, with its
free_port), and `call_cli`, the same entry point called in this
process for the error cases (an interpreter start costs seconds on 2 cores; the parsing and the checks are
the same code either way)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "loadtests"))  # lmload: the one process launcher

from lmload.servers import free_port, launch, stop  # noqa: E402
from lmload.servers import wait_ready as lmload_wait_ready  # noqa: E402

__all__ = ["REPO_ROOT", "CliResult", "call_cli", "cli_command", "cli_env", "cli_server", "free_port", "run_cli",
           "start_process", "stop_process", "wait_ready"]  # fmt: skip
POLL_S = 0.1  # between two readiness probes: short next to a model load, cheap next to a request


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
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


# ---- a server in a process of its own: the load tests' launcher (loadtests/lmload/servers.py), the one
# the benchmarks use too -----------------------------------------------------------------------------------


def start_process(
    argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None, cwd: Path = REPO_ROOT
) -> subprocess.Popen[bytes]:
    """`argv` in the background, in a session of its own (so a test can signal its group as a terminal or a
    kubelet would), stdout and stderr both into `log_path` (a pipe nobody reads can fill up and stall the
    server). `env`: the whole environment (default: cli_env())."""
    return launch(list(argv), log_path, env=dict(env) if env is not None else cli_env(), cwd=cwd)


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM to its group, then SIGKILL if it has not ended within `grace_s`; a no-op for an ended process."""
    stop(proc, grace_s)


def wait_ready(
    proc: subprocess.Popen[bytes], base: str, log_path: Path, timeout_s: float = 120.0, path: str = "/readyz"
) -> None:
    """Until GET {base}{path} answers 200; fails with the server's log if it exits first or the time passes."""
    lmload_wait_ready(proc, f"{base}{path}", timeout_s, "the server", poll_s=POLL_S, log_path=log_path)


@contextmanager
def cli_server(args: list[str], port: int, log_path: Path, timeout_s: float = 120.0) -> Iterator[str]:
    """`lmserve` with `args` (which serve HTTP on `port`) in a subprocess, its output in `log_path`; yields its
    base URL once /readyz answers 200 (failing with the log if it exits first), terminates it after."""
    proc = start_process(cli_command(*args), log_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base, log_path, timeout_s)
        yield base
    finally:
        stop_process(proc)


# ---- the command line in this process -----------------------------------------------------------------------


@dataclass(frozen=True)
class CliResult:
    """What `run_cli` reads of a finished command, for `call_cli`."""

    returncode: int
    stdout: str
    stderr: str


class ServeGotPastItsChecks(AssertionError):
    """`call_cli("serve", ...)` passed every pre-flight check: it would load a model and serve, in the
    test process. A test of an error case that gets here has found a check that no longer fires."""


@contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def call_cli(*args: str, env: Mapping[str, str] | None = None) -> CliResult:
    """`lmserve ARGS` as `lmserve.cli.main(ARGS)` in this process, with run_cli's environment (LMSERVE_*
    cleared, then `env`): the exit code (argparse's SystemExit included) and what it wrote to stdout and
    stderr. An exception main does not turn into an exit code propagates, as a traceback would show.
    Everything main changes in the process (os.environ, the progress logger's level, the root logger's
    handlers) is put back. A `serve` stops where it would start the server: ServeGotPastItsChecks."""
    from lmserve import app, cli
    from lmserve.progress import PROGRESS_LOGGER

    def past_the_checks(*_args: object, **_kwargs: object) -> None:
        raise ServeGotPastItsChecks(f"lmserve {' '.join(args)} passed its checks and would serve")

    progress, root = logging.getLogger(PROGRESS_LOGGER), logging.getLogger()
    saved_level, saved_root = progress.level, (root.level, root.handlers[:])
    # app.run configures logging right after preflight() and before it reads any weight.
    saved_configure = app.configure_logging
    app.configure_logging = past_the_checks
    out, err = io.StringIO(), io.StringIO()
    try:
        with _environment(cli_env(env)), redirect_stdout(out), redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as exc:  # argparse: --help (0) and a bad flag (2)
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        app.configure_logging = saved_configure
        progress.setLevel(saved_level)
        root.setLevel(saved_root[0])
        root.handlers[:] = saved_root[1]
    return CliResult(code, out.getvalue(), err.getvalue())
