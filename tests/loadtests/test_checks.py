"""Checks of non-streamed bodies: each finds what is wrong, and nothing in a right body."""

from __future__ import annotations

from lmload.checks import check_completion, check_detokenize, check_embeddings, check_tokenize, completion_ending
from lmload.options import LoadSettings
from lmload.outcome import Ending


def test_completion() -> None:
    good = {"choices": [{"index": 0, "text": "hi", "finish_reason": "length"}], "usage": {"completion_tokens": 8}}
    assert check_completion(good) is None
    assert "without finish_reason" in (check_completion({**good, "choices": [{"text": "hi"}]}) or "")
    assert "one choice" in (check_completion({"choices": []}) or "")
    assert "no usage" in (check_completion({**good, "usage": None}) or "")


def test_completion_ending() -> None:
    settings = LoadSettings(output_tokens=8)
    body = {"choices": [{"index": 0, "text": "hi", "finish_reason": "length"}], "usage": {"completion_tokens": 8}}
    assert completion_ending(body, settings) == Ending("length")
    body = {"choices": [{"index": 0, "text": "", "finish_reason": "content_filter"}], "usage": {"completion_tokens": 3}}
    assert completion_ending(body, settings).entry("completion") == "completion [content_filter]"
    body = {"choices": [{"index": 0, "text": "hi", "finish_reason": "length"}], "usage": {"completion_tokens": 7}}
    assert completion_ending(body, settings).problem == "truncated: 7 completion tokens, expected 8"


def test_embeddings() -> None:
    good = {"data": [{"index": 0, "embedding": [0.1, 0.2]}, {"index": 1, "embedding": [0.3, 0.4]}]}
    assert check_embeddings(good, 2) is None
    assert "expected 3 embeddings" in (check_embeddings(good, 3) or "")
    uneven = {"data": [{"index": 0, "embedding": [0.1, 0.2]}, {"index": 1, "embedding": [0.3]}]}
    assert "different sizes" in (check_embeddings(uneven, 2) or "")
    assert "non-finite" in (check_embeddings({"data": [{"index": 0, "embedding": [float("nan")]}]}, 1) or "")
    assert "has index 1" in (check_embeddings({"data": [{"index": 1, "embedding": [1.0]}]}, 1) or "")


def test_tokenize_round_trip() -> None:
    assert check_tokenize({"count": 2, "tokens": [5, 6]}) is None
    assert "count 3 but 2 tokens" in (check_tokenize({"count": 3, "tokens": [5, 6]}) or "")
    assert check_detokenize({"prompt": "<s> hello"}, "hello") is None
    assert "lost the text" in (check_detokenize({"prompt": "help"}, "hello") or "")
