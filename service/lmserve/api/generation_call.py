"""Completions and chat, transport-neutral: what a generation request does once a transport has parsed it.

A request's life, the same over HTTP (api/http/) and gRPC (api/grpc/):

    record = open_request(state, transport, x_request_id)          # accounting.py: id, in-flight, metrics
    key_id = authenticate(state, authorization, client_address)    # admission.py: 401 / UNAUTHENTICATED
    call = prepare_chat(state, Caller(record, key_id), ChatInput(...))
    async for choice in call.stream(): ...                         # PresentedChoice pieces; or `await call.collect()`
    close_request(state, record, RequestOutcome(...))              # one access line, request metric, trace

`prepare_completion` and `prepare_chat` take the same steps in the same order: draining and rate limit,
the model, the parameters (plan.check_generation), the safety screen of the input, the prompt's token ids,
the plan (plan.plan_generation: ids, fan-out, the engine's capacity), the queue slot. Every failure is an
APIError raised before the engine sees anything, or out of the stream. What the client gets is presented
once (presentation.py); the transports only serialize it. Closing a stream, or cancelling the task
awaiting `collect()` (an HTTP disconnect, a gRPC cancel or deadline), aborts the engine requests and frees
their KV blocks at once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from lmserve.api.account import GenerationAccount, Usage
from lmserve.api.admission import Admitted, Caller, check_engine, check_request
from lmserve.api.errors import APIError
from lmserve.api.models import generation_model
from lmserve.api.plan import GenerationParams, GenerationPlan, check_generation, plan_generation
from lmserve.api.presentation import PresentedChoice, Presenter, token_id_string
from lmserve.api.prompts import (
    Prompt,
    chat_prompt,
    chat_template,
    completion_prompts,
    echo_texts,
    prompt_items,
    screened_messages,
)
from lmserve.api.reasoning import ReasoningPlan, reasoning_format
from lmserve.api.screening import report_decisions, screen_token_inputs
from lmserve.api.stream import collect_choices, stream_choices
from lmserve.api.tools import ToolPlan, plan_tools
from lmserve.state import ServedModel

if TYPE_CHECKING:
    from lmserve.safety import Decision
    from lmserve.safety.screen import ScreenedChoice
    from lmserve.state import AppState


@dataclass(frozen=True)
class CompletionInput:
    model: str | None
    prompt: Prompt  # a string, strings, a token array or token arrays
    params: GenerationParams
    echo: bool = False
    add_special_tokens: bool = True  # vLLM's: the tokenizer's BOS etc. on text prompts


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
    add_special_tokens: bool = False  # vLLM's: special tokens on top of what the template writes


@dataclass(frozen=True)
class PresentedResult:
    choices: list[PresentedChoice]
    usage: Usage


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
    reasoning_plan: ReasoningPlan | None = None  # chat with a reasoning parser: where the thinking is
    account: GenerationAccount | None = None  # the streamed choices' accounting, once `stream()` runs

    @property
    def num_choices(self) -> int:
        return len(self.plan.requests)

    def presenter(self) -> Presenter:
        echo_tokens = None
        params = self.plan.params
        if self.echo_texts is not None and params.logprobs is not None:
            if params.return_tokens_as_token_ids:
                echo_tokens = [[token_id_string(t) for t in p] for p in self.plan.prompts]
            else:
                echo_tokens = [self.state.tokenizer.convert_ids_to_tokens(p) for p in self.plan.prompts]
        return Presenter(
            self.num_choices, self.plan.n, self.echo_texts, echo_tokens, self.tool_plan,
            tokens_as_ids=params.return_tokens_as_token_ids, reasoning_plan=self.reasoning_plan,
        )

    def _screens(self) -> list[ScreenedChoice] | None:
        safety = self.state.safety
        if safety is None:
            return None
        from lmserve.safety.screen import ScreenedChoice

        return [ScreenedChoice(safety.output_guard(), self._report) for _ in range(self.num_choices)]

    def _report(self, decisions: list[Decision]) -> None:
        report_decisions(self.state, self.caller, decisions)

    async def stream(self) -> AsyncIterator[PresentedChoice]:
        s = self.state
        record = self.caller.record
        self.account = GenerationAccount.start(self.plan, keep_text=record.log_prompts)
        presenter = self.presenter()
        try:
            stream = stream_choices(s.engine, self.plan, s.metrics, record, self._screens(), self.account)
            async with aclosing(stream) as choices:
                async for item in choices:
                    presented = presenter.delta(item)
                    if presented is not None:
                        yield presented
        finally:
            self.admitted.release(self.usage.total_tokens)

    async def collect(self) -> PresentedResult:
        s = self.state
        result = None
        try:
            result = await collect_choices(s.engine, self.plan, s.metrics, self.caller.record, self._screens())
        finally:
            self.admitted.release(result.usage.total_tokens if result else 0)
        presenter = self.presenter()
        return PresentedResult([presenter.choice(c) for c in result.choices], result.usage)

    @property
    def usage(self) -> Usage:
        """What the stream used so far (all of it once the stream has ended)."""
        if self.account is None:
            return Usage(self.plan.num_prompt_tokens, 0)
        return self.account.usage

    def close(self) -> None:
        self.admitted.release(0)


def _plan(state: AppState, caller: Caller, model: ServedModel, prompts: list[list[int]], params: GenerationParams) -> GenerationPlan:
    caller.record.lora = model.lora
    if params.truncation_side is None:
        params = replace(params, truncation_side=state.tokenizer.truncation_side)
    return plan_generation(
        state.engine, prompts, params, state.config.limits, caller.record.request_id, state.tokenizer.vocab_size, model.lora
    )


def _admit(state: AppState, caller: Caller, model: ServedModel, plan: GenerationPlan, prefix: str) -> GenerationCall:
    # Queue slot and token reservation last: a request refused above holds neither.
    admitted = Admitted(state, caller, plan.max_total_tokens)
    # One id per request: the completion's id is the request id behind OpenAI's prefix, so a response
    # alone finds its access line (and x-request-id header / trailer).
    response_id = f"{prefix}-{caller.record.request_id}"
    caller.record.response_id = response_id
    return GenerationCall(state, caller, plan, admitted, model, response_id, int(time.time()))


def prepare_completion(state: AppState, caller: Caller, inp: CompletionInput) -> GenerationCall:
    check_request(state, caller)
    check_engine(state)
    model = generation_model(state, inp.model)
    items = prompt_items(inp.prompt)
    check_generation(inp.params, len(items), state.config.limits)
    prompts = completion_prompts(state, caller, items, inp.add_special_tokens)  # texts screened and tokenized
    plan = _plan(state, caller, model, prompts, inp.params)
    if items and not isinstance(items[0], str):  # token arrays: screened once the plan has checked the ids
        screen_token_inputs(state, caller, plan.prompts, state.tokenizer.decode, "prompt")
    if caller.record.log_prompts:
        caller.record.prompt = inp.prompt  # once screened: a blocked prompt is never logged
    call = _admit(state, caller, model, plan, "cmpl")
    if inp.echo:  # a truncated prompt is echoed as the model saw it
        prompt = inp.prompt if inp.params.truncate_prompt_tokens is None else plan.prompts
        call.echo_texts = echo_texts(state, prompt, plan.prompts)
    return call


def prepare_chat(state: AppState, caller: Caller, inp: ChatInput, prefix: str = "chatcmpl") -> GenerationCall:
    """`prefix`: the response id's, before the request id (the Responses API's calls say "resp")."""
    check_request(state, caller)
    check_engine(state)
    model = generation_model(state, inp.model)
    template = chat_template(state)
    tool_plan = plan_tools(inp.tools, inp.tool_choice, inp.parallel_tool_calls, template, state.config.tool_call_parser)
    tool_plan, params = _special_markers(state, tool_plan, inp.params)
    if tool_plan is not None and tool_plan.constraint is not None:
        if params.structured is not None:
            raise APIError(
                "A required or named tool_choice cannot be combined with a response format.", "invalid_value", "tool_choice"
            )
        params = replace(params, structured=tool_plan.constraint)
    check_generation(params, 1, state.config.limits)
    messages, tools = screened_messages(state, caller, inp.messages), inp.tools
    if tool_plan is not None:
        messages, tools = tool_plan.prompt(messages)
    if caller.record.log_prompts:
        caller.record.prompt = inp.messages  # once screened: a blocked prompt is never logged
    prompt = chat_prompt(state, messages, inp.add_generation_prompt, tools, inp.template_kwargs, inp.add_special_tokens)
    reasoning = _reasoning_plan(state, template, prompt)
    if reasoning is not None and params.structured is not None:
        params = replace(params, structured=reasoning.constrain(params.structured))
    plan = _plan(state, caller, model, [prompt], params)
    call = _admit(state, caller, model, plan, prefix)
    call.tool_plan, call.reasoning_plan = tool_plan, reasoning
    return call


# Enough of the rendered prompt to hold its generation prompt (`<think>\n\n</think>\n\n` and the turn's opening).
PROMPT_TAIL_TOKENS = 24


def _reasoning_plan(state: AppState, template: str | None, prompt: list[int]) -> ReasoningPlan | None:
    fmt = reasoning_format(state.config.reasoning_parser, template)
    if fmt is None:
        return None
    tail = state.tokenizer.decode(prompt[-PROMPT_TAIL_TOKENS:], skip_special_tokens=False)
    return ReasoningPlan.for_prompt(fmt, tail)


def _special_markers(
    state: AppState, tool_plan: ToolPlan | None, params: GenerationParams
) -> tuple[ToolPlan | None, GenerationParams]:
    """Where the tokenizer holds the format's marker as a special token (Mistral's [TOOL_CALLS]): the
    forced-call grammar names that token, and decoding keeps special tokens so the marker reaches the
    parser (as vLLM does), the others hidden again unless the client asked for them."""
    if tool_plan is None or not tool_plan.parses_calls:
        return tool_plan, params
    added = getattr(state.tokenizer.hf_tokenizer, "added_tokens_decoder", {}) or {}
    special = {t.content: token_id for token_id, t in added.items() if getattr(t, "special", False)}
    marker_ids = tuple((m, special[m]) for m in tool_plan.format.markers if m in special)
    if not marker_ids:
        return tool_plan, params
    tool_plan = replace(tool_plan, marker_ids=marker_ids)
    if params.skip_special_tokens:
        params = replace(params, skip_special_tokens=False)
        hidden = sorted(set(special) - {m for m, _ in marker_ids}, key=len, reverse=True)
        tool_plan = replace(tool_plan, hidden_specials=tuple(hidden))
    return tool_plan, params


__all__ = ["ChatInput", "CompletionInput", "GenerationCall", "PresentedResult", "prepare_chat", "prepare_completion"]
