"""What the transports share, built once by the composition root (app.py) and passed down.

Below app.py and api/, so that nothing imports back up into the composition root.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmserve.api.auth import KeyStore
    from lmserve.api.limits import AdmissionControl, RateLimiter
    from lmserve.api.response_store import ResponseStore
    from lmserve.config import ServeConfig
    from lmserve.embeddings.embedder import Embedder
    from lmserve.embeddings.reranker import Reranker
    from lmserve.engine.base import GenerationEngine
    from lmserve.metrics import Metrics
    from lmserve.safety import SafetyFilter
    from lmserve.tokenizer import Tokenizer
    from lmserve.tracing import RequestTracer


@dataclass
class Lifecycle:
    """Mutable serving state shared by the transports: draining flag and requests in flight."""

    draining: bool = False
    in_flight: int = 0
    models_stopping: bool = False  # stop_models began: the engine ending now is no failure
    engine_failed: bool = False  # the engine died under the server: it exits non-zero to be restarted


@dataclass
class ServedModel:
    name: str  # the id clients send as `model`
    aliases: frozenset[str]  # name plus the checkpoint reference it was loaded from
    created: int
    lora: str | None = None  # a LoRA adapter served on the generation model: its name (then `parent` is the base's)
    parent: str | None = None
    root: str | None = None  # where it was loaded from, as /v1/models shows it (an adapter's folder)

    def matches(self, model: str | None) -> bool:
        return model is None or model in self.aliases


@dataclass
class AppState:
    """Everything a transport needs; built once by `app.build_state`."""

    config: ServeConfig
    engine: GenerationEngine
    tokenizer: Tokenizer
    generation_model: ServedModel
    embedder: Embedder | None
    embedding_model: ServedModel | None
    keys: KeyStore
    limiter: RateLimiter
    admission: AdmissionControl
    metrics: Metrics
    tracer: RequestTracer | None = None  # None: tracing off (no OTLP endpoint)
    safety: SafetyFilter | None = None  # None: --no-safety
    reranker: Reranker | None = None  # the cross-encoder of /v1/rerank and /v1/score; None: --rerank-model unset
    rerank_model: ServedModel | None = None
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    responses: ResponseStore | None = None  # the Responses API's store; app.state_from_models builds it


def readiness(state: AppState) -> str | None:
    """None when ready to take work, else why not (the same answer for /readyz and gRPC health)."""
    if state.lifecycle.draining:
        return "draining"
    if not state.engine.stats().is_alive:
        return "the generation engine is not running"
    if state.embedder is not None and not state.embedder.is_running:
        return "the embedding model is not running"
    if state.reranker is not None and not state.reranker.is_running:
        return "the rerank model is not running"
    return None


__all__ = ["AppState", "Lifecycle", "ServedModel", "readiness"]
