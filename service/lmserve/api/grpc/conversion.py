"""lmserve.v1's messages <-> the transport-neutral inputs and presented outputs: the one place that knows
both. Proto3 `optional` fields that are unset take the server's defaults (None here)."""

from __future__ import annotations

from typing import Any

from google.protobuf.message import Message

from lmserve.api.account import Usage
from lmserve.api.errors import APIError
from lmserve.api.generation_call import ChatInput, CompletionInput
from lmserve.api.plan import CLIENT_FIELDS, GenerationParams, chat_logprobs
from lmserve.api.presentation import PresentedChoice
from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.structured import ResponseFormatInput, StructuredOutputsInput, json_object, resolve_structured
from lmserve.types import PromptLogprob, TokenLogprob

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


# -- wire -> neutral ----------------------------------------------------------------------------------------


def opt(msg: Message, name: str) -> Any:
    """An `optional` field's value, None when unset (the server's default applies)."""
    return getattr(msg, name) if msg.HasField(name) else None


def _generation_params(
    req: pb.CompletionRequest | pb.ChatRequest,
    *,
    logprobs: int | None,
    default_max_tokens: int | None,
    max_logprobs: int,
    prompt_param: str,
    logprobs_param: str = "logprobs",
) -> GenerationParams:
    n = opt(req, "n")
    skip_special = opt(req, "skip_special_tokens")
    return GenerationParams(
        **{name: opt(req, name) for name in CLIENT_FIELDS},
        max_tokens=opt(req, "max_tokens"),
        n=1 if n is None else n,
        logit_bias={str(k): v for k, v in req.logit_bias.items()} or None,
        priority=opt(req, "priority") or 0,
        stop=tuple(req.stop),
        stop_token_ids=tuple(req.stop_token_ids),
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=True if skip_special is None else skip_special,
        include_stop_str_in_output=req.include_stop_str_in_output,
        structured=_structured(req),
        default_max_tokens=default_max_tokens,
        max_logprobs=max_logprobs,
        prompt_param=prompt_param,
        logprobs_param=logprobs_param,
        return_tokens_as_token_ids=req.return_tokens_as_token_ids,
    )


def json_text_object(text: str, param: str) -> dict[str, Any] | None:
    """A JSON-text field holding an object (a schema); empty text is None."""
    return json_object(text, param) if text else None


def _structured(req: pb.CompletionRequest | pb.ChatRequest) -> Any:
    fmt = None
    if req.HasField("response_format"):
        rf = req.response_format
        schema = json_text_object(rf.json_schema.schema, "response_format.json_schema.schema") if rf.HasField("json_schema") else None
        fmt = ResponseFormatInput(rf.type or "text", schema, rf.HasField("json_schema"))
    so = None
    if req.HasField("structured_outputs"):
        which = req.structured_outputs.WhichOneof("constraint")
        value = getattr(req.structured_outputs, which) if which else None
        so = StructuredOutputsInput(
            json=value if which == "json" else None,
            regex=value if which == "regex" else None,
            choice=list(value.choices) if which == "choice" else None,
            grammar=value if which == "grammar" else None,
            json_object=value if which == "json_object" else None,
        )
    return resolve_structured(fmt, so)


def _tool_call_dict(call: pb.ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": call.type or "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}


def chat_messages(messages: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise APIError(
                f"Unknown role '{m.role}'; use one of {', '.join(sorted(CHAT_ROLES))}.", "invalid_value", f"messages[{i}].role"
            )
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.HasField("name"):
            item["name"] = m.name
        if m.tool_calls:
            item["tool_calls"] = [_tool_call_dict(c) for c in m.tool_calls]
        if m.HasField("tool_call_id"):
            item["tool_call_id"] = m.tool_call_id
        out.append(item)
    return out


def chat_tools(req: pb.ChatRequest | pb.CreateResponseRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    """OpenAI chat-shaped tools and tool_choice from the proto's (ChatRequest and CreateResponseRequest share them)."""
    tools = []
    for i, t in enumerate(req.tools):
        function: dict[str, Any] = {"name": t.function.name}
        if t.function.HasField("description"):
            function["description"] = t.function.description
        parameters = json_text_object(t.function.parameters, f"tools[{i}].function.parameters")
        if parameters is not None:
            function["parameters"] = parameters
        tools.append({"type": t.type or "function", "function": function})
    choice: Any = None
    if req.HasField("tool_choice"):
        which = req.tool_choice.WhichOneof("choice")
        if which == "mode":
            choice = req.tool_choice.mode
        elif which == "function_name":
            choice = {"type": "function", "function": {"name": req.tool_choice.function_name}}
    return tools or None, choice


def completion_input(req: pb.CompletionRequest) -> CompletionInput:
    has_text, has_ids = req.HasField("prompt"), req.HasField("prompt_token_ids")
    if has_text == has_ids:
        raise APIError("Give exactly one of 'prompt' and 'prompt_token_ids'.", "invalid_request", "prompt")
    prompt: str | list[int] = req.prompt if has_text else list(req.prompt_token_ids.ids)
    logprobs = opt(req, "logprobs")
    params = _generation_params(req, logprobs=logprobs, default_max_tokens=16, max_logprobs=5, prompt_param="prompt")
    add_special_tokens = opt(req, "add_special_tokens")
    return CompletionInput(opt(req, "model"), prompt, params, req.echo, True if add_special_tokens is None else add_special_tokens)


def chat_input(req: pb.ChatRequest) -> ChatInput:
    logprobs = chat_logprobs(req.logprobs, opt(req, "top_logprobs"))
    params = _generation_params(
        req, logprobs=logprobs, default_max_tokens=None, max_logprobs=20, prompt_param="messages", logprobs_param="top_logprobs"
    )
    add_generation_prompt = opt(req, "add_generation_prompt")
    tools, tool_choice = chat_tools(req)
    return ChatInput(
        opt(req, "model"),
        chat_messages(req.messages),
        params,
        add_generation_prompt=True if add_generation_prompt is None else add_generation_prompt,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=opt(req, "parallel_tool_calls"),
        add_special_tokens=bool(opt(req, "add_special_tokens")),
        template_kwargs=json_text_object(opt(req, "chat_template_kwargs") or "", "chat_template_kwargs"),
    )


# -- neutral -> wire ----------------------------------------------------------------------------------------


def token_logprobs(items: list[TokenLogprob] | None, num_top: int | None = None) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token=t.token,
            token_id=t.token_id,
            logprob=t.logprob,
            top_logprobs=[pb.TopLogprob(token=a.token, token_id=a.token_id, logprob=a.logprob) for a in t.top[:num_top]],
        )
        for t in items or ()
    ]


def prompt_logprobs(items: list[PromptLogprob | None] | None) -> list[pb.PromptLogprob]:
    """Prompt tokens 1, 2, ... (the first prompt token, which nothing precedes, has no entry)."""
    return [
        pb.PromptLogprob(
            token=t.token,
            token_id=t.token_id,
            logprob=t.logprob,
            rank=t.rank,
            top_logprobs=[pb.TopLogprob(token=a.token, token_id=a.token_id, logprob=a.logprob) for a in t.top],
        )
        for t in items or ()
        if t is not None
    ]


def stop_reason(reason: str | int | None) -> pb.StopReason | None:
    if reason is None:
        return None
    return pb.StopReason(stop_string=reason) if isinstance(reason, str) else pb.StopReason(stop_token_id=reason)


def usage(u: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens,
        cached_tokens=u.cached_tokens,
    )  # fmt: skip


def completion_choice(piece: PresentedChoice) -> pb.CompletionChoice:
    return pb.CompletionChoice(
        index=piece.index,
        text=piece.content or "",
        token_ids=piece.token_ids,
        logprobs=token_logprobs(piece.logprobs),
        finish_reason=piece.finish_reason or "",
        stop_reason=stop_reason(piece.stop_reason),
        prompt_logprobs=prompt_logprobs(piece.prompt_logprobs),
    )


def chat_choice(piece: PresentedChoice, num_top: int) -> pb.ChatChoice:
    """A whole choice or a streamed piece (the role goes with a choice's first piece)."""
    calls = [
        pb.ToolCall(
            index=c.index, id=c.id or "", type="function" if c.id is not None else "",
            function=pb.FunctionCall(name=c.name or "", arguments=c.arguments),
        )  # fmt: skip
        for c in piece.tool_calls
    ]
    return pb.ChatChoice(
        index=piece.index,
        role="assistant" if piece.is_first else "",
        content=piece.content or "",
        token_ids=piece.token_ids,
        logprobs=token_logprobs(piece.logprobs, num_top),
        finish_reason=piece.finish_reason or "",
        stop_reason=stop_reason(piece.stop_reason),
        tool_calls=calls,
        prompt_logprobs=prompt_logprobs(piece.prompt_logprobs),
        reasoning_content=piece.reasoning or "",
    )
