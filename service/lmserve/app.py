"""Composition root: resolve and load the models, build keys/limits/metrics, serve, drain on SIGTERM.

    state = build_state(config)   # slow: loads weights (blocking, before any event loop work)
    run(config)                   # preflight + build_state + serve until SIGTERM/SIGINT, then drain and exit 0

Start-up: preflight (key and TLS files, ports; before anything slow), then the models load with one
progress line per slow step (service/lmserve/progress.py), then one "ready" line with the URLs once HTTP and
gRPC listen.

Drain: the first SIGTERM (or SIGINT) turns /readyz into 503 "draining" while requests keep being
served; once no request is in flight (or `drain_timeout_s` has passed) the server stops accepting
connections, lets uvicorn close the idle ones, stops the engine and the embedder, and the process
exits. A second signal stops the models at once, which ends open streams with an error event; a third
forces exit.

Engine failure: when the generation engine dies under the server (a failed model forward), every open
stream has already ended with an error, /readyz and gRPC health say not ready and new generation work
gets 503/UNAVAILABLE; the server then stops accepting connections, gives the open ones DRAIN_GRACE_S to
take their last event, and `serve` raises EngineFailed, so `lmserve serve` exits 1 and Kubernetes (or any
supervisor) restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from lmserve.api.auth import KeyStore
from lmserve.api.limits import AdmissionControl, RateLimiter
from lmserve.api.response_store import ResponseStore
from lmserve.config import ServeConfig
from lmserve.logs import configure_logging
from lmserve.metrics import Metrics
from lmserve.preflight import PortReservation, PreflightError, preflight
from lmserve.progress import progress_step
from lmserve.state import AppState, Lifecycle, ServedModel
from lmserve.tracing import build_tracer

if TYPE_CHECKING:
    from lmserve.api.grpc.server import GrpcServer, GrpcTLS
    from lmserve.embeddings.embedder import Embedder
    from lmserve.embeddings.reranker import Reranker
    from lmserve.engine.base import GenerationEngine
    from lmserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DRAIN_GRACE_S = 2  # after the drain: how long uvicorn lets the connections still open finish
ENGINE_WATCH_S = 0.1  # how often serve() checks that the engine is still alive


class EngineFailed(RuntimeError):
    """The generation engine died while serving; the process should exit non-zero and be restarted."""


def _served(name: str, ref: str, served_names: tuple[str, ...]) -> ServedModel:
    """The model as clients name it: by its own name and the reference it was loaded from, or by its
    served names when given (as vLLM: then by those alone)."""
    return _renamed(ServedModel(name=name, aliases=frozenset({name, ref}), created=int(time.time())), served_names)


def _renamed(model: ServedModel, served_names: tuple[str, ...]) -> ServedModel:
    if not served_names:
        return model
    return ServedModel(name=served_names[0], aliases=frozenset(served_names), created=model.created)


def build_state(config: ServeConfig) -> AppState:
    """Resolve and load the generation (and embedding) model; build keys, limits and metrics."""
    from lmserve.checkpoints import resolve_model

    with progress_step("starting: importing torch and transformers"):  # seconds, before any other line could come
        import torch  # noqa: F401
        import transformers  # noqa: F401

    resolved = resolve_model(config.model, config.cache_dir, allow_pickle=config.engine.allow_pickle)
    engine = _load_engine(config, resolved.path, resolved.name)
    tokenizer = engine.tokenizer  # type: ignore[attr-defined]
    embedder = None
    embedding_model = None
    if config.embedding_model:
        from lmserve.embeddings.embedder import Embedder

        emb_resolved = resolve_model(config.embedding_model, config.cache_dir, allow_pickle=config.engine.allow_pickle)
        embedder = Embedder.load(
            emb_resolved.path,
            emb_resolved.name,
            dtype="auto",
            device=config.engine.device,
            max_batch_tokens=config.limits.embedding_max_batch_tokens,
        )
        embedding_model = _served(emb_resolved.name, config.embedding_model, config.served_embedding_model_names)
    generation_model = _served(resolved.name, config.model, config.served_model_names)
    reranker, rerank_model = _load_reranker(config) if config.rerank_model else (None, None)
    state = state_from_models(
        config, engine, tokenizer, generation_model, embedder, embedding_model, reranker, rerank_model
    )
    if config.safety:
        from lmserve.safety import SafetyFilter

        state.safety = SafetyFilter.from_policy(config.safety_policy)
        policy = state.safety.policy
        log.info("safety filter on: %s", policy.summary(), extra={"safety_policy": policy.source})
    else:
        log.warning("safety filter off (--no-safety): prompts and outputs are not checked")
    # Per-step and per-batch histograms come from hooks on the models' threads, one subscriber each:
    # states made later by with_config share the models but not these histograms.
    engine.on_step = state.metrics.observe_step
    if embedder is not None:
        embedder.on_batch = state.metrics.observe_embedding_batch
    if reranker is not None:
        reranker.on_batch = state.metrics.observe_rerank_batch
    return state


def _load_reranker(config: ServeConfig) -> tuple[Reranker, ServedModel]:
    from lmserve.checkpoints import resolve_model
    from lmserve.embeddings.reranker import Reranker

    assert config.rerank_model is not None
    resolved = resolve_model(config.rerank_model, config.cache_dir, allow_pickle=config.engine.allow_pickle)
    reranker = Reranker.load(
        resolved.path, resolved.name, dtype="auto", device=config.engine.device,
        max_batch_tokens=config.limits.embedding_max_batch_tokens,
    )  # fmt: skip
    return reranker, _served(resolved.name, config.rerank_model, ())


def _load_engine(config: ServeConfig, path: Any, name: str) -> GenerationEngine:
    if config.engine_kind == "native":
        from lmserve.engine.engine import NativeEngine

        return NativeEngine.load(path, name, config.engine)
    if config.engine_kind == "vllm":
        from lmserve.engine.vllm_backend import VLLMEngine  # imports vLLM itself only in load()

        return VLLMEngine.load(path, name, config.engine, config.vllm)
    raise ValueError(f"unknown engine kind {config.engine_kind!r} (native | vllm)")


def state_from_models(
    config: ServeConfig,
    engine: GenerationEngine,
    tokenizer: Tokenizer,
    generation_model: ServedModel,
    embedder: Embedder | None,
    embedding_model: ServedModel | None,
    reranker: Reranker | None = None,
    rerank_model: ServedModel | None = None,
) -> AppState:
    """The non-model parts of the state, from `config`."""
    keys = KeyStore.from_sources(config.api_keys, config.api_key_file)
    if not keys.is_enabled:
        log.warning("no API keys configured: every endpoint is open (set --api-key-file or LMSERVE_API_KEYS)")
    return AppState(
        config=config,
        engine=engine,
        tokenizer=tokenizer,
        generation_model=generation_model,
        embedder=embedder,
        embedding_model=embedding_model,
        keys=keys,
        limiter=RateLimiter(config.limits.requests_per_minute, config.limits.tokens_per_minute),
        admission=AdmissionControl(config.limits.max_queue),
        metrics=Metrics(
            generation_model.name,
            embedding_model.name if embedding_model is not None else "",
            rerank_model=rerank_model.name if rerank_model is not None else "",
        ),
        tracer=build_tracer(config.otlp_endpoint),
        responses=ResponseStore(config.limits.responses_store_max_responses, config.limits.responses_store_max_bytes),
        reranker=reranker,
        rerank_model=rerank_model,
    )


def with_config(state: AppState, config: ServeConfig) -> AppState:
    """A second state over the same loaded models with other keys/limits (several apps, one engine)."""
    embedding = state.embedding_model
    other = state_from_models(
        config,
        state.engine,
        state.tokenizer,
        _renamed(state.generation_model, config.served_model_names),
        state.embedder,
        _renamed(embedding, config.served_embedding_model_names) if embedding is not None else None,
        state.reranker,
        state.rerank_model,
    )
    other.safety = state.safety if config.safety else None
    return other


async def start_models(state: AppState) -> None:
    await state.engine.start()
    if state.embedder is not None:
        await state.embedder.start()
    if state.reranker is not None:
        await state.reranker.start()


async def stop_models(state: AppState) -> None:
    state.lifecycle.models_stopping = True
    if state.embedder is not None:
        await state.embedder.stop()
    if state.reranker is not None:
        await state.reranker.stop()
    await state.engine.stop()


def _requests(count: int, adjective: str = "") -> str:
    return f"{count} {adjective}request{'' if count == 1 else 's'}"


def begin_drain(state: AppState) -> None:
    """The first SIGINT/SIGTERM: readiness turns 503 and new work is refused; in-flight work finishes."""
    state.lifecycle.draining = True
    num_in_flight = state.lifecycle.in_flight
    if num_in_flight:
        log.info(
            "draining %s (up to %.0f s); Ctrl-C again to stop now",
            _requests(num_in_flight),
            state.config.drain_timeout_s,
            extra={"in_flight": num_in_flight, "drain_timeout_s": state.config.drain_timeout_s},
        )
    else:
        log.info("shutting down: no requests in flight")


async def stop_now(state: AppState) -> None:
    """The second signal: stop the models, which ends every open stream with an error event (HTTP) or
    UNAVAILABLE (gRPC) at once."""
    log.info("stopping now: ending %s", _requests(state.lifecycle.in_flight, "open "))
    await stop_models(state)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains, whose second stops at once, and which says when it
    is ready.

    First SIGINT/SIGTERM: begin_drain; once nothing is in flight (or drain_timeout_s has passed) the server
    stops accepting connections, closes the idle ones and returns. Second: stop_now, and open connections
    get DRAIN_GRACE_S to take their last event. Third: uvicorn's force exit.
    """

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.state = state
        self.on_started: Callable[[], None] | None = None  # called once the sockets listen
        self.stopping_now: asyncio.Task[None] | None = None
        self._num_signals = 0
        self._drain_started: float | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in a signal handler: only set flags; on_tick does the work. Not recording the signal in
        # _captured_signals keeps uvicorn from re-raising it after shutdown, so we exit 0 after a drain.
        self._num_signals += 1
        if self._num_signals == 2:
            self.should_exit = True
        elif self._num_signals > 2:
            self.should_exit = True
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._num_signals and self._drain_started is None:
            self._drain_started = time.monotonic()
            begin_drain(self.state)
        if self._num_signals >= 2 and self.stopping_now is None:
            self.stopping_now = asyncio.ensure_future(stop_now(self.state))
        if self._drain_started is not None and not self.should_exit:
            waited = time.monotonic() - self._drain_started
            if self.state.lifecycle.in_flight == 0 or waited >= self.state.config.drain_timeout_s:
                log.info("drained after %.1f s (%d still in flight)", waited, self.state.lifecycle.in_flight)
                self.should_exit = True
        return await super().on_tick(counter)


HTTP_KEEP_ALIVE_S = 75  # longer than clients' and load balancers' idle timeouts (see make_server)


def make_server(state: AppState, host: str | None = None, port: int | None = None) -> DrainingServer:
    from lmserve.api.http.app import create_app

    uv_config = uvicorn.Config(
        create_app(state),
        host=host or state.config.host,
        port=state.config.port if port is None else port,
        log_config=None,  # uvicorn's loggers propagate to the root handler configure_logging installed
        access_log=False,  # the access line is ours (AccountingMiddleware): request id, tokens, latency
        # The drain (on_tick) already waited for in-flight requests; what is left after it gets a short grace.
        timeout_graceful_shutdown=DRAIN_GRACE_S,
        # An idle keep-alive connection must be closed by the client, never by us: uvicorn's 5 s default
        # equals httpx's (and so the openai SDK's) idle expiry, and a request sent on a connection the
        # server is closing at that moment fails with "connection reset". Load balancers idle out at 60 s.
        timeout_keep_alive=HTTP_KEEP_ALIVE_S,
        lifespan="off",  # models are started by serve(), outside the app, so several apps can share them
    )
    return DrainingServer(uv_config, state)


def grpc_tls(config: ServeConfig) -> GrpcTLS | None:
    from lmserve.api.grpc.server import GrpcTLS

    if config.grpc_tls_cert is None:
        return None
    assert config.grpc_tls_key is not None  # the config layer requires both
    return GrpcTLS(config.grpc_tls_cert, config.grpc_tls_key, config.grpc_tls_client_ca)


async def start_grpc_server(state: AppState, host: str | None = None, port: int | None = None) -> GrpcServer:
    from lmserve.api.grpc.server import start_grpc

    return await start_grpc(
        state, host or state.config.host, state.config.grpc_port if port is None else port, grpc_tls(state.config)
    )


async def watch_engine(state: AppState, on_failure: Callable[[], None]) -> None:
    """Return once the engine has died on its own (not stopped by stop_models), after marking the failure
    and calling `on_failure` (which ends the serving)."""
    while state.engine.stats().is_alive:
        await asyncio.sleep(ENGINE_WATCH_S)
    if state.lifecycle.models_stopping:
        return
    state.lifecycle.engine_failed = True
    fault = getattr(state.engine, "fault", None)
    log.critical(
        "the generation engine failed (%s); open requests got an error, new ones get 503; exiting so that "
        "the process is restarted",
        fault or "its loop stopped",
    )
    on_failure()


async def drain_without_http(state: AppState) -> None:
    """With HTTP off, the signals uvicorn would handle: the first SIGTERM/SIGINT drains (gRPC health turns
    NOT_SERVING, new work gets UNAVAILABLE) until nothing is in flight or the drain timeout passes; a
    second one stops at once."""
    loop = asyncio.get_running_loop()
    signals = asyncio.Queue[int]()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    try:
        await signals.get()
        begin_drain(state)
        deadline = time.monotonic() + state.config.drain_timeout_s
        while state.lifecycle.in_flight and time.monotonic() < deadline and signals.empty():
            await asyncio.sleep(0.05)
        if not signals.empty():
            await stop_now(state)
        log.info("drained (%d still in flight)", state.lifecycle.in_flight)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


@dataclass(frozen=True)
class ReadyLine:
    """The one line that says the server is up, and where."""

    http_url: str | None  # the OpenAI base URL, http://host:port/v1
    grpc_target: str | None  # host:port
    models: tuple[str, ...]

    def message(self, elapsed_s: float | None) -> str:
        where = ([f"{self.http_url} (OpenAI API)"] if self.http_url else []) + (
            [f"grpc {self.grpc_target} (lmserve.v1)"] if self.grpc_target else []
        )
        took = f" in {elapsed_s:.1f} s" if elapsed_s is not None else ""
        return f"ready{took}: {' and '.join(self.models)} on {', '.join(where)}; Ctrl-C to stop"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def log_ready(state: AppState, http_port: int | None, grpc_port: int | None, tls: bool, started: float | None) -> None:
    host = _url_host(state.config.host)
    models = [state.generation_model.name] + ([state.embedding_model.name] if state.embedding_model else [])
    models += [state.rerank_model.name] if state.rerank_model else []
    line = ReadyLine(
        http_url=f"http://{host}:{http_port}/v1" if http_port else None,
        grpc_target=f"{host}:{grpc_port}{' (TLS)' if tls else ''}" if grpc_port else None,
        models=tuple(models),
    )
    elapsed = time.monotonic() - started if started is not None else None
    log.info(line.message(elapsed), extra={"http_url": line.http_url, "grpc_target": line.grpc_target})


async def serve(state: AppState, ports: PortReservation | None = None, started: float | None = None) -> None:
    """Start the models, serve HTTP and gRPC until drained, stop the models.

    `ports`: what preflight reserved (HTTP serves on its sockets; without it uvicorn binds by address).
    `started`: when start-up began (time.monotonic()), for the ready line.
    """
    await start_models(state)
    grpc_server = None
    server = None
    watcher: asyncio.Task[None] | None = None
    try:
        if ports is not None:
            ports.release_grpc()  # grpc binds by address: free the port just before it does
        if state.config.grpc_port:
            try:
                grpc_server = await start_grpc_server(state)
            except OSError as exc:  # taken in the instant between the pre-flight's release and grpc's bind
                raise PreflightError(f"gRPC (--grpc-port) port {state.config.grpc_port}: {exc}") from None
        grpc_port = grpc_server.port if grpc_server is not None else None
        tls = grpc_tls(state.config) is not None
        if state.config.port:
            server = make_server(state)
            sockets = ports.http_sockets if ports is not None and ports.http_sockets else None
            http_port = sockets[0].getsockname()[1] if sockets else state.config.port
            server.on_started = lambda: log_ready(state, http_port, grpc_port, tls, started)
            http_server = server
            watcher = asyncio.create_task(watch_engine(state, lambda: setattr(http_server, "should_exit", True)))
            await server.serve(sockets=sockets)
        else:
            log_ready(state, None, grpc_port, tls, started)
            drain = asyncio.create_task(drain_without_http(state))
            watcher = asyncio.create_task(watch_engine(state, drain.cancel))
            await asyncio.gather(drain, return_exceptions=True)  # cancelled by the watcher on engine failure
    finally:
        if watcher is not None:
            watcher.cancel()
        if server is not None and server.stopping_now is not None:
            await server.stopping_now
        if grpc_server is not None:
            # In-flight RPCs have finished by now (or the drain timed out): a short grace for stragglers.
            await grpc_server.stop(1.0)
        await stop_models(state)
        if state.tracer is not None:
            state.tracer.shutdown()
    if state.lifecycle.engine_failed:
        raise EngineFailed(f"the generation engine failed: {getattr(state.engine, 'fault', None) or 'its loop stopped'}")


def run(config: ServeConfig) -> None:
    """The `lmserve serve` entry point. Raises PreflightError (before anything slow) for a bad key or TLS
    file, a port in use, or no transport at all."""
    started = time.monotonic()
    ports = preflight(config)
    try:
        configure_logging(config.log_format, config.log_level)
        state = build_state(config)
        asyncio.run(serve(state, ports, started))
        log.info("stopped")
    finally:
        ports.close()


__all__ = [
    "AppState",
    "DrainingServer",
    "EngineFailed",
    "Lifecycle",
    "ServedModel",
    "build_state",
    "run",
    "serve",
    "start_grpc_server",
    "with_config",
]
