"""Transport-neutral request and response types shared by api/ and engine/.

Nothing here knows HTTP or gRPC; both transports build these and read these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"  # client went away, deadline, shutdown
    CONTENT_FILTER = "content_filter"  # the safety filter ended it
    TIMEOUT = "timeout"  # its per-request deadline passed after some output was produced


class ConstraintKind(str, Enum):
    JSON_SCHEMA = "json_schema"  # spec: the schema as JSON text
    JSON_OBJECT = "json_object"  # any JSON object; spec unused
    REGEX = "regex"  # spec: the pattern (Rust regex syntax, anchored at both ends)
    CHOICE = "choice"  # spec: a JSON array of the allowed strings
    GRAMMAR = "grammar"  # spec: a Lark grammar (llguidance's dialect) or GBNF


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on a sequence's output text, enforced token by token while sampling.

    Equal constraints share one compiled grammar (the engine caches by value). `param` names the request
    field it came from, for error messages, and is not part of the identity.
    """

    kind: ConstraintKind
    spec: str = ""
    param: str = field(default="response_format", compare=False)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one sequence. Validated at the edge (api/), asserted here."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # multiplicative, over prompt and output tokens (HF semantics)
    presence_penalty: float = 0.0  # additive, over output tokens (OpenAI semantics)
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token_id, bias) pairs
    seed: int | None = None
    stop: tuple[str, ...] = ()  # matched on text, not included in the output
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob plus the top k
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Output must match this grammar (JSON schema, regex, choice, ...); None: unconstrained.
    structured: StructuredOutput | None = None
    # Speculative decoding by prompt lookup: most draft tokens per step; 0 off, None the server's default.
    speculative_tokens: int | None = None
    # vLLM's prompt_logprobs: None off; k >= 0: each prompt token's logprob (given the tokens before it), its
    # rank, and the top k at its position. The engine computes the LM head over the whole prompt for it.
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        assert self.max_tokens >= 1, "max_tokens must be positive"
        assert 0 <= self.min_tokens <= self.max_tokens
        assert self.temperature >= 0.0
        assert 0.0 < self.top_p <= 1.0
        assert 0.0 <= self.min_p <= 1.0
        assert self.repetition_penalty > 0.0
        assert self.prompt_logprobs is None or self.prompt_logprobs >= 0

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's logprob and the top alternatives at that position."""

    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class PromptLogprob:
    """One prompt token scored by the model given the tokens before it (vLLM's prompt_logprobs entry):
    its logprob, its rank in the vocabulary (1: the likeliest; a tie counts against it, as in vLLM) and the top
    alternatives at its position, best first (their ranks are 1, 2, ...)."""

    token_id: int
    token: str
    logprob: float
    rank: int
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class RequestTiming:
    """Where one sequence's time went inside the engine (time.monotonic() seconds).

    Carried by the finishing delta only, for metrics (queue/prefill histograms), the access log and tracing.
    """

    arrival_time: float  # handed to the engine
    first_scheduled_time: float | None  # first step that computed any of its prompt (end of queueing)
    first_token_time: float | None  # first output token sampled (end of prefill)
    finished_time: float  # last token or abort
    num_preemptions: int = 0

    @property
    def queue_s(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def prefill_s(self) -> float | None:
        if self.first_scheduled_time is None or self.first_token_time is None:
            return None
        return self.first_token_time - self.first_scheduled_time

    @property
    def decode_s(self) -> float | None:
        return None if self.first_token_time is None else self.finished_time - self.first_token_time


@dataclass
class GenerationDelta:
    """One step's worth of new output for one sequence, as streamed to a client."""

    request_id: str
    text: str  # new text since the previous delta (UTF-8 safe, stop strings cut)
    token_ids: list[int]  # new token ids since the previous delta
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # total so far
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    timing: RequestTiming | None = None  # set on the finishing delta by engines that track it
    # With SamplingParams.prompt_logprobs: on the sequence's first delta only, one entry per prompt token,
    # the first None (nothing precedes it); None on every other delta.
    prompt_logprobs: list[PromptLogprob | None] | None = None

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class GenerationRequest:
    """What a transport submits to the engine: one sequence."""

    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    # Seconds from submission: the request ends then with finish_reason TIMEOUT (a final delta with no
    # tokens), its KV blocks freed. None: no deadline.
    timeout_s: float | None = None
    # Seconds from submission it may wait to be scheduled; still waiting then, it fails with
    # QueueTimeoutError. None: it waits as long as it takes.
    queue_timeout_s: float | None = None
    lora: str | None = None  # the LoRA adapter to generate with, by name; None: the base model
