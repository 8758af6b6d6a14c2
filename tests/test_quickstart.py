"""The README's quick start against the real server started as a user starts it (`lmserve serve` in a
subprocess, on loopback): the start-up lines, every command of the quick start with the kind of answer
the README promises, and what Ctrl-C does (the last test: it stops the server)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmserve.api.auth import KeyStore
from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.proto import lmserve_pb2_grpc as rpc
from lmserve.cli import build_parser, serve_config_from_args
from lmserve.preflight import check_files
from tests.api.conftest import metric_value
from tests.cli_process import REPO_ROOT, cli_env, free_port
from tests.doc_commands import code_blocks, fresh_clone, run_in_shell, shell_commands

README_HOST = "127.0.0.1:8000"
MODEL_IDS = {"smollm2-135m-instruct", "all-minilm-l6-v2"}
EMBEDDING_DIM = 384


@dataclass
class CliServer:
    proc: subprocess.Popen[bytes]
    port: int
    grpc_port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> list[dict]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines

    def wait_for(self, pattern: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.log():
                if re.search(pattern, line["msg"]):
                    return line
            assert self.proc.poll() is None, self.log_path.read_text()
            time.sleep(0.1)
        raise AssertionError(f"no log line matching {pattern!r}:\n{self.log_path.read_text()}")


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fresh_clone(tmp_path_factory.mktemp("clone"))


@pytest.fixture(scope="module")
def cli_server(clone: Path, smollm2_dir: Path, minilm_dir: Path, cache_dir: Path, tmp_path_factory) -> Iterator[CliServer]:
    """The quick start's first command (`make serve`) as written, in a fresh clone, in a session of its own
    (a terminal's foreground job: Ctrl-C reaches make and the server); the ports, the cache and a small KV
    pool through LMSERVE_* variables."""
    first = shell_commands(code_blocks(quick_start(), "sh")[0])[0]
    assert first == "make serve"
    port, grpc_port = free_port(), free_port()
    log_path = tmp_path_factory.mktemp("quickstart") / "server.log"
    env = cli_env({"LMSERVE_PORT": str(port), "LMSERVE_GRPC_PORT": str(grpc_port), "LMSERVE_CACHE_DIR": str(cache_dir),
                   "LMSERVE_KV_CACHE_GIB": "0.25"})
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(["bash", "-c", first], cwd=clone, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = CliServer(proc, port, grpc_port, log_path)
    try:
        server.wait_for(r"^ready in ", timeout_s=240)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_startup_says_what_it_does_then_ready_with_both_urls(cli_server: CliServer) -> None:
    lines = cli_server.log()
    progress = [line["msg"] for line in lines if line["logger"] == "lmserve.progress"]
    assert progress[0] == "starting: importing torch and transformers"
    loading = [msg for msg in progress if msg.startswith("loading ")]
    assert re.fullmatch(r"loading the weights of SmolLM2-135M-Instruct\.Q4_1-\w{12} \(\d+\.\d MiB\) as \w+", loading[0])
    assert loading[1] == "loading the embedding model all-minilm-l6-v2 (float32)"
    (ready,) = [line for line in lines if line["msg"].startswith("ready")]
    base = f"http://127.0.0.1:{cli_server.port}/v1"
    assert re.fullmatch(
        rf"ready in \d+\.\d s: smollm2-135m-instruct and all-minilm-l6-v2 on {re.escape(base)} \(OpenAI API\), "
        rf"grpc 127\.0\.0\.1:{cli_server.grpc_port} \(lmserve\.v1\); Ctrl-C to stop",
        ready["msg"],
    )
    assert (ready["http_url"], ready["grpc_target"]) == (base, f"127.0.0.1:{cli_server.grpc_port}")
    assert lines.index(ready) > max(lines.index(line) for line in lines if line["logger"] == "lmserve.progress")
    assert not any(line["msg"].startswith("serving") for line in lines)
    # One line says the safety filter is on and with which policy.
    (safety,) = [line for line in lines if line["msg"].startswith("safety filter ")]
    assert safety["msg"].startswith("safety filter on: policy the packaged default; input/output: injection block/")
    assert safety["safety_policy"] == "default" and lines.index(safety) < lines.index(ready)
    # The URLs it names answer; probes that succeed are not logged at INFO, other requests are.
    assert httpx.get(f"{cli_server.base_url}/readyz", timeout=10).status_code == 200
    assert httpx.get(f"{cli_server.base_url}/livez", timeout=10).status_code == 200
    assert httpx.get(f"{cli_server.base_url}/v1/models", timeout=10).status_code == 200
    access = cli_server.wait_for(r"^GET /v1/models 200", timeout_s=10)
    assert access["logger"] == "lmserve.access"
    assert not [line for line in cli_server.log() if line.get("path") in ("/readyz", "/livez")]
    assert "/readyz" in httpx.get(f"{cli_server.base_url}/metrics", timeout=10).text  # still counted
    with grpc.insecure_channel(f"127.0.0.1:{cli_server.grpc_port}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


# ---- the README's quick start, as written ------------------------------------------------------------------


def quick_start() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index("\n## Quick start\n")
    return text[start : text.index("\n## ", start + 1)]


def _served_ids_in_readme(section: str) -> set[str]:
    return set(re.findall(r"^\| `([\w.-]+)` \|", section, flags=re.M))


def check_answer(command: str, stdout: str) -> None:
    """The kind of answer the README promises for a curl command of the quick start."""
    url = re.search(r"http://[\d.:]+(/[\w/]+)", command).group(1)
    if url == "/v1/models":
        assert {m["id"] for m in json.loads(stdout)["data"]} == MODEL_IDS
    elif url == "/v1/chat/completions" and '"stream": true' in command:
        events = [line for line in stdout.splitlines() if line]
        assert events[-1] == "data: [DONE]" and len(events) > 2
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    elif url == "/v1/chat/completions":
        body = json.loads(stdout)
        assert body["object"] == "chat.completion" and body["model"] == "smollm2-135m-instruct"
        assert body["choices"][0]["message"]["content"] and body["usage"]["total_tokens"] > 0
    elif url == "/v1/embeddings":
        body = json.loads(stdout)
        assert body["object"] == "list" and len(body["data"]) == 2
        for item in body["data"]:
            assert item["object"] == "embedding" and len(item["embedding"]) == EMBEDDING_DIM
            assert math.isclose(math.hypot(*item["embedding"]), 1.0, rel_tol=1e-4)  # normalized, as documented
    else:
        raise AssertionError(f"the test does not know what {url} should answer: {command}")


def test_readme_quick_start_commands_run_and_answer_as_documented(cli_server: CliServer, clone: Path) -> None:
    """Every command of the quick start, in order, in the fresh clone (a shell's `source` kept for the
    commands after it); the servers it starts are the fixture's (`make serve`) or checked as far as they
    go before loading a model."""
    section = quick_start()
    assert _served_ids_in_readme(section) == MODEL_IDS
    host = f"127.0.0.1:{cli_server.port}"
    prelude: list[str] = []
    ran = []
    for block in code_blocks(section, "sh"):
        for command in shell_commands(block):
            if command.startswith("source "):
                prelude.append(command)
                ran.append(command)
                continue
            if command.startswith(("make serve", "lmserve serve")):
                # Starting the server is what the fixture did; the flags it names must parse and pass
                # pre-flight, and after the `source` the README asks for, `lmserve` is on the PATH.
                args = command.split()[command.split().index("serve") :]
                config = serve_config_from_args(build_parser({}).parse_args(args), {})
                if config.api_key_file:  # written by the block's earlier command, in its folder
                    config = replace(config, api_key_file=str(clone / config.api_key_file))
                check_files(config)
                if command.startswith("lmserve "):
                    found = run_in_shell(prelude, "command -v lmserve", clone, cli_env(), timeout_s=30)
                    assert Path(found.stdout.strip()).samefile(clone / ".venv" / "bin" / "lmserve"), found
                ran.append(command)
                continue
            assert command.startswith(("curl ", "printf ")), f"a quick-start command the test cannot run: {command}"
            assert command.count(README_HOST) <= 1
            result = run_in_shell(prelude, command.replace(README_HOST, host), clone, cli_env(), timeout_s=120)
            assert result.returncode == 0, f"{command}\n{result.stderr}"
            if command.startswith("curl "):
                check_answer(command, result.stdout)
            ran.append(command)
    assert sum(c.startswith("curl ") for c in ran) >= 5 and any(c.startswith("printf ") for c in ran)
    assert any(c.startswith("source ") for c in ran)
    # The key file the README writes has the documented format: two keys, the comment skipped.
    keys = KeyStore.from_sources((), str(clone / "keys.txt"))
    assert len(keys.digests) == 2 and keys.authenticate("Bearer sk-second-key").startswith("key-")
    # make said where lmserve is.
    assert "`source .venv/bin/activate` puts it on the PATH" in cli_server.log_path.read_text()


def test_readme_openai_snippet_runs(cli_server: CliServer, tmp_path: Path) -> None:
    (snippet,) = [b for b in code_blocks(quick_start(), "python") if "from openai import OpenAI" in b]
    assert f'base_url="http://{README_HOST}/v1"' in snippet
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace(README_HOST, f"127.0.0.1:{cli_server.port}"))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == f"2 {EMBEDDING_DIM}" and lines[0].strip()


def test_curl_without_content_type_is_read_as_json(cli_server: CliServer) -> None:
    body = '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}'
    url = f"{cli_server.base_url}/v1/chat/completions"
    plain = subprocess.run(["curl", "-s", url, "-d", body], capture_output=True, text=True, timeout=60)  # form type
    assert json.loads(plain.stdout)["object"] == "chat.completion"
    broken = subprocess.run(["curl", "-s", url, "-d", "messages=hi"], capture_output=True, text=True, timeout=60)
    error = json.loads(broken.stdout)["error"]
    assert error["code"] == "invalid_json"
    assert "content-type: application/x-www-form-urlencoded" in error["message"]
    assert "send it with content-type: application/json" in error["message"]


# ---- Ctrl-C, twice: the last test, it stops the server -----------------------------------------------------


def _engine_steps(base: str) -> float:
    return metric_value(httpx.get(f"{base}/metrics", timeout=10).text, "lmserve_engine_steps_total")


def test_ctrl_c_drains_then_a_second_stops_at_once(cli_server: CliServer) -> None:
    base = cli_server.base_url
    events: list[str] = []
    http_started = threading.Event()
    grpc_chunks: list[pb.CompletionChunk] = []
    grpc_errors: list[grpc.RpcError] = []
    grpc_started = threading.Event()

    def http_stream() -> None:
        body = {"prompt": "Count to a thousand:", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as resp:
            for line in resp.iter_lines():
                if line:
                    events.append(line)
                    http_started.set()

    def grpc_stream() -> None:
        request = pb.CompletionRequest(prompt="Count to a thousand:", max_tokens=1500, ignore_eos=True)
        with grpc.insecure_channel(f"127.0.0.1:{cli_server.grpc_port}") as channel:
            try:
                for chunk in rpc.GenerationStub(channel).CompleteStream(request, timeout=120):
                    grpc_chunks.append(chunk)
                    grpc_started.set()
            except grpc.RpcError as error:
                grpc_errors.append(error)

    readers = [threading.Thread(target=http_stream), threading.Thread(target=grpc_stream)]
    for reader in readers:
        reader.start()
    assert http_started.wait(120) and grpc_started.wait(120)

    os.killpg(cli_server.proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: make and the server get it
    first = cli_server.wait_for(r"^draining ", timeout_s=5)
    assert first["msg"] == "draining 2 requests (up to 30 s); Ctrl-C again to stop now"
    refused = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=10)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "service_unavailable"
    assert httpx.get(f"{base}/readyz", timeout=10).status_code == 503
    # Still generating: draining, not stopping. The engine's step counter shows it (a stream's next text
    # may wait on the safety filter's word hold or a busy machine).
    steps = _engine_steps(base)
    deadline = time.monotonic() + 10
    while _engine_steps(base) == steps and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _engine_steps(base) > steps and cli_server.proc.poll() is None

    os.killpg(cli_server.proc.pid, signal.SIGINT)
    stopped_at = time.monotonic()
    code = cli_server.proc.wait(timeout=30)  # make: it waits for the server, then ends as Ctrl-C'd
    took = time.monotonic() - stopped_at
    for reader in readers:
        reader.join(30)
    assert code == -signal.SIGINT and "Traceback" not in cli_server.log_path.read_text()
    assert took < 3.0, f"a second Ctrl-C took {took:.1f} s to stop the server"
    assert any(line["msg"] == "stopping now: ending 2 open requests" for line in cli_server.log())

    # The HTTP stream ended early with an error event, then [DONE].
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["error"]["code"] == "service_unavailable" and "shutting down" in last["error"]["message"]
    texts = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(t["choices"][0]["finish_reason"] is None for t in texts) and len(texts) < 1500
    # The gRPC stream ended with UNAVAILABLE.
    (error,) = grpc_errors
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in error.details()
