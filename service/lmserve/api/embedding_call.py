"""/v1/embeddings and Embed, transport-neutral: an embeddings request from its parsed input to its vectors."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmserve.api.admission import Admitted, Caller, check_request
from lmserve.api.errors import APIError
from lmserve.api.models import require_model
from lmserve.api.plan import check_bound, check_truncation_side, truncated
from lmserve.api.screening import screen_input, screen_token_inputs
from lmserve.state import ServedModel

if TYPE_CHECKING:
    from lmserve.embeddings.batching import CheckedInputs
    from lmserve.state import AppState

# Tokenizing this much text on the event loop would stall every other request; above it, a thread does it.
_INLINE_TOKENIZE_CHARS = 64_000


@dataclass(frozen=True)
class EmbedInput:
    model: str | None
    inputs: list[str] | list[list[int]]  # texts or token arrays
    dimensions: int | None = None
    logged_input: Any = None  # what the client sent, for an access line with --log-prompts
    truncate_prompt_tokens: int | None = None  # vLLM's: keep this many tokens of each input (-1: the limit)
    truncation_side: str | None = None  # "left" keeps the last tokens, "right" the first; None: the tokenizer's
    prompt_name: str | None = None  # one of the model's sentence-transformers prompts; None: its default, if any


@dataclass(frozen=True)
class EmbedOutput:
    model: ServedModel
    vectors: list[list[float]]
    total_tokens: int


@dataclass
class EmbeddingCall:
    """An admitted embedding request; `run()` once."""

    state: AppState
    caller: Caller
    model: ServedModel
    checked: CheckedInputs  # the embedder's validation, once
    admitted: Admitted

    async def run(self) -> EmbedOutput:
        embedder = self.state.embedder
        assert embedder is not None
        result = await submit_admitted(embedder, self.checked, self.caller, self.admitted)
        self.state.metrics.embedding_tokens_total.inc(result.total_tokens)
        return EmbedOutput(self.model, result.vectors, result.total_tokens)


async def submit_admitted(worker: Any, checked: Any, caller: Caller, admitted: Admitted) -> Any:
    """An admitted request's inputs through an encoder's worker (the embedder's or the reranker's): its queue
    slot released with the tokens it took, a stopped worker a 503, the tokens on the access line."""
    from lmserve.embeddings import EmbedderNotRunning

    caller.record.submitted = time.monotonic()
    result = None
    try:
        result = await worker.submit(checked)
    except EmbedderNotRunning as exc:
        raise APIError(str(exc), "service_unavailable") from None
    finally:
        admitted.release(result.total_tokens if result is not None else 0)
    caller.record.prompt_tokens = result.total_tokens
    return result


async def prepare_embedding(state: AppState, caller: Caller, inp: EmbedInput) -> EmbeddingCall:
    """The same steps as generation: rate limit, model, the request's shape, the safety screen of texts,
    the model's instruction prompt before each text (the client's text is what is screened), token ids (the
    embedder's checks: length, vocabulary, dimensions), token arrays screened as text, the queue slot."""
    from lmserve.embeddings import EmbeddingInputError

    check_request(state, caller)
    model = require_model(state.embedding_model, inp.model, "embedding")
    if caller.record.log_prompts:
        caller.record.prompt = inp.logged_input if inp.logged_input is not None else inp.inputs
    embedder = state.embedder
    assert embedder is not None
    limit = state.config.limits.max_embedding_inputs
    if not inp.inputs:
        raise APIError("input must not be empty.", "invalid_value", "input")
    if len(inp.inputs) > limit:
        raise APIError(f"At most {limit} inputs per request.", "invalid_value", "input")
    check_bound("truncate_prompt_tokens", inp.truncate_prompt_tokens)
    check_truncation_side(inp.truncation_side)
    inputs = inp.inputs
    is_text = isinstance(inputs[0], str)
    if is_text:
        if any(isinstance(x, str) and not x.strip() for x in inputs):
            raise APIError("input strings must contain text other than whitespace.", "invalid_value", "input")
        inputs = screen_input(state, caller, list(inputs), "input")  # type: ignore[arg-type]
    elif inp.prompt_name is not None:
        raise APIError(
            "prompt_name applies to text inputs; token arrays are embedded as given (put the prompt's tokens in them).",
            "invalid_request",
            "prompt_name",
        )
    try:
        prompt = embedder.prompts.text(inp.prompt_name) if is_text else ""
        if prompt:
            inputs = [prompt + text for text in inputs]  # type: ignore[operator]
        if sum(len(x) for x in inputs if isinstance(x, str)) > _INLINE_TOKENIZE_CHARS:
            ids = await asyncio.to_thread(embedder.tokenize, inputs)
        else:
            ids = embedder.tokenize(inputs)
        if inp.truncate_prompt_tokens is not None:
            side = inp.truncation_side or getattr(embedder.tokenizer, "truncation_side", "right")
            ids = [truncated(x, inp.truncate_prompt_tokens, side, embedder.max_input_tokens) for x in ids]
        checked = embedder.validate(ids, inp.dimensions)
    except EmbeddingInputError as exc:
        raise APIError(str(exc), exc.code, exc.param) from None
    if not is_text:  # token arrays: screened as their text once the embedder has checked the ids
        screen_token_inputs(state, caller, ids, embedder.tokenizer.decode, "input")
    admitted = Admitted(state, caller, sum(len(x) for x in ids))
    return EmbeddingCall(state, caller, model, checked, admitted)
