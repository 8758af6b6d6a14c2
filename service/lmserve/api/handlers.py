"""The transport-neutral handlers: what a request does once a transport has parsed it.

A request's life, the same over HTTP (api/http.py) and gRPC (api/grpc.py):

    record = open_request(state, transport, x_request_id)          # accounting.py: id, in-flight, metrics
    key_id = authenticate(state, authorization, client_address)    # admission.py: 401 / UNAUTHENTICATED
    caller = Caller(record, key_id)
    call = prepare_chat(state, caller, ChatInput(...))             # here: draining? rate limit, model,
                                                                   # template, validation, plan, queue slot
    async for choice_delta in call.stream(): ...                   # engine deltas; or `await call.collect()`
    close_request(state, record, RequestOutcome(...))              # one access line, request metric, trace

Every failure is an APIError (errors.py) raised before the engine sees anything, or out of the stream;
each transport maps it to its own status through the one error table. Closing a stream, or cancelling
the task awaiting `collect()` (an HTTP disconnect, a gRPC cancel or deadline), aborts the engine
requests and frees their KV blocks at once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from lmserve.api.admission import Admitted, Caller, check_engine, check_request
from lmserve.api.errors import APIError
from lmserve.api.tools import ToolPlan, plan_tools
from lmserve.api.generation import (
    ChoiceDelta,
    GenerationAccount,
    GenerationParams,
    GenerationPlan,
    GenerationResult,
    Usage,
    check_generation,
    collect_choices,
    plan_generation,
    stream_choices,
)

from lmserve.state import ServedModel

if TYPE_CHECKING:
    from lmserve.engine.base import LoraAdapterInfo
    from lmserve.safety import Decision
    from lmserve.state import AppState

# Keys the chat template fills itself; a client's chat_template_kwargs may not override them.
CHAT_TEMPLATE_RESERVED = frozenset(
    {"messages", "conversation", "tools", "documents", "add_generation_prompt", "tokenize", "return_dict"}
)
# Tokenizing this much text on the event loop would stall every other request; above it, a thread does it.
_INLINE_TOKENIZE_CHARS = 64_000

Prompt = str | list[str] | list[int] | list[list[int]]


def generation_model(state: AppState, model: str | None) -> ServedModel:
    """The generation model a request names: the base (by any of its served names), or a LoRA adapter
    loaded on it (by the adapter's name, as vLLM serves them)."""
    base = state.generation_model
    if model is not None and not base.matches(model):
        for adapter in state.engine.lora_adapters():
            if adapter.name == model:
                return _adapter_model(base, adapter)
    return require_model(base, model, "generation")


def _adapter_model(base: ServedModel, adapter: LoraAdapterInfo) -> ServedModel:
    return ServedModel(
        name=adapter.name, aliases=frozenset({adapter.name}), created=adapter.created, lora=adapter.name,
        parent=base.name, root=adapter.path,
    )  # fmt: skip


def require_model(served: ServedModel | None, model: str | None, kind: str) -> ServedModel:
    if served is None:
        raise APIError(f"This server serves no {kind} model.", "model_not_found", "model")
    if not served.matches(model):
        raise APIError(
            f"The model '{model}' does not exist or is not a {kind} model here; this server's {kind} model "
            f"is '{served.name}'.",
            "model_not_found",
            "model",
        )
    return served


# -- generation -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionInput:
    model: str | None
    prompt: Prompt  # a string, strings, a token array or token arrays
    params: GenerationParams
    echo: bool = False


@dataclass(frozen=True)
class ChatInput:
    model: str | None
    messages: list[dict[str, Any]]  # {"role", "content" (a string), ...}, as the chat template takes them
    params: GenerationParams
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    template_kwargs: dict[str, Any] | None = None
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: bool | None = None


@dataclass
class GenerationCall:
    """An admitted generation request. Run it once, with `stream()` or `collect()`; either one releases
    its admission with the tokens it used, and `close()` releases it if neither ever ran."""

    state: AppState
    caller: Caller
    plan: GenerationPlan
    admitted: Admitted
    model: ServedModel
    response_id: str
    created: int
    echo_texts: list[str] | None = None  # completions with echo: each prompt's text
    tool_plan: ToolPlan | None = None  # chat with tools: how to prompt for and parse tool calls
    account: GenerationAccount | None = None  # the streamed choices' accounting, once `stream()` runs

    @property
    def num_choices(self) -> int:
        return len(self.plan.requests)

    def prompt_index(self, choice_index: int) -> int:
        return choice_index // self.plan.n

    def _guards(self) -> list[tuple[Any, Any]] | None:
        safety = self.state.safety
        if safety is None:
            return None
        return [(safety.output_guard(), self._report) for _ in range(self.num_choices)]

    def _report(self, decisions: list[Decision]) -> None:
        report_decisions(self.state, self.caller, decisions)

    async def stream(self) -> AsyncIterator[ChoiceDelta]:
        s = self.state
        record = self.caller.record
        self.account = GenerationAccount.start(self.plan, keep_text=record.log_prompts)
        try:
            stream = stream_choices(s.engine, self.plan, s.metrics, record, self._guards(), self.account)
            async with aclosing(stream) as choices:
                async for item in choices:
                    yield item
        finally:
            self.admitted.release(self.usage.total_tokens)

    async def collect(self) -> GenerationResult:
        s = self.state
        result = None
        try:
            result = await collect_choices(s.engine, self.plan, s.metrics, self.caller.record, self._guards())
        finally:
            self.admitted.release(result.usage.total_tokens if result else 0)
        return result

    @property
    def usage(self) -> Usage:
        """What the stream used so far (all of it once the stream has ended)."""
        if self.account is None:
            return Usage(self.plan.num_prompt_tokens, 0)
        return self.account.usage

    def close(self) -> None:
        self.admitted.release(0)


def report_decisions(state: AppState, caller: Caller, decisions: list[Decision]) -> None:
    """Count each safety decision and write its audit line (never the text)."""
    if not decisions:
        return
    from lmserve.safety import audit_decisions

    for d in decisions:
        state.metrics.observe_safety(d.direction, d.category, d.action)
    audit_decisions(decisions, caller.record.request_id, caller.key_id)


def screen_input(state: AppState, caller: Caller, texts: list[str], param: str) -> list[str]:
    """The input texts as the model should see them (redacted, stripped), or APIError(content_filter) when
    the policy blocks one. Without a safety filter, the texts as they are."""
    if state.safety is None or not texts:
        return texts
    verdict = state.safety.check_input(texts)
    report_decisions(state, caller, verdict.decisions)
    if verdict.blocked is not None:
        raise APIError(
            f"The input was blocked by the safety filter (category: {verdict.blocked.category}).",
            "content_filter",
            param,
        )
    return verdict.texts


def _screen_token_prompts(state: AppState, caller: Caller, prompts: list[list[int]], param: str) -> None:
    """Token-array inputs are screened as their decoded text: a block refuses them; redaction cannot
    apply to ids the client chose, so they go to the model as sent."""
    if state.safety is not None:
        screen_input(state, caller, [state.tokenizer.decode(p) for p in prompts], param)


def _prompt_items(prompt: Prompt) -> list[str] | list[list[int]]:
    """A completion's prompt as a list of prompts: strings or token arrays ([] is one empty prompt)."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return prompt  # type: ignore[return-value]


def completion_prompts(state: AppState, caller: Caller, items: list[str] | list[list[int]]) -> list[list[int]]:
    """Each prompt's token ids, the texts screened and tokenized (after check_generation has counted them)."""
    tok = state.tokenizer
    if items and isinstance(items[0], str):
        if any(not p.strip() for p in items):  # type: ignore[union-attr]
            raise APIError("The prompt must contain text other than whitespace.", "invalid_value", "prompt")
        return [tok.encode(p) for p in screen_input(state, caller, list(items), "prompt")]  # type: ignore[arg-type]
    token_prompts = [list(p) for p in items]  # type: ignore[arg-type]
    # Before the safety screen decodes them: an id past the vocabulary must be a 400, not a decode error.
    vocab = tok.vocab_size
    for p in token_prompts:
        bad = next((t for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(
                f"The prompt holds token id {bad}, which is not in the model's vocabulary (0..{vocab - 1}).",
                "invalid_value",
                "prompt",
            )
    _screen_token_prompts(state, caller, token_prompts, "prompt")
    return token_prompts


def _echo_texts(state: AppState, prompt: Prompt, prompts: list[list[int]]) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], str):
        return list(prompt)  # type: ignore[arg-type]
    return [state.tokenizer.decode(ids, skip_special_tokens=False) for ids in prompts]


def _admit(
    state: AppState, caller: Caller, model: ServedModel, prompts: list[list[int]], params: GenerationParams, prefix: str
) -> GenerationCall:
    s = state
    caller.record.lora = model.lora
    plan = plan_generation(
        s.engine, prompts, params, s.config.limits, caller.record.request_id, s.tokenizer.vocab_size, model.lora
    )
    # Queue slot and token reservation last: a request refused above holds neither.
    admitted = Admitted(s, caller, plan.max_total_tokens)
    # One id per request: the completion's id is the request id behind OpenAI's prefix, so a response
    # alone finds its access line (and x-request-id header / trailer).
    response_id = f"{prefix}-{caller.record.request_id}"
    caller.record.response_id = response_id
    return GenerationCall(s, caller, plan, admitted, model, response_id, int(time.time()))


def prepare_completion(state: AppState, caller: Caller, inp: CompletionInput) -> GenerationCall:
    check_request(state, caller)
    check_engine(state)
    model = generation_model(state, inp.model)
    items = _prompt_items(inp.prompt)
    check_generation(inp.params, len(items), state.config.limits)
    prompts = completion_prompts(state, caller, items)
    if caller.record.log_prompts:
        caller.record.prompt = inp.prompt  # once screened: a blocked prompt is never logged
    call = _admit(state, caller, model, prompts, inp.params, "cmpl")
    if inp.echo:
        call.echo_texts = _echo_texts(state, inp.prompt, prompts)
    return call


def chat_prompt(
    state: AppState,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any] | None,
) -> list[int]:
    """Token ids of the conversation under the model's chat template (chat and tokenize)."""
    from lmserve.tokenizer import TokenizerError

    kwargs = dict(template_kwargs or {})
    reserved = sorted(CHAT_TEMPLATE_RESERVED & kwargs.keys())
    if reserved:
        raise APIError(f"chat_template_kwargs may not set {', '.join(reserved)}.", "invalid_value", "chat_template_kwargs")
    if not messages:
        raise APIError("messages must not be empty.", "invalid_value", "messages")
    try:
        return state.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs
        )
    except TokenizerError as exc:
        raise APIError(str(exc), "invalid_value", "messages") from None


def chat_logprobs(logprobs: bool, top_logprobs: int | None) -> int | None:
    """Chat's two logprob fields -> the engine's one (None: off; k: the chosen token plus the top k)."""
    if top_logprobs and not logprobs:
        raise APIError("top_logprobs requires logprobs to be true.", "invalid_value", "top_logprobs")
    return (top_logprobs or 0) if logprobs else None


def _chat_template(state: AppState) -> str | None:
    template = getattr(state.tokenizer.hf_tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None


def prepare_chat(state: AppState, caller: Caller, inp: ChatInput) -> GenerationCall:
    check_request(state, caller)
    check_engine(state)
    model = generation_model(state, inp.model)
    contents = [str(m.get("content") or "") for m in inp.messages]
    screened = screen_input(state, caller, contents, "messages")
    messages = [
        m if text == (m.get("content") or "") else {**m, "content": text}
        for m, text in zip(inp.messages, screened, strict=True)
    ]
    plan = plan_tools(inp.tools, inp.tool_choice, inp.parallel_tool_calls, _chat_template(state))
    tools, params = inp.tools, inp.params
    if plan is not None:
        messages, tools = plan.prompt(messages)
        if plan.constraint is not None:
            if params.structured is not None:
                raise APIError(
                    "A required or named tool_choice cannot be combined with a response format.", "invalid_value", "tool_choice"
                )
            params = replace(params, structured=plan.constraint)
    if caller.record.log_prompts:
        caller.record.prompt = inp.messages
    check_generation(params, 1, state.config.limits)
    prompt = chat_prompt(state, messages, inp.add_generation_prompt, tools, inp.template_kwargs)
    call = _admit(state, caller, model, [prompt], params, "chatcmpl")
    call.tool_plan = plan
    return call


# -- embeddings -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbedInput:
    model: str | None
    inputs: list[str] | list[list[int]]  # texts or token arrays
    dimensions: int | None = None
    logged_input: Any = None  # what the client sent, for an access line with --log-prompts


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
    ids: list[list[int]]
    dimensions: int | None
    admitted: Admitted

    async def run(self) -> EmbedOutput:
        from lmserve.embeddings import EmbedderNotRunning, EmbeddingInputError

        embedder = self.state.embedder
        assert embedder is not None
        self.caller.record.submitted = time.monotonic()
        result = None
        try:
            result = await embedder.embed(self.ids, self.dimensions)
        except EmbeddingInputError as exc:
            raise APIError(str(exc), exc.code, exc.param) from None
        except EmbedderNotRunning as exc:
            raise APIError(str(exc), "service_unavailable") from None
        finally:
            self.admitted.release(result.total_tokens if result is not None else 0)
        self.state.metrics.embedding_tokens_total.inc(result.total_tokens)
        self.caller.record.prompt_tokens = result.total_tokens
        return EmbedOutput(self.model, result.vectors, result.total_tokens)


async def prepare_embedding(state: AppState, caller: Caller, inp: EmbedInput) -> EmbeddingCall:
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
    if any(isinstance(x, str) and not x.strip() for x in inp.inputs):
        raise APIError("input strings must contain text other than whitespace.", "invalid_value", "input")
    inputs = inp.inputs
    if inputs and isinstance(inputs[0], str):
        inputs = screen_input(state, caller, list(inputs), "input")  # type: ignore[arg-type]
    elif inputs and state.safety is not None:  # token arrays: screened as their text, sent as they are
        screen_input(state, caller, [embedder.tokenizer.decode(x) for x in inputs], "input")
    try:
        if sum(len(x) for x in inputs if isinstance(x, str)) > _INLINE_TOKENIZE_CHARS:
            ids = await asyncio.to_thread(embedder.tokenize, inputs)
        else:
            ids = embedder.tokenize(inputs)
        embedder.validate(ids, inp.dimensions)
    except EmbeddingInputError as exc:
        raise APIError(str(exc), exc.code, exc.param) from None
    admitted = Admitted(state, caller, sum(len(x) for x in ids))
    return EmbeddingCall(state, caller, model, ids, inp.dimensions, admitted)


# -- tokenization -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizeInput:
    model: str | None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    tools: list[dict[str, Any]] | None = None
    template_kwargs: dict[str, Any] | None = None


@dataclass(frozen=True)
class TokenizeOutput:
    tokens: list[int]
    max_model_len: int
    token_strs: list[str] | None = None


def tokenize(state: AppState, inp: TokenizeInput) -> TokenizeOutput:
    """The generation model's tokens for a prompt or chat messages; the embedding model's for a prompt
    when `model` names it."""
    if (inp.prompt is None) == (inp.messages is None):
        raise APIError("Give exactly one of 'prompt' and 'messages'.", "invalid_request", "prompt")
    embedding = state.embedding_model
    if inp.model is not None and embedding is not None and embedding.matches(inp.model) and inp.prompt is not None:
        embedder = state.embedder
        assert embedder is not None
        ids = embedder.tokenize([inp.prompt])[0]
        strs = embedder.tokenizer.convert_ids_to_tokens(ids) if inp.return_token_strs else None
        return TokenizeOutput(ids, embedder.max_input_tokens, strs)
    require_model(state.generation_model, inp.model, "generation")
    if inp.messages is not None:
        messages, tools = inp.messages, inp.tools
        plan = plan_tools(inp.tools, None, None, _chat_template(state))
        if plan is not None:  # the prompt chat would render for these tools (tool_choice auto)
            messages, tools = plan.prompt(inp.messages)
        ids = chat_prompt(state, messages, inp.add_generation_prompt, tools, inp.template_kwargs)
    else:
        assert inp.prompt is not None
        ids = state.tokenizer.encode(inp.prompt, add_special_tokens=inp.add_special_tokens)
    strs = state.tokenizer.convert_ids_to_tokens(ids) if inp.return_token_strs else None
    return TokenizeOutput(ids, state.engine.max_model_len, strs)


def detokenize(state: AppState, model: str | None, tokens: list[int]) -> str:
    require_model(state.generation_model, model, "generation")
    vocab = state.tokenizer.vocab_size
    bad = next((t for t in tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(f"Token id {bad} is not in the vocabulary (0..{vocab - 1}).", "invalid_value", "tokens")
    return state.tokenizer.decode(tokens)


# -- moderations ------------------------------------------------------------------------------------------

MODERATION_MODEL = "lmserve-safety"


@dataclass(frozen=True)
class ModerationOutput:
    id: str
    model: str
    results: list[Any]  # lmserve.safety.ModerationResult, one per input


def moderate(state: AppState, caller: Caller, model: str | None, texts: list[str]) -> ModerationOutput:
    """The safety scanners as a classifier: every category found is flagged, whatever its action."""
    check_request(state, caller)
    if state.safety is None:
        raise APIError("The safety filter is off on this server (--no-safety).", "invalid_request", "input")
    if not texts:
        raise APIError("input must not be empty.", "invalid_value", "input")
    limit = state.config.limits.max_embedding_inputs
    if len(texts) > limit:
        raise APIError(f"At most {limit} inputs per request.", "invalid_value", "input")
    return ModerationOutput(f"modr-{uuid.uuid4().hex}", model or MODERATION_MODEL, state.safety.moderate(texts))


# -- models -----------------------------------------------------------------------------------------------


# -- LoRA adapters at run time ------------------------------------------------------------------------------

_LORA_ERRORS = {"invalid": "invalid_value", "conflict": "invalid_value", "not_found": "not_found", "unsupported": "not_found"}


def _check_runtime_lora(state: AppState, caller: Caller) -> None:
    check_request(state, caller)
    if not state.config.engine.allow_runtime_lora:
        raise APIError(
            "Loading and unloading LoRA adapters at run time is off: start the server with --allow-runtime-lora.",
            "not_found",
        )


async def load_lora_adapter(state: AppState, caller: Caller, name: str, path: str, load_inplace: bool = False) -> str:
    """Register the adapter folder `path` as `name` (read and checked first); a success line, as vLLM's."""
    from lmserve.engine.base import LoraAdapterError

    _check_runtime_lora(state, caller)
    if load_inplace:
        raise APIError("load_inplace is not supported: unload the adapter, then load it again.", "unsupported_value", "load_inplace")
    if state.generation_model.matches(name) or (state.embedding_model is not None and state.embedding_model.matches(name)):
        raise APIError(f"'{name}' is the name of a model this server serves.", "invalid_value", "lora_name")
    try:
        await state.engine.load_lora_adapter(name, path)
    except LoraAdapterError as exc:
        raise APIError(f"The LoRA adapter '{name}' cannot be loaded: {exc}", _LORA_ERRORS[exc.kind],
                       "lora_path" if exc.kind == "invalid" else "lora_name") from None  # fmt: skip
    state.metrics.lora_loads_total.inc()
    return f"Success: LoRA adapter '{name}' added successfully."


async def unload_lora_adapter(state: AppState, caller: Caller, name: str) -> str:
    """Forget the adapter `name`: new requests for it get 404; those in flight finish with it."""
    from lmserve.engine.base import LoraAdapterError

    _check_runtime_lora(state, caller)
    try:
        await state.engine.unload_lora_adapter(name)
    except LoraAdapterError as exc:
        raise APIError(f"The LoRA adapter '{name}' cannot be unloaded: {exc}", _LORA_ERRORS[exc.kind], "lora_name") from None
    state.metrics.lora_unloads_total.inc()
    return f"Success: LoRA adapter '{name}' removed successfully."


@dataclass(frozen=True)
class ModelInfo:
    served: ServedModel
    max_model_len: int
    kind: str  # generation | embedding
    family: str  # e.g. "qwen2 (native)", "cohere (transformers)", "bert (transformers)"


def served_models(state: AppState) -> list[ModelInfo]:
    engine = state.engine
    models = [ModelInfo(state.generation_model, engine.max_model_len, "generation", engine.family)]
    models += [
        ModelInfo(_adapter_model(state.generation_model, a), engine.max_model_len, "generation", engine.family)
        for a in engine.lora_adapters()
    ]
    if state.embedding_model is not None and state.embedder is not None:
        embedder = state.embedder
        models.append(ModelInfo(state.embedding_model, embedder.max_input_tokens, "embedding", embedder.family))
    return models


__all__ = [
    "ChatInput",
    "CompletionInput",
    "EmbedInput",
    "EmbedOutput",
    "EmbeddingCall",
    "GenerationCall",
    "ModelInfo",
    "TokenizeInput",
    "TokenizeOutput",
    "chat_logprobs",
    "chat_prompt",
    "detokenize",
    "load_lora_adapter",
    "prepare_chat",
    "prepare_completion",
    "prepare_embedding",
    "require_model",
    "served_models",
    "tokenize",
    "unload_lora_adapter",
]
