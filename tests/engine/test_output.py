"""SequenceOutput: a sampled token's text and stop-string match inside the scheduler's update, its delta
after, carrying the finish the request got there."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve.engine.block_manager import BlockManager
from lmserve.engine.output import SequenceOutput
from lmserve.engine.request import Request
from lmserve.engine.sampler import SampledToken
from lmserve.engine.scheduler import Scheduler
from lmserve.tokenizer import Tokenizer
from lmserve.types import FinishReason, SamplingParams


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_folder(smollm2_dir)


def run(tokenizer: Tokenizer, text: str, params: SamplingParams) -> list[tuple[str, FinishReason | None, str | int | None]]:
    """Feed `text`'s tokens through take -> update -> delta, one step each; (text, finish, stop) per delta."""
    scheduler = Scheduler(BlockManager(16, 16, False), 4, 64, 256)
    req = Request("r", tokenizer.encode("Say:"), params, tokenizer.eos_token_ids)
    output = SequenceOutput(tokenizer, req, "ext")
    scheduler.add_request(req)
    deltas = []
    for token_id in tokenizer.encode(text):
        scheduled = scheduler.schedule()
        sampled = SampledToken(token_id, None)
        scheduler.update(scheduled, {"r": [token_id]}, lambda _, token: output.take(token))
        delta = output.delta(req, [sampled])
        assert delta.request_id == "ext" and delta.token_ids == [token_id]
        deltas.append((delta.text, delta.finish_reason, delta.stop_reason))
        if req.is_finished:
            break
    return deltas


def test_a_stop_string_ends_the_sequence_and_is_cut(tokenizer: Tokenizer) -> None:
    deltas = run(tokenizer, "one two. three four", SamplingParams(max_tokens=10, stop=(". th",)))
    assert "".join(d[0] for d in deltas) == "one two"
    assert deltas[-1][1:] == (FinishReason.STOP, ". th")
    assert all(d[1] is None for d in deltas[:-1])


def test_text_held_for_a_stop_string_is_released_when_max_tokens_ends_it(tokenizer: Tokenizer) -> None:
    num_tokens = len(tokenizer.encode("one two."))
    deltas = run(tokenizer, "one two. three", SamplingParams(max_tokens=num_tokens, stop=(". th",)))
    assert len(deltas) == num_tokens
    assert "".join(d[0] for d in deltas) == "one two."  # the "." held back as a possible ". th", then flushed
    assert deltas[-1][1:] == (FinishReason.LENGTH, None)
