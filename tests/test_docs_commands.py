"""docs/serve-your-model.md run as written from a fresh clone: every shell command in order, the server it
starts in the background (as its "second terminal" implies), and the answers the page promises."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from tests.cli_process import REPO_ROOT, cli_env, free_port, wait_ready
from tests.doc_commands import (
    code_blocks, fresh_clone, is_server, localize, ports_named, run_in_shell, shell_commands,
)

PAGE = REPO_ROOT / "docs" / "serve-your-model.md"


def test_serve_your_model_page_runs_as_written(smollm2_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    text = PAGE.read_text()
    clone = fresh_clone(tmp_path / "clone")
    ports = {port: free_port() for port in ports_named(text)}
    env = cli_env({"LMSERVE_CACHE_DIR": str(cache_dir), "LMSERVE_KV_CACHE_GIB": "0.25"})
    prelude: list[str] = []  # what a shell keeps: `source`
    outputs: list[tuple[str, str]] = []  # (command, stdout)
    server: subprocess.Popen[bytes] | None = None
    log = tmp_path / "server.log"
    try:
        for command in (c for block in code_blocks(text, "sh") for c in shell_commands(block)):
            command = localize(command, ports)
            if command.startswith("source "):
                prelude.append(command)
                continue
            if is_server(command):
                # In the background, as the README says to run it there (a background job starts with
                # SIGINT ignored; `kill -INT $!` must still drain and stop it); the shell waits for it and
                # exits with its status.
                script = "; ".join([*prelude, f"{command} & echo $! > server.pid", "wait $!"])
                assert server is None, "the page starts one server"
                with open(log, "wb") as out:
                    server = subprocess.Popen(["bash", "-c", script], cwd=clone, env=env, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True)
                port = int(command.split("--port ")[1].split()[0])
                wait_ready(server, f"http://127.0.0.1:{port}", log, timeout_s=240)
                continue
            result = run_in_shell(prelude, command, clone, env, timeout_s=300)
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
            outputs.append((command, result.stdout))
        assert server is not None
        # The answers the page promises.
        assert (clone / "my-model" / "config.json").is_file()
        (generated,) = [out for cmd, out in outputs if cmd.startswith("lmserve generate")]
        assert "Paris" in generated
        (models, chat) = [json.loads(out) for cmd, out in outputs if cmd.startswith("curl ")]
        assert [m["id"] for m in models["data"]] == ["my-assistant"]
        assert chat["model"] == "my-assistant" and chat["choices"][0]["message"]["content"]
        os.kill(int((clone / "server.pid").read_text()), signal.SIGINT)  # `kill -INT $!`: drains, exits 0
        assert server.wait(timeout=60) == 0, log.read_text()
        assert "shutting down: no requests in flight" in log.read_text()
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
