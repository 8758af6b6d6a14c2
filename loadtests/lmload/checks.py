"""Checks of non-streamed response bodies: each returns None when the body is right, else what is wrong."""

from __future__ import annotations

import math
from typing import Any

from lmload.options import LoadSettings
from lmload.outcome import Ending


def check_completion(data: Any) -> str | None:
    """The body's form only; how it ended (finish_reason, token count) is outcome.judge_ending's question."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or len(choices) != 1:
        return f"expected one choice, got {choices!r:.80}"
    choice = choices[0]
    if not isinstance(choice, dict) or not isinstance(choice.get("text"), str):
        return f"choice without text: {choice!r:.80}"
    if not isinstance(choice.get("finish_reason"), str):
        return f"choice without finish_reason: {choice!r:.80}"
    usage = data.get("usage")
    if not isinstance(usage, dict) or not isinstance(usage.get("completion_tokens"), int):
        return f"no usage: {usage!r:.80}"
    return None


def completion_ending(data: Any, settings: LoadSettings) -> Ending:
    """How a completion body that passed check_completion (JSON, gRPC as a dict) ended."""
    return settings.ending(data["choices"][0]["finish_reason"], data["usage"]["completion_tokens"])


def check_embeddings(data: Any, num_inputs: int) -> str | None:
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list) or len(items) != num_inputs:
        return f"expected {num_inputs} embeddings, got {type(items).__name__} of {len(items) if isinstance(items, list) else '?'}"
    dims: set[int] = set()
    for i, item in enumerate(items):
        vector = item.get("embedding") if isinstance(item, dict) else None
        if not isinstance(vector, list) or not vector:
            return f"embedding {i} is not a non-empty list"
        if item.get("index") != i:
            return f"embedding {i} has index {item.get('index')!r}"
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in vector):
            return f"embedding {i} holds a non-number or non-finite value"
        dims.add(len(vector))
    if len(dims) != 1:
        return f"embeddings of different sizes: {sorted(dims)}"
    return None


def check_tokenize(data: Any) -> str | None:
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
        return f"no token ids: {data!r:.80}"
    if data.get("count") != len(tokens):
        return f"count {data.get('count')!r} but {len(tokens)} tokens"
    return None


def check_detokenize(data: Any, original: str) -> str | None:
    text = data.get("prompt") if isinstance(data, dict) else None
    if not isinstance(text, str):
        return f"no prompt text: {data!r:.80}"
    # A tokenizer may add special tokens (BOS) that decode to text around the original.
    if original not in text:
        return f"round trip lost the text: {original[:40]!r} -> {text[:60]!r}"
    return None
