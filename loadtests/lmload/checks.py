"""Checks of non-streamed response bodies: each returns None when the body is right, else what is wrong."""

from __future__ import annotations

import math
from typing import Any


def check_completion(data: Any, expected_tokens: int | None) -> str | None:
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
    if expected_tokens is not None and usage["completion_tokens"] != expected_tokens:
        return f"{usage['completion_tokens']} completion tokens, expected {expected_tokens}"
    return None


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
