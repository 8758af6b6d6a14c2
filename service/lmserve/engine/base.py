"""The one async interface every generation engine offers (native engine, vLLM backend).

Usage from a transport:

    engine.check_request(req)               # capacity and constraints: RequestRejected before anything is queued
    async for delta in engine.generate(req, checked=True):  # deltas until one has finish_reason set
        ...
    # Leaving the loop early (break, exception, client disconnect -> aclose()) aborts the request
    # and frees its KV blocks at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from lmserve.types import FinishReason, GenerationDelta, GenerationRequest


class RejectReason(str, Enum):
    """Why an engine cannot serve a request, in the engine's terms; the API layer (api/plan.py `rejection_error`)
    maps each to an error code and to the parameter the client sent."""

    PROMPT_TOO_LONG = "prompt_too_long"  # the prompt alone leaves no room for one output token
    OUTPUT_TOO_LONG = "output_too_long"  # the prompt fits, but not with max_tokens more
    INVALID_CONSTRAINT = "invalid_constraint"  # the structured-output constraint does not compile
    UNSUPPORTED_VALUE = "unsupported_value"  # a sampling value this engine would change; `field` names it
    UNKNOWN_ADAPTER = "unknown_adapter"  # no LoRA adapter of the request's name is loaded (unloaded meanwhile)


class RequestRejected(ValueError):
    """A request the engine can never serve: too long for its context or KV pool, a constraint it cannot
    compile, a value it would not honour. The message is the engine's own account of it.

    `field` names the SamplingParams field at fault, where one is; `max_seq_len` (for the two length
    reasons) is the most tokens, prompt and output together, one sequence may hold in this engine.
    """

    def __init__(
        self, message: str, reason: RejectReason, field: str | None = None, max_seq_len: int | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.field = field
        self.max_seq_len = max_seq_len


class LoraAdapterError(ValueError):
    """A LoRA adapter cannot be loaded or unloaded; `kind` says why in the API's terms: "invalid" (a bad
    folder or one that does not fit the base: 400), "not_found" (no such adapter: 404), "conflict" (the
    name is taken: 400), "unsupported" (this engine or server serves no adapters: 400)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class LoraAdapterInfo:
    """A loaded adapter, as /v1/models lists it."""

    name: str
    path: str
    created: int  # Unix seconds it was loaded


class EngineUnavailableError(RuntimeError):
    """The chosen engine cannot be built in this environment (e.g. --engine vllm without vLLM installed).

    The message is one line, meant for `error: ...` on the command line.
    """


class EngineDeadError(RuntimeError):
    """The engine loop has died; every in-flight stream ends with this."""


class EngineStoppedError(EngineDeadError):
    """The engine was stopped (the server is shutting down) before this stream finished."""


class EngineFaultError(EngineDeadError):
    """A model forward failed: the engine stopped for good (its KV cache, or on a GPU the device, may be
    corrupt). Every in-flight stream ends with this; new work then gets EngineDeadError."""


class EngineStepError(RuntimeError):
    """One request failed inside a step (e.g. sampling its row); it ends alone, the engine goes on."""


class QueueTimeoutError(RuntimeError):
    """The request waited longer than its queue timeout without being scheduled; it was dropped."""

    def __init__(self, message: str, waited_s: float) -> None:
        super().__init__(message)
        self.waited_s = waited_s


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for probes and metrics.

    The `*_total` fields count since the engine was built (metrics turn them into counters by
    differencing); an engine that does not track one leaves it 0.
    """

    num_running: int
    num_waiting: int
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    block_size: int
    is_alive: bool
    num_steps_total: int = 0
    num_preemptions_total: int = 0
    # Tokens looked up in the prefix cache at each admission (re-admissions after preemption too), and
    # of those the tokens whose KV the cache supplied.
    num_prefix_cache_query_tokens_total: int = 0
    num_prefix_cache_hit_tokens_total: int = 0
    # Speculative decoding: draft tokens verified, and of those accepted (their ratio is the acceptance rate).
    num_draft_tokens_total: int = 0
    num_accepted_tokens_total: int = 0
    # LoRA: adapters in slots, slots in all, host-memory reads of adapters and slot evictions since start, and
    # the adapters of the running and the waiting requests (vLLM's lora_requests_info).
    num_loras_resident: int = 0
    num_loras_loaded: int = 0
    max_loras: int = 0
    num_lora_loads_total: int = 0
    num_lora_evictions_total: int = 0
    running_loras: tuple[str, ...] = ()
    waiting_loras: tuple[str, ...] = ()

    @property
    def kv_usage(self) -> float:
        return self.num_kv_blocks_used / max(self.num_kv_blocks_total, 1)


@dataclass(frozen=True)
class StepStats:
    """What one completed engine step did; handed to the engine's `on_step` hook (per-step metrics)."""

    num_scheduled_seqs: int  # sequences in the batch (prefill chunks and decodes)
    num_batched_tokens: int  # tokens whose KV the forward computed
    num_preempted: int
    duration_s: float


class GenerationEngine(Protocol):
    model_name: str
    family: str  # the model's family and how it is served, e.g. "qwen2 (native)", "cohere (transformers)"
    max_model_len: int
    vocab_size: int  # the ids the model embeds; a prompt's token ids must lie in [0, vocab_size)
    # Called from the engine's thread after every completed step; None (the default) costs nothing.
    on_step: Callable[[StepStats], None] | None

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def check_request(self, request: GenerationRequest) -> None: ...

    def generate(self, request: GenerationRequest, *, checked: bool = False) -> AsyncIterator[GenerationDelta]:
        """The request's deltas. `checked`: the caller has had `check_request` accept this very request
        (the API's plan does, once per request), so it is not checked again; otherwise generate checks it."""
        ...

    def stats(self) -> EngineStats: ...

    def lora_adapters(self) -> list[LoraAdapterInfo]: ...

    async def load_lora_adapter(self, name: str, path: str) -> None: ...

    async def unload_lora_adapter(self, name: str) -> None: ...


def timeout_delta(request: GenerationRequest, num_output_tokens: int = 0) -> GenerationDelta:
    """The closing delta of a request whose deadline passed, from either engine: no new tokens, finish_reason
    TIMEOUT. Consumers keep the largest output count they saw, so 0 (the default) leaves theirs as it was."""
    return GenerationDelta(
        request_id=request.request_id,
        text="",
        token_ids=[],
        finish_reason=FinishReason.TIMEOUT,
        num_prompt_tokens=len(request.prompt_token_ids),
        num_output_tokens=num_output_tokens,
    )
