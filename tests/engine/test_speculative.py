"""Prompt lookup's drafts, and the verification that keeps speculative decoding exact: greedy keeps the
argmax prefix, sampling (rejection with a point-mass proposal) keeps the model's own distribution."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import torch

from lmserve.config import EngineConfig
from lmserve.engine.engine import NativeEngine
from lmserve.engine.prompt_lookup import PromptLookup
from lmserve.engine.request import Request
from lmserve.engine.speculative import reject_sample, verify
from lmserve.types import ConstraintKind, GenerationRequest, SamplingParams, StructuredOutput


def test_lookup_proposes_what_followed_the_latest_earlier_match() -> None:
    lookup = PromptLookup(min_n=1, max_n=3)
    tokens = [5, 6, 7, 8, 9, 1, 6, 7, 3, 4, 6, 7]
    # Suffix (3, 4, 6, 7)... the longest earlier match is the 2-gram (6, 7): latest at 6..7, followed by 3, 4.
    assert lookup.propose(tokens, 2) == [3, 4]
    assert lookup.propose(tokens, 10) == [3, 4, 6, 7]  # up to the end of the sequence
    tokens += [3, 4]  # now the suffix (6, 7, 3, 4) ... the 3-gram (7, 3, 4) was seen at 7..9
    assert lookup.propose(tokens, 3) == [6, 7, 3]


def test_lookup_prefers_the_longest_ngram_and_respects_min_n() -> None:
    tokens = [1, 2, 3, 9, 0, 2, 3, 5, 0, 2, 3]
    assert PromptLookup(1, 3).propose(tokens, 1) == [5]  # (0, 2, 3) at 4..6 beats (2, 3) at 1..2's 9
    assert PromptLookup(2, 2).propose(tokens, 1) == [5]  # the latest (2, 3)
    assert PromptLookup(2, 4).propose([1, 2, 3, 4], 3) == []  # nothing repeats
    assert PromptLookup(1, 4).propose([7], 3) == []
    assert PromptLookup(1, 4).propose([1, 2, 1], 0) == []


def _request(params: SamplingParams) -> Request:
    return Request("r", [1, 2, 3], params)


def test_greedy_verification_keeps_the_argmax_prefix_and_the_token_after() -> None:
    vocab = 8
    logits = torch.full((4, vocab), -5.0)
    for row, best in enumerate([3, 4, 1, 6]):
        logits[row, best] = 5.0
    greedy = _request(SamplingParams(max_tokens=16, temperature=0.0))
    plain = _request(SamplingParams(max_tokens=16, temperature=0.0))
    # Drafts 3, 4 match rows 0 and 1; draft 2 is not row 2's argmax (1), which replaces it.
    kept = verify(torch.cat([logits, logits[:1]]), [(greedy, [3, 4, 2]), (plain, [])], [None, None])
    assert [[t.token_id for t in toks] for toks in kept] == [[3, 4, 1], [3]]
    all_right = verify(logits, [(greedy, [3, 4, 1])], [None])
    assert [t.token_id for t in all_right[0]] == [3, 4, 1, 6]  # every draft kept, plus the bonus token


def test_rejection_sampling_keeps_the_models_distribution() -> None:
    """Over many draws with a fixed draft, the first kept token is distributed as the model's softmax (and,
    when the draft was accepted, the next one as the next row's), checked by a chi-square test."""
    torch.manual_seed(0)
    vocab = 6
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5], [0.0, 2.0, 0.0, 1.0, 0.0, -2.0]])
    params = SamplingParams(max_tokens=16, temperature=0.8)
    req = _request(params)
    expected = torch.softmax(logits / 0.8, dim=-1)
    generator = torch.Generator().manual_seed(1234)
    num_draws = 20000
    first = torch.zeros(vocab)
    second = torch.zeros(vocab)
    for _ in range(num_draws):
        tokens = reject_sample(logits, req, [5], generator)  # draft 5: probable, not the mode
        first[tokens[0]] += 1
        if len(tokens) == 2:
            assert tokens[0] == 5
            second[tokens[1]] += 1
    for counts, probs in ((first, expected[0]), (second, expected[1])):
        total = counts.sum()
        chi2 = float((((counts - total * probs) ** 2) / (total * probs)).sum())
        assert chi2 < 20.5, f"chi-square {chi2:.1f} over {vocab - 1} degrees of freedom (p < 0.001)"
    assert 0.2 < second.sum() / num_draws < 0.35  # the draft's own probability, about 0.27


def test_a_seeded_request_draws_the_same_tokens_again() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(7))
    req = _request(SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9))
    runs = [reject_sample(logits, req, [4, 9], torch.Generator().manual_seed(42)) for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.slow
def test_the_server_default_speculates_and_stops_where_plain_decoding_stops(smollm2_dir: Path) -> None:
    """EngineConfig.speculative_tokens drafts for requests that leave speculative_tokens unset, and only for
    them; a stop string or max_tokens reached inside a run of accepted drafts ends the output exactly where
    plain decoding ends it (the drafts after it are dropped)."""
    engine = NativeEngine.load(smollm2_dir, "smollm2", EngineConfig(dtype="float32", num_kv_blocks=64, speculative_tokens=4))
    prompt = engine.tokenizer.encode(f"Repeat this sentence word for word.\n\n{SENTENCE}\n\nRepeated:\n\n")

    async def run(**params: object) -> tuple[list[int], str, str | None]:
        sampling = SamplingParams(temperature=0.0, **params)  # type: ignore[arg-type]
        tokens, text, finish = [], "", None
        async for delta in engine.generate(GenerationRequest(prompt, sampling, "r")):
            tokens += delta.token_ids
            text += delta.text
            finish = delta.finish_reason
        return tokens, text, finish and finish.value

    async def main() -> list[tuple[object, ...]]:
        await engine.start()
        try:
            out = []
            for params in (dict(max_tokens=40), dict(max_tokens=7), dict(max_tokens=40, stop=("budget",))):
                before = engine.stats().num_draft_tokens_total
                plain = await run(speculative_tokens=0, **params)
                assert engine.stats().num_draft_tokens_total == before  # 0: off, whatever the default
                out.append((plain, await run(**params), engine.stats().num_draft_tokens_total - before))
            return out
        finally:
            await engine.stop()

    results = asyncio.run(main())
    for plain, default, num_drafted in results:
        assert default == plain and num_drafted > 0
    assert "budget" not in plain[1] and plain[2] == "stop"
    plain_text = results[0][0][1]  # max_tokens 40, no stop

    # In one step with a drafting request, a constrained request's mask goes to its own row (the rows after
    # a drafting request's share are shifted by its drafts): its text matches the pattern and its run alone.
    constrained = SamplingParams(temperature=0.0, max_tokens=12, structured=StructuredOutput(ConstraintKind.REGEX, r"[0-9]{3}-[a-z]{2,4}"))
    question = engine.tokenizer.encode("Give me a code:")

    async def collect(sampling: SamplingParams, ids: list[int], rid: str) -> str:
        return "".join([d.text async for d in engine.generate(GenerationRequest(ids, sampling, rid))])

    async def together() -> tuple[str, str, str, str]:
        await engine.start()
        try:
            alone = await collect(constrained, question, "c0")
            drafting = SamplingParams(temperature=0.0, max_tokens=40, speculative_tokens=4)
            first, second, third = await asyncio.gather(
                collect(drafting, prompt, "d1"), collect(constrained, question, "c1"), collect(drafting, prompt, "d2")
            )
            return alone, first, second, third
        finally:
            await engine.stop()

    alone, first, second, third = asyncio.run(together())
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", second) and second == alone
    assert first == third == plain_text


SENTENCE = "The committee met on Tuesday to review the budget for the new library and the archive."
