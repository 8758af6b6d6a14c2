"""/tokenize, /detokenize and the Tokenization service: a prompt or chat messages to token ids and back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmserve.api.errors import APIError
from lmserve.api.models import require_model
from lmserve.api.prompts import chat_prompt, chat_template
from lmserve.api.tools import plan_tools

if TYPE_CHECKING:
    from lmserve.state import AppState


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
        plan = plan_tools(inp.tools, None, None, chat_template(state), state.config.tool_call_parser)
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
