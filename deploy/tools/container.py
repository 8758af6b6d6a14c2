"""One container of the image, started the way the builder at hand allows, for `make image-test`.

docker / podman: `run --detach` as the image's user with a read-only root filesystem, tmpfs on /tmp and on
the cache volume (LMSERVE_CACHE_DIR), the two ports published on 127.0.0.1; SIGTERM by `kill --signal`.
buildah (no daemon): `buildah from` the image, then `buildah run` of its ENTRYPOINT and CMD as its USER with
chroot isolation, which shares the host's network: the server listens on free ports of 127.0.0.1 (LMSERVE_HOST,
LMSERVE_PORT, LMSERVE_GRPC_PORT) and /tmp is a tmpfs; buildah run offers no read-only root, so the
container's root stays writable (the cache directory is the one the image made for uid 10001). SIGTERM goes
to the server process itself (a descendant of `buildah run`), as a runtime signals a container's PID 1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from oci_builder import Builder

CONTAINER_PORTS = {"http": 8000, "grpc": 50051}  # the image's EXPOSE
CACHE_DIR = "/var/cache/lmserve"  # the image's LMSERVE_CACHE_DIR
CLI_TIMEOUT_S = 120.0
SERVER_ARGV_MARK = "lmserve"  # the entry point execs `python -m lmserve serve`


@dataclass
class Container:
    builder: Builder
    name: str
    http_port: int
    grpc_port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None  # buildah run; None for an engine's detached container

    def terminate(self) -> None:
        """SIGTERM to the server, as a runtime stops a container."""
        if self.process is None:
            self.cli("kill", "--signal", "TERM", self.name)
        else:
            os.kill(server_pid(self.process.pid), signal.SIGTERM)

    def wait(self, timeout_s: float) -> int:
        """The server's exit status, once it has ended (TimeoutError after `timeout_s`)."""
        if self.process is not None:
            try:
                return self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired as error:
                raise TimeoutError(f"the container still runs after {timeout_s:.0f} s") from error
        result = self.cli("wait", self.name, timeout_s=timeout_s)
        return int(result.stdout.strip().splitlines()[-1])

    def server_uid(self) -> int:
        """The user id the server runs as."""
        if self.process is None:
            return int(self.cli("exec", self.name, "id", "-u").stdout.strip())
        status = read_proc(f"/proc/{server_pid(self.process.pid)}/status")
        return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])

    def is_running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        state = self.cli("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return state.stdout.strip() == "true"

    def log_tail(self, num_chars: int = 4000) -> str:
        if self.process is None:
            logs = self.cli("logs", self.name, check=False)
            self.log.write_text(logs.stdout + logs.stderr)
        return self.log.read_text(errors="replace")[-num_chars:]

    def remove(self) -> None:
        """Stops (SIGKILL) what still runs and removes the container."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=CLI_TIMEOUT_S)
        self.log_tail()
        self.cli("rm", *([] if self.builder.is_daemonless else ["--force"]), self.name, check=False)

    def cli(self, *args: str, timeout_s: float = CLI_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.builder.command(*args), capture_output=True, text=True, timeout=timeout_s, check=check)


def start(builder: Builder, tag: str, http_port: int, grpc_port: int, log: Path) -> Container:
    name = f"lmserve-image-test-{os.getpid()}"
    if not builder.is_daemonless:
        subprocess.run(
            builder.command(
                "run", "--detach", "--name", name, "--user", "10001:10001", "--read-only", "--tmpfs", "/tmp",
                "--tmpfs", f"{CACHE_DIR}:uid=10001,gid=10001",
                "--publish", f"127.0.0.1:{http_port}:{CONTAINER_PORTS['http']}",
                "--publish", f"127.0.0.1:{grpc_port}:{CONTAINER_PORTS['grpc']}", tag,
            ),
            check=True, capture_output=True, timeout=CLI_TIMEOUT_S,
        )  # fmt: skip
        return Container(builder, name, http_port, grpc_port, log)
    inspected = subprocess.run(builder.command("inspect", "--type", "image", tag), capture_output=True, text=True,
                               check=True, timeout=CLI_TIMEOUT_S)  # fmt: skip
    config = json.loads(inspected.stdout)["OCIv1"]["config"]
    subprocess.run(builder.command("from", "--pull=never", "--name", name, tag), check=True, capture_output=True,
                   timeout=CLI_TIMEOUT_S)  # fmt: skip
    env = {"LMSERVE_HOST": "127.0.0.1", "LMSERVE_PORT": str(http_port), "LMSERVE_GRPC_PORT": str(grpc_port)}
    argv = builder.command(
        "run", "--isolation=chroot", f"--user={config['User']}", "--mount=type=tmpfs,destination=/tmp",
        *[f"--env={k}={v}" for k, v in env.items()], name, "--", *config["Entrypoint"], *config.get("Cmd", []),
    )  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Container(builder, name, http_port, grpc_port, log, process)


def server_pid(root_pid: int, timeout_s: float = 10.0) -> int:
    """The lmserve process among `root_pid`'s descendants (buildah run forks its command)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pending = [root_pid]
        while pending:
            pid = pending.pop()
            cmdline = read_proc(f"/proc/{pid}/cmdline").split("\0")
            if pid != root_pid and "-m" in cmdline and SERVER_ARGV_MARK in cmdline:
                return pid
            for task in Path(f"/proc/{pid}/task").glob("*"):
                pending += [int(child) for child in read_proc(f"{task}/children").split()]
        time.sleep(0.1)
    raise RuntimeError(f"no `python -m lmserve` process below pid {root_pid}")


def read_proc(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:  # the process has ended meanwhile
        return ""
