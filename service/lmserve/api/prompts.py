"""A request's prompts as the model gets them: completion prompts (texts screened then tokenized, or
token arrays as sent), chat messages screened and rendered with the chat template, and the echo texts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmserve.api.admission import Caller
from lmserve.api.errors import APIError
from lmserve.api.screening import screen_input

if TYPE_CHECKING:
    from lmserve.state import AppState

# Keys the chat template fills itself; a client's chat_template_kwargs may not override them.
CHAT_TEMPLATE_RESERVED = frozenset(
    {"messages", "conversation", "tools", "documents", "add_generation_prompt", "tokenize", "return_dict"}
)

Prompt = str | list[str] | list[int] | list[list[int]]


def prompt_items(prompt: Prompt) -> list[str] | list[list[int]]:
    """A completion's prompt as a list of prompts: strings or token arrays ([] is one empty prompt)."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return prompt  # type: ignore[return-value]


def completion_prompts(
    state: AppState, caller: Caller, items: list[str] | list[list[int]], add_special_tokens: bool = True
) -> list[list[int]]:
    """Each prompt's token ids: texts screened, then tokenized; token arrays as sent (checked against the
    vocabulary by the plan, then screened as their text: api/generation_call.py)."""
    if items and isinstance(items[0], str):
        if any(not p.strip() for p in items):  # type: ignore[union-attr]
            raise APIError("The prompt must contain text other than whitespace.", "invalid_value", "prompt")
        texts = screen_input(state, caller, list(items), "prompt")  # type: ignore[arg-type]
        return [state.tokenizer.encode(p, add_special_tokens=add_special_tokens) for p in texts]
    return [list(p) for p in items]  # type: ignore[arg-type]


def echo_texts(state: AppState, prompt: Prompt, prompts: list[list[int]]) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], str):
        return list(prompt)  # type: ignore[arg-type]
    return [state.tokenizer.decode(ids, skip_special_tokens=False) for ids in prompts]


def screened_messages(state: AppState, caller: Caller, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages with their content as the safety filter lets the model see it."""
    contents = [str(m.get("content") or "") for m in messages]
    screened = screen_input(state, caller, contents, "messages")
    return [
        m if text == (m.get("content") or "") else {**m, "content": text}
        for m, text in zip(messages, screened, strict=True)
    ]


def chat_template(state: AppState) -> str | None:
    template = getattr(state.tokenizer.hf_tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None


def chat_prompt(
    state: AppState,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any] | None,
    add_special_tokens: bool = False,
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
            messages, add_generation_prompt=add_generation_prompt, tools=tools, add_special_tokens=add_special_tokens, **kwargs
        )
    except TokenizerError as exc:
        raise APIError(str(exc), "invalid_value", "messages") from None

