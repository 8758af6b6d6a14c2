"""The real server, on loopback, for the API tests.

One background thread runs one asyncio loop that owns the real engine (SmolLM2-135M-Instruct, float32)
and the real embedder (all-MiniLM-L6-v2), loaded once per session, and serves several uvicorn servers
over them, each with its own keys and limits:

- `server`:  the main one (two API keys, generous limits, small caps so tests stay fast);
- `limited`: requests/min = 3, tokens/min = 600 and max_queue = 1 (per key / per server), for 429 and 503;
- `fuzz`:    tiny max_tokens and n caps, for the schemathesis run; also CORS and open /metrics.

Each of them also serves gRPC (lmserve.v1) on a port of its own over the same state, as `lmserve serve`
does: one budget of keys, limits and queue across both transports.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmserve.api.grpc.server import GrpcServer
from lmserve.app import (
    AppState,
    DrainingServer,
    build_state,
    make_server,
    start_grpc_server,
    start_models,
    stop_models,
    with_config,
)
from lmserve.config import EngineConfig, LimitsConfig, ServeConfig

API_KEY = "test-key-main"
OTHER_KEY = "test-key-other"
LIMITED_KEY = "test-key-limited"
OVERLOAD_KEY = "test-key-overload"
HEADERS_KEY = "test-key-headers"
GRPC_RATE_KEY = "test-key-grpc-rate"
GRPC_QUEUE_KEY = "test-key-grpc-queue"
GUARDED_KEY = "test-key-guarded"
NAMED_KEY = "test-key-named"
SERVED_NAMES = ("my-assistant", "gpt-4o-mini")  # --served-model-name on the "named" server
SERVED_EMBEDDING_NAMES = ("my-embedder",)
# The default policy, but for an output block list: the bundled model answers "The capital of France is"
# with " Paris." (greedy, float32), which this policy must stop before any of it leaves.
GUARDED_POLICY = """
version: 1
categories:
  injection: {input: block, output: off, threshold: 0.5}
  secrets: {input: block, output: redact, threshold: 0.5}
  pii: {input: flag, output: redact, threshold: 0.5}
  toxicity: {input: flag, output: block, threshold: 0.9}
  unicode: {input: strip, output: strip, threshold: 0.5}
  blocklist: {input: block, output: block, threshold: 0.5, terms: [Paris], patterns: []}
"""
FUZZ_KEY = "test-key-fuzz"

MAX_MODEL_LEN = 512
MAX_BODY_BYTES = 64 * 1024
EMBEDDING_BATCH_TOKENS = 1024
LIMITS = LimitsConfig(
    max_request_body_bytes=MAX_BODY_BYTES,
    max_n=4,
    max_tokens_cap=256,
    max_stop_strings=4,
    max_prompts=8,
    max_queue=32,
    max_embedding_inputs=16,
    max_grammar_bytes=16 * 1024,
    # Below what max_embedding_inputs inputs can hold (16 x 512 tokens), so a large request must be split
    # over several embedding batches (test_embedding_split.py).
    embedding_max_batch_tokens=EMBEDDING_BATCH_TOKENS,
)
LIMITED_RPM = 3
LIMITED_TPM = 600


@dataclass(frozen=True)
class LiveServer:
    name: str
    port: int
    state: AppState
    api_key: str | None
    grpc_port: int = 0
    loop: asyncio.AbstractEventLoop | None = None  # the loop the server, its engine and gRPC run on

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def grpc_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class Servers:
    main: LiveServer
    limited: LiveServer
    fuzz: LiveServer
    guarded: LiveServer  # the safety filter under GUARDED_POLICY, which blocks "Paris" in output
    named: LiveServer  # the models under SERVED_NAMES and SERVED_EMBEDDING_NAMES


def _bind() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """Runs `start_models` + several DrainingServers on one loop in a daemon thread."""

    def __init__(self, base: AppState, states: dict[str, AppState]) -> None:
        self.base = base
        self.states = states
        self.sockets = {name: _bind() for name in states}
        self.servers: dict[str, DrainingServer] = {}
        self.grpc: dict[str, GrpcServer] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="api-test-server", daemon=True)

    def port(self, name: str) -> int:
        return self.sockets[name].getsockname()[1]

    def grpc_port(self, name: str) -> int:
        return self.grpc[name].port

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by wait_started
            self.error = exc

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        await start_models(self.base)
        # States over the base's engine may each have an embedding model of their own.
        others = [s.embedder for s in self.states.values() if s.embedder not in (None, self.base.embedder)]
        for embedder in others:
            await embedder.start()
        try:
            for name, state in self.states.items():
                self.grpc[name] = await start_grpc_server(state, host="127.0.0.1", port=0)
            self.servers = {name: make_server(state, host="127.0.0.1", port=0) for name, state in self.states.items()}
            await asyncio.gather(*(srv.serve(sockets=[self.sockets[n]]) for n, srv in self.servers.items()))
        finally:
            for grpc_server in self.grpc.values():
                await grpc_server.stop(0)
            for embedder in others:
                await embedder.stop()
            await stop_models(self.base)

    def start(self, timeout_s: float = 120.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.error is not None:
                raise RuntimeError("test server failed to start") from self.error
            if self.servers and all(s.started for s in self.servers.values()):
                return
            time.sleep(0.05)
        raise TimeoutError("test server did not start")

    def stop(self) -> None:
        if self.loop is not None:
            for srv in self.servers.values():
                self.loop.call_soon_threadsafe(setattr, srv, "should_exit", True)
        self._thread.join(timeout=30)


@pytest.fixture(scope="session")
def serve_config(cache_dir: Path) -> ServeConfig:
    return ServeConfig(
        model="smollm2-135m-instruct",
        embedding_model="all-minilm-l6-v2",
        cache_dir=cache_dir,
        api_keys=(API_KEY, OTHER_KEY),
        drain_timeout_s=5.0,
        engine=EngineConfig(dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN, num_kv_blocks=256),
        limits=LIMITS,
    )


@pytest.fixture(scope="session")
def servers(
    serve_config: ServeConfig, smollm2_dir: Path, minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Servers]:
    from lmserve.safety import SafetyFilter

    base = build_state(serve_config)
    limited = with_config(
        base,
        replace(
            serve_config,
            api_keys=(LIMITED_KEY, OVERLOAD_KEY, HEADERS_KEY, GRPC_RATE_KEY, GRPC_QUEUE_KEY),
            limits=replace(LIMITS, requests_per_minute=LIMITED_RPM, tokens_per_minute=LIMITED_TPM, max_queue=1),
        ),
    )
    fuzz = with_config(
        base,
        replace(
            serve_config,
            api_keys=(FUZZ_KEY,),
            cors_origins=("http://allowed.test",),
            metrics_open=True,
            limits=replace(LIMITS, max_tokens_cap=4, max_n=2, max_prompts=2, max_stop_strings=2, max_embedding_inputs=4),
        ),
    )
    guarded = with_config(base, replace(serve_config, api_keys=(GUARDED_KEY,)))
    policy = tmp_path_factory.mktemp("policy") / "guarded.yaml"
    policy.write_text(GUARDED_POLICY)
    guarded.safety = SafetyFilter.from_policy(policy)
    named = with_config(
        base,
        replace(
            serve_config,
            api_keys=(NAMED_KEY,),
            served_model_names=SERVED_NAMES,
            served_embedding_model_names=SERVED_EMBEDDING_NAMES,
        ),
    )
    thread = ServerThread(base, {"main": base, "limited": limited, "fuzz": fuzz, "guarded": guarded, "named": named})
    thread.start()
    try:
        yield Servers(
            main=LiveServer("main", thread.port("main"), base, API_KEY, thread.grpc_port("main"), thread.loop),
            limited=LiveServer("limited", thread.port("limited"), limited, LIMITED_KEY, thread.grpc_port("limited"), thread.loop),
            fuzz=LiveServer("fuzz", thread.port("fuzz"), fuzz, FUZZ_KEY, thread.grpc_port("fuzz"), thread.loop),
            guarded=LiveServer(
                "guarded", thread.port("guarded"), guarded, GUARDED_KEY, thread.grpc_port("guarded"), thread.loop
            ),
            named=LiveServer("named", thread.port("named"), named, NAMED_KEY, thread.grpc_port("named"), thread.loop),
        )
    finally:
        thread.stop()


@pytest.fixture(scope="session")
def server(servers: Servers) -> LiveServer:
    return servers.main


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60.0) as client:
        yield client


@pytest.fixture
def openai_client(server: LiveServer):
    import openai

    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0, timeout=60.0)
    yield client
    client.close()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample in Prometheus text (0.0 when absent)."""
    want = labels or {}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_str = head.partition("{")
        if metric != name:
            continue
        got = dict(
            part.split("=", 1) for part in label_str.rstrip("}").split(",") if "=" in part
        )
        got = {k: v.strip('"') for k, v in got.items()}
        if all(got.get(k) == v for k, v in want.items()):
            return float(value)
    return 0.0


TEMPLATE_MODEL = "m"


@contextmanager
def served(config: ServeConfig, api_key: str | None = None, name: str = "main") -> Iterator[LiveServer]:
    """`config` loaded and served (HTTP and gRPC on loopback) in a background thread, stopped afterwards."""
    state = build_state(config)
    thread = ServerThread(state, {name: state})
    thread.start()
    try:
        yield LiveServer(name, thread.port(name), state, api_key, thread.grpc_port(name), thread.loop)
    finally:
        thread.stop()


@contextmanager
def template_server(
    model_dir: Path, template: Path, dest: Path, cache_dir: Path, renamed_specials: dict[str, str] | None = None, **config: Any
) -> Iterator[LiveServer]:
    """A tiny model (`model_dir`, copied to `dest`) with `template`'s text as its chat template, served on
    its own loop over HTTP and gRPC (no key, no safety filter, served as TEMPLATE_MODEL) with ServeConfig
    fields `config`: a checkpoint that ships another family's chat template (tests/data/chat_templates).
    `renamed_specials` renames special tokens of its tokenizer (old text -> new), same ids: a family's own
    special tokens (Mistral's [TOOL_CALLS]) without growing the vocabulary."""
    shutil.copytree(model_dir, dest)
    tokenizer_json = dest / "tokenizer.json"
    spec = json.loads(tokenizer_json.read_text())
    for old, new in (renamed_specials or {}).items():
        [added] = [t for t in spec["added_tokens"] if t["content"] == old and t["special"]]
        added["content"] = new
        spec["model"]["vocab"][new] = spec["model"]["vocab"].pop(old)
    tokenizer_json.write_text(json.dumps(spec))
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = dest / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    settings["chat_template"] = template.read_text()
    tokenizer_config.write_text(json.dumps(settings))
    serve = ServeConfig(
        model=str(dest), embedding_model=None, served_model_names=(TEMPLATE_MODEL,), cache_dir=cache_dir, safety=False,
        drain_timeout_s=5.0,
        engine=EngineConfig(dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN, num_kv_blocks=64), limits=LIMITS,
        **config,
    )  # fmt: skip
    with served(serve) as server:
        yield server
