"""The one validation step of a generation request: the parameters as the client sent them
(`GenerationParams`, built by each transport from its wire types) -> one `GenerationPlan` of engine
requests, or an APIError naming the parameter as the client named it.

    check_generation(params, num_prompts, limits)      # every check that needs no token ids; before any work
    plan = plan_generation(engine, prompts, params, limits, request_id, vocab_size, lora)
                                                       # token ids, defaults, the n fan-out, engine capacity

Both steps run in this order for completions and chat, over HTTP and gRPC alike (api/generation_call.py);
the engine then keeps only its capacity checks (`check_request`, called here once per engine request).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from lmserve.api.errors import APIError
from lmserve.config import LimitsConfig
from lmserve.engine.base import GenerationEngine, RejectReason, RequestRejected
from lmserve.types import GenerationRequest, SamplingParams, StructuredOutput

MAX_LOGIT_BIAS = 100.0
# Temperatures below this sample greedily (vLLM's rule): dividing logits by ~1e-40 overflows to inf.
GREEDY_TEMPERATURE_EPS = 1e-5
# A repetition penalty near 0 divides logits into inf/NaN; a single such request would fail its whole
# engine step (everyone batched with it), so the edge refuses it.
MIN_REPETITION_PENALTY = 0.01
# Drafts beyond a few dozen are nearly never all accepted, and each one is a row of the step's forward.
MAX_SPECULATIVE_TOKENS = 32
# prompt_logprobs' top alternatives per prompt token (vLLM's -1, the whole vocabulary, is refused).
MAX_PROMPT_LOGPROBS = 20
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class Bound:
    """A parameter's fixed range, stated once: `check_generation` enforces it (the one wording of its
    error, on both transports) and the HTTP schema shows it (`json_schema`); the wire schemas do not
    enforce it themselves. Ranges that depend on the server (n, max_tokens, logprobs) are LimitsConfig's."""

    low: float
    high: float | None = None
    low_open: bool = False

    def holds(self, value: float) -> bool:
        if math.isnan(value) or value < self.low or (self.low_open and value == self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}]"

    def json_schema(self) -> dict[str, float]:
        out = {"exclusiveMinimum" if self.low_open else "minimum": self.low}
        if self.high is not None:
            out["maximum"] = self.high
        return out


BOUNDS = {
    "temperature": Bound(0.0, 2.0),
    "top_p": Bound(0.0, 1.0, low_open=True),
    "min_p": Bound(0.0, 1.0),
    "presence_penalty": Bound(-2.0, 2.0),
    "frequency_penalty": Bound(-2.0, 2.0),
    "repetition_penalty": Bound(MIN_REPETITION_PENALTY, 2.0),
    "top_k": Bound(-1),  # -1 and 0: off
    "seed": Bound(SEED_MIN, SEED_MAX),
    "min_tokens": Bound(0),
    "speculative_tokens": Bound(0, MAX_SPECULATIVE_TOKENS),  # 0: off
    "timeout": Bound(0, low_open=True),
    "truncate_prompt_tokens": Bound(-1),  # -1: as many as fit
    "prompt_logprobs": Bound(0, MAX_PROMPT_LOGPROBS),
}
TRUNCATION_SIDES = ("left", "right")


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters as a client sent them (None: not sent), before per-prompt defaults."""

    max_tokens: int | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # OpenAI's JSON shape: {"token_id": bias}
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured: StructuredOutput | None = None  # response_format / structured_outputs / forced tool calls
    speculative_tokens: int | None = None  # prompt-lookup drafts per step; None: the server's default
    truncate_prompt_tokens: int | None = None  # vLLM's: keep this many prompt tokens (-1: as many as fit)
    truncation_side: str | None = None  # "left" keeps the last, "right" the first; None: the tokenizer's
    priority: int = 0  # vLLM's; only 0 is served (first come, first served)
    prompt_logprobs: int | None = None  # vLLM's: score the prompt's tokens, with this many alternatives each
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs' token strings read "token_id:<id>"
    # How max_tokens defaults when absent: completions use a fixed 16 (OpenAI), chat fills the context.
    default_max_tokens: int | None = 16
    max_logprobs: int = 20
    # The request's own names for these fields, for errors: "prompt" | "messages" | ...,
    # "max_tokens" | "max_completion_tokens", "logprobs" | "top_logprobs".
    prompt_param: str = "prompt"
    max_tokens_param: str = "max_tokens"
    logprobs_param: str = "logprobs"  # chat: "top_logprobs"
    # The client's own deadline in seconds from submission (HTTP: x-request-timeout / `timeout`); None: none.
    timeout_s: float | None = None
    timeout_param: str = "timeout"


# GenerationParams fields that both wires carry under the same name, optional, and pass on as sent
# (HTTP: the body's attribute; gRPC: the message's `optional` field, None when unset).
CLIENT_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed",
    "speculative_tokens", "truncate_prompt_tokens", "truncation_side", "prompt_logprobs",
)  # fmt: skip


@dataclass(frozen=True)
class GenerationPlan:
    """What one API request submits: len(prompts) * n engine requests; requests[i] is choice i."""

    request_id: str
    prompts: list[list[int]]
    n: int
    requests: list[GenerationRequest]
    params: GenerationParams = field(default_factory=lambda: GenerationParams())  # as the client sent them

    @property
    def num_prompt_tokens(self) -> int:
        """Usage counts each prompt once, however many choices it has (as OpenAI does)."""
        return sum(len(p) for p in self.prompts)

    @property
    def max_total_tokens(self) -> int:
        """The most tokens this plan can use: the token rate limit reserves this much."""
        return self.num_prompt_tokens + sum(r.sampling.max_tokens for r in self.requests)



# -- validation and planning ---------------------------------------------------------------------------


def check_bound(name: str, value: float | None, param: str | None = None) -> None:
    bound = BOUNDS[name]
    if value is not None and not bound.holds(value):
        raise APIError(f"{param or name} must be {bound.describe()}, got {value}.", "invalid_value", param or name)


def check_generation(params: GenerationParams, num_prompts: int, limits: LimitsConfig) -> None:
    """Every check of a generation request that needs no token ids: the parameters and the number of
    prompts. Runs once, before the prompts are screened and tokenized (and so before any work is spent
    on them); `plan_generation` then checks the token ids. Raises APIError(400) naming the parameter as
    sent."""
    if num_prompts < 1:
        raise APIError("At least one prompt is required.", "missing_field", params.prompt_param)
    if num_prompts > limits.max_prompts:
        raise APIError(f"At most {limits.max_prompts} prompts per request.", "invalid_value", params.prompt_param)
    check_bound("timeout", params.timeout_s, params.timeout_param)
    if not 1 <= params.n <= limits.max_n:
        raise APIError(f"n must be between 1 and {limits.max_n}, got {params.n}.", "invalid_value", "n")
    if params.max_tokens is not None:
        if params.max_tokens < 1:
            raise APIError("max_tokens must be at least 1.", "invalid_value", params.max_tokens_param)
        if params.max_tokens > limits.max_tokens_cap:
            raise APIError(
                f"max_tokens is {params.max_tokens}; this server allows at most {limits.max_tokens_cap}.",
                "invalid_value",
                params.max_tokens_param,
            )
    for name in (
        "temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "top_k", "seed",
        "min_tokens", "speculative_tokens", "truncate_prompt_tokens", "prompt_logprobs",
    ):  # fmt: skip
        check_bound(name, getattr(params, name))
    check_truncation_side(params.truncation_side)
    if params.priority != 0:
        raise APIError(
            "priority is not supported: this server schedules requests first come, first served (send 0 or leave it out).",
            "unsupported_value",
            "priority",
        )
    if params.max_tokens is not None and params.min_tokens > params.max_tokens:
        raise APIError("min_tokens must not exceed max_tokens.", "invalid_value", "min_tokens")
    if params.logprobs is not None and not 0 <= params.logprobs <= params.max_logprobs:
        raise APIError(
            f"{params.logprobs_param} must be between 0 and {params.max_logprobs}.", "invalid_value", params.logprobs_param
        )
    if len(params.stop) > limits.max_stop_strings:
        raise APIError(f"At most {limits.max_stop_strings} stop sequences are allowed.", "invalid_value", "stop")
    if any(s == "" for s in params.stop):
        raise APIError("Stop sequences must not be empty.", "invalid_value", "stop")
    if any(t < 0 for t in params.stop_token_ids):
        raise APIError("stop_token_ids must be non-negative.", "invalid_value", "stop_token_ids")
    if params.structured is not None:
        # Compile time and memory grow with a grammar; no sane schema comes near the cap (the tests'
        # mid-sized one is ~1.5 KB).
        size = len(params.structured.spec.encode("utf-8"))
        if size > limits.max_grammar_bytes:
            raise APIError(
                f"{params.structured.param} is {size} bytes; this server compiles at most {limits.max_grammar_bytes}.",
                "invalid_value",
                params.structured.param,
            )


def parse_logit_bias(logit_bias: dict[str, float] | None, vocab_size: int | None = None) -> tuple[tuple[int, float], ...]:
    if not logit_bias:
        return ()
    pairs: list[tuple[int, float]] = []
    for key, bias in logit_bias.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise APIError(f"logit_bias keys must be token ids, got {key!r}.", "invalid_value", "logit_bias") from None
        if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
            raise APIError(f"logit_bias token id {token_id} is out of range.", "invalid_value", "logit_bias")
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise APIError("logit_bias values must be between -100 and 100.", "invalid_value", "logit_bias")
        pairs.append((token_id, float(bias)))
    return tuple(pairs)


def resolve_max_tokens(params: GenerationParams, prompt_len: int, max_model_len: int, limits: LimitsConfig) -> int:
    """max_tokens for one prompt: as sent, or the default (completions: 16; chat: whatever room the context
    leaves), within the server's cap. Whether it fits beside the prompt is the engine's to say
    (check_request), and `rejection_error` words its answer."""
    if params.max_tokens is not None:
        return params.max_tokens
    room = max_model_len - prompt_len
    default = params.default_max_tokens if params.default_max_tokens is not None else room
    return max(1, min(default, room, limits.max_tokens_cap))


def build_sampling(
    params: GenerationParams, max_tokens: int, seed: int | None, logit_bias: tuple[tuple[int, float], ...] = ()
) -> SamplingParams:
    temperature = 1.0 if params.temperature is None else params.temperature
    if temperature < GREEDY_TEMPERATURE_EPS:
        temperature = 0.0
    return SamplingParams(
        max_tokens=max_tokens,
        min_tokens=min(params.min_tokens, max_tokens),
        temperature=temperature,
        top_k=0 if params.top_k in (None, -1) else params.top_k,
        top_p=1.0 if params.top_p is None else params.top_p,
        min_p=params.min_p or 0.0,
        repetition_penalty=1.0 if params.repetition_penalty is None else params.repetition_penalty,
        presence_penalty=params.presence_penalty or 0.0,
        frequency_penalty=params.frequency_penalty or 0.0,
        logit_bias=logit_bias,
        seed=seed,
        stop=params.stop,
        stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
        skip_special_tokens=params.skip_special_tokens,
        include_stop_str_in_output=params.include_stop_str_in_output,
        structured=params.structured,
        speculative_tokens=params.speculative_tokens,
        prompt_logprobs=params.prompt_logprobs,
    )


def plan_generation(
    engine: GenerationEngine,
    prompts: Sequence[list[int]],
    params: GenerationParams,
    limits: LimitsConfig,
    request_id: str,
    vocab_size: int | None = None,
    lora: str | None = None,
) -> GenerationPlan:
    """Check the token ids and fan out: prompt i, choice j becomes engine request i*n + j with seed
    (seed + j). Call after `check_generation`, with the tokenized prompts.

    The engine's `check_request` (its capacity, a constraint it cannot compile) runs for every request
    before anything is queued, so a bad request costs nothing and never half-runs; its refusals come
    back as APIErrors naming the parameter the client sent (`rejection_error`).
    """
    # Ids the tokenizer and the model both know: the engine's embedding takes no others.
    vocab = engine.vocab_size if vocab_size is None else min(vocab_size, engine.vocab_size)
    logit_bias = parse_logit_bias(params.logit_bias, vocab)
    bad = next((t for t in params.stop_token_ids if t >= vocab), None)
    if bad is not None:
        raise APIError(
            f"stop_token_ids holds {bad}, which is not in the model's vocabulary (0..{vocab - 1}).",
            "invalid_value",
            "stop_token_ids",
        )
    requests: list[GenerationRequest] = []
    # A prompt of the whole context leaves no room for output: truncation keeps at most one token less.
    prompts = [truncated(p, params.truncate_prompt_tokens, params.truncation_side, engine.max_model_len - 1) for p in prompts]
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise APIError("The prompt must not be empty.", "invalid_value", params.prompt_param)
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(
                f"The prompt holds token id {bad}, which is not in the model's vocabulary (0..{vocab - 1}).",
                "invalid_value",
                params.prompt_param,
            )
        max_tokens = resolve_max_tokens(params, len(prompt), engine.max_model_len, limits)
        for j in range(params.n):
            seed = None if params.seed is None else params.seed + j
            req = GenerationRequest(
                prompt_token_ids=list(prompt),
                sampling=build_sampling(params, max_tokens, seed, logit_bias),
                request_id=f"{request_id}-{i * params.n + j}",
                timeout_s=params.timeout_s,
                queue_timeout_s=limits.queue_timeout_s or None,
                lora=lora,
            )
            try:
                engine.check_request(req)
            except RequestRejected as exc:
                raise rejection_error(exc, params, engine.max_model_len, len(prompt), max_tokens) from None
            requests.append(req)
    return GenerationPlan(request_id, [list(p) for p in prompts], params.n, requests, params)


def rejection_error(
    exc: RequestRejected,
    params: GenerationParams,
    max_model_len: int,
    num_prompt_tokens: int | None = None,
    max_tokens: int | None = None,
) -> APIError:
    """An engine's refusal as the client's error: the code, the parameter as the client named it, and,
    for the lengths (given the request's prompt length and max_tokens), what to change."""
    is_length = exc.reason in (RejectReason.PROMPT_TOO_LONG, RejectReason.OUTPUT_TOO_LONG)
    if is_length and num_prompt_tokens is not None and max_tokens is not None:
        limit = exc.max_seq_len if exc.max_seq_len is not None else max_model_len
        if limit >= max_model_len:
            said = f"This model's maximum context length is {max_model_len} tokens."
        else:  # the KV pool, not the context, is what one sequence cannot exceed here
            said = f"This server's KV cache holds at most {limit} tokens of one sequence."
        if exc.reason is RejectReason.PROMPT_TOO_LONG:
            return APIError(
                f"{said} However, the prompt has {num_prompt_tokens} tokens, which leaves no room for a completion. "
                "Please shorten the prompt.",
                "context_length_exceeded",
                params.prompt_param,
            )
        return APIError(
            f"{said} However, you requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
            f"prompt, {max_tokens} for the completion). Please reduce {params.max_tokens_param} to at most "
            f"{limit - num_prompt_tokens}, or shorten the prompt.",
            "context_length_exceeded",
            params.max_tokens_param,
        )
    if exc.reason is RejectReason.UNKNOWN_ADAPTER:
        return APIError(str(exc), "model_not_found", "model")
    if exc.reason is RejectReason.INVALID_CONSTRAINT:
        param = params.structured.param if params.structured is not None else "response_format"
        return APIError(f"Invalid {param}: {exc}", "invalid_value", param)
    if is_length:
        param = params.prompt_param if exc.reason is RejectReason.PROMPT_TOO_LONG else params.max_tokens_param
        return APIError(str(exc), "context_length_exceeded", param)
    param = params.max_tokens_param if exc.field == "max_tokens" else exc.field
    return APIError(str(exc), "invalid_value", param)




def check_truncation_side(side: str | None) -> None:
    if side is not None and side not in TRUNCATION_SIDES:
        raise APIError(f"truncation_side must be 'left' or 'right', got {side!r}.", "invalid_value", "truncation_side")


def truncated(ids: Sequence[int], keep: int | None, side: str | None, max_keep: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's first `keep` tokens (side "right", the default) or its
    last (side "left"); -1 keeps as many as the model takes (`max_keep`); None leaves it whole."""
    if keep is None:
        return list(ids)
    if keep > max_keep:
        raise APIError(
            f"truncate_prompt_tokens is {keep}; this model takes at most {max_keep} prompt tokens.",
            "invalid_value",
            "truncate_prompt_tokens",
        )
    n = max_keep if keep < 0 else keep
    if n >= len(ids):
        return list(ids)
    return list(ids[len(ids) - n :]) if side == "left" else list(ids[:n])


def chat_logprobs(logprobs: bool, top_logprobs: int | None) -> int | None:
    """Chat's two logprob fields -> the engine's one (None: off; k: the chosen token plus the top k)."""
    if top_logprobs and not logprobs:
        raise APIError("top_logprobs requires logprobs to be true.", "invalid_value", "top_logprobs")
    return (top_logprobs or 0) if logprobs else None
