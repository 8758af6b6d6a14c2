"""Request.check_stop: the one place a sequence's end is decided, and the order its reasons win in."""

from __future__ import annotations

import pytest

from lmserve.engine.request import Request
from lmserve.types import FinishReason, SamplingParams

EOS = 2


class CompleteGrammar:
    """A matcher past its grammar's end (GrammarMatcher's `is_finished`), as llguidance reports it."""

    is_finished = True


def after(tokens: list[int], grammar: object | None = None, matched_stop: str | None = None, **params: object) -> Request:
    """A request with `tokens` appended one by one, checked after each, as Scheduler.update does."""
    req = Request("r", [100, 101], SamplingParams(**params), eos_token_ids=frozenset({EOS}))  # type: ignore[arg-type]
    req.grammar = grammar  # type: ignore[assignment]
    for i, token in enumerate(tokens):
        assert not req.is_finished, f"finished before token {i}"
        req.append_token(token)
        req.check_stop(matched_stop if i == len(tokens) - 1 else None)
    return req


@pytest.mark.parametrize(
    ("req", "expected"),
    [
        (after([5, 6], max_tokens=4), (False, None, None)),
        (after([5, 6, 7, 8], max_tokens=4), (True, FinishReason.LENGTH, None)),
        (after([5, EOS], max_tokens=4), (True, FinishReason.STOP, None)),
        (after([5, EOS], max_tokens=4, ignore_eos=True), (False, None, None)),
        (after([EOS], max_tokens=4, min_tokens=2), (False, None, None)),  # EOS counts from min_tokens on
        (after([9], max_tokens=4, stop_token_ids=(9,)), (True, FinishReason.STOP, 9)),
        (after([5], matched_stop="\n", max_tokens=4, min_tokens=3), (True, FinishReason.STOP, "\n")),
        # On one token: a stop string over EOS, EOS over a stop token id, both over max_tokens.
        (after([5, EOS], matched_stop="x", max_tokens=2), (True, FinishReason.STOP, "x")),
        (after([5, EOS], max_tokens=2, stop_token_ids=(EOS,)), (True, FinishReason.STOP, None)),
        (after([5, 9], max_tokens=2, stop_token_ids=(9,)), (True, FinishReason.STOP, 9)),
        # A complete grammar ends the sequence, unless max_tokens already did.
        (after([5], grammar=CompleteGrammar(), max_tokens=4), (True, FinishReason.STOP, None)),
        (after([5], grammar=CompleteGrammar(), max_tokens=1), (True, FinishReason.LENGTH, None)),
    ],
)
def test_check_stop_decides_the_end(req: Request, expected: tuple[bool, FinishReason | None, str | int | None]) -> None:
    assert (req.is_finished, req.finish_reason, req.stop_reason) == expected


def test_the_first_reason_stays() -> None:
    req = after([5, 6], max_tokens=2)
    req.finish(FinishReason.ABORT)  # an abort arriving after the end changes nothing
    assert (req.finish_reason, req.stop_reason) == (FinishReason.LENGTH, None)
