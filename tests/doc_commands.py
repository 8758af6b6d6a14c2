"""A doc's shell commands run as written, from a fresh clone of this checkout: its code blocks, its
logical commands, the ports it names moved to free ones, and the clone itself (the files git tracks or
would track, with the checkout's `.venv` linked in, so `make` finds its install done and `source
.venv/bin/activate` works as the docs say)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.cli_process import REPO_ROOT

DEFAULT_PORTS = (8000, 50051)  # the CLI's HTTP and gRPC ports


def fresh_clone(dest: Path) -> Path:
    """The working tree's files as a clone would have them (committed or not, never the ignored ones)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO_ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not in a clone of it either
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)  # keeps mtimes: make sees the venv's install as newer than pyproject.toml
    (dest / ".venv").symlink_to(REPO_ROOT / ".venv")
    stamp = REPO_ROOT / ".venv" / ".lmserve-installed"  # the Makefile's STAMP
    if stamp.is_file():
        # make must find the install done even where pyproject.toml changed after it: a reinstall from the clone
        # would rewrite the shared venv's `lmserve` script to the clone's path, which is gone after the test.
        installed = stamp.stat().st_mtime
        os.utime(dest / "pyproject.toml", (installed - 1, installed - 1))
    return dest


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def shell_commands(block: str) -> list[str]:
    """Logical commands of a shell block: continuations joined, trailing comments dropped."""
    commands, current = [], ""
    for line in block.splitlines():
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            command = re.sub(r"\s+#[^'\"]*$", "", current).strip()
            if command:
                commands.append(command)
            current = ""
    return commands


def run_in_shell(
    prelude: list[str], command: str, cwd: Path, env: dict[str, str], timeout_s: float
) -> subprocess.CompletedProcess[str]:
    """`command` in bash after `prelude` (the `source` lines a shell keeps from earlier commands)."""
    script = "; ".join([*prelude, command])
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)


def ports_named(text: str) -> set[int]:
    """The ports a doc names: in URLs on loopback and after --port / --grpc-port, and the defaults."""
    found = re.findall(r"127\.0\.0\.1:(\d+)|--(?:grpc-)?port[ =](\d+)", text)
    return {int(a or b) for a, b in found} | set(DEFAULT_PORTS)


def localize(command: str, ports: dict[int, int]) -> str:
    """`command` with every port of `ports` moved to its free twin."""
    for old, new in ports.items():
        command = re.sub(rf"(127\.0\.0\.1:|--port[ =]|--grpc-port[ =]){old}\b", rf"\g<1>{new}", command)
    return command


def is_server(command: str) -> bool:
    return bool(re.match(r"(make serve|(\.venv/bin/)?lmserve serve)\b", command))


__all__ = ["code_blocks", "fresh_clone", "is_server", "localize", "ports_named", "run_in_shell", "shell_commands"]
