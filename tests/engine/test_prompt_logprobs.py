"""Prompt logprobs: each prompt token's score equals transformers' log_softmax over the prompt (float32, to
1e-4), computed over chunked prefill and past the prefix cache; batch-mates' greedy tokens do not change."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmserve.config import EngineConfig
from lmserve.engine.block_manager import BlockManager
from lmserve.engine.engine import NativeEngine
from lmserve.engine.prompt_logprobs import PromptLogprobRow
from lmserve.engine.request import Request
from lmserve.types import GenerationDelta, GenerationRequest, PromptLogprob, SamplingParams

NUM_TOP = 3
MAX_NEW_TOKENS = 4


def hf_scores(model_dir: Path, prompt: list[int]) -> tuple[torch.Tensor, list[int]]:
    """transformers' float32 log_softmax at every prompt position [len - 1, vocab], and its greedy tokens."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return logprobs, out[0, len(prompt) :].tolist()


async def run(engine: NativeEngine, requests: list[GenerationRequest]) -> list[list[GenerationDelta]]:
    async def one(request: GenerationRequest) -> list[GenerationDelta]:
        return [delta async for delta in engine.generate(request)]

    await engine.start()
    try:
        return list(await asyncio.gather(*(one(r) for r in requests)))
    finally:
        await engine.stop()


def check_scores(got: list[PromptLogprob | None], prompt: list[int], expected: torch.Tensor, num_top: int = NUM_TOP) -> None:
    assert len(got) == len(prompt) and got[0] is None
    for position, entry in enumerate(got[1:]):
        assert entry is not None
        row = expected[position]
        token_id = prompt[position + 1]
        assert entry.token_id == token_id
        assert entry.logprob == pytest.approx(row[token_id].item(), abs=1e-4)
        # Its rank, up to the tokens within 1e-4 of it (the two computations' rounding may order those apart).
        chosen = row[token_id]
        assert int((row > chosen + 1e-4).sum()) + 1 <= entry.rank <= int((row > chosen - 1e-4).sum()) + 1
        top_lp, top_ids = torch.topk(row, num_top)
        assert [t.logprob for t in entry.top] == pytest.approx(top_lp.tolist(), abs=1e-4)
        assert [t.token_id for t in entry.top][:1] == top_ids.tolist()[:1]  # the best; later ones may tie


def test_positions_to_score_resume_after_a_preemption_and_the_prefix_cache_waits() -> None:
    blocks = BlockManager(num_blocks=8, block_size=4)
    plain = Request("plain", list(range(10, 20)), SamplingParams())
    blocks.allocate(plain)
    plain.num_computed_tokens = 10
    blocks.cache_computed_blocks(plain)  # its two full blocks are cached now
    scored = Request("scored", list(range(10, 20)), SamplingParams(prompt_logprobs=1))
    assert scored.prompt_positions_to_score(0, 6) == range(0, 6)
    scored.prompt_logprobs.extend(PromptLogprobRow(t, -1.0, 1) for t in range(11, 17))
    # Preempted after its first chunk, it recomputes from 0: only positions 6.. are scored, up to the
    # prompt's next-to-last (the last one's logits pick the first output token).
    assert scored.prompt_positions_to_score(0, 10) == range(6, 9)
    assert blocks.can_allocate(scored) and scored.needs_prompt_logprobs
    blocks.allocate(scored)
    assert scored.num_computed_tokens == 0, "the prefix cache would have skipped unscored positions"
    blocks.free(scored)
    scored.prompt_logprobs.extend(PromptLogprobRow(t, -1.0, 1) for t in range(17, 20))
    assert not scored.needs_prompt_logprobs  # scored: a recompute may take cached blocks again
    blocks.allocate(scored)
    assert scored.num_computed_tokens == 8 and scored.prompt_positions_to_score(8, 10) == range(9, 9)


@pytest.mark.slow  # loads a model twice (the engine and transformers')
def test_prompt_logprobs_match_transformers(tiny_llama_dir: Path) -> None:
    """On a tiny random checkpoint; the bundled SmolLM2's scores are checked through the server
    (tests/api/test_prompt_logprobs.py)."""
    model_dir, name = tiny_llama_dir, "tiny_llama"
    # Chunks of 16 tokens: a 40-token prompt is scored over three steps, beside the other requests' steps.
    engine = NativeEngine.load(model_dir, name, EngineConfig(dtype="float32", block_size=16, max_num_batched_tokens=16))
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)[:40]
    expected, hf_tokens = hf_scores(model_dir, prompt)
    greedy = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    scored = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0, ignore_eos=True, prompt_logprobs=NUM_TOP)
    # The plain one first: its blocks enter the prefix cache, which the scored ones must not take (those
    # positions would have no hidden states); one asks for no top alternatives.
    first = asyncio.run(run(engine, [GenerationRequest(prompt, greedy, "plain")]))[0]
    runs = asyncio.run(
        run(
            engine,
            [
                GenerationRequest(prompt, scored, "scored"),
                GenerationRequest(prompt, greedy, "plain-again"),
                GenerationRequest(prompt, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), "bare"),
            ],
        )
    )
    with_scores, plain_again, bare = runs
    check_scores(with_scores[0].prompt_logprobs or [], prompt, expected)
    assert all(d.prompt_logprobs is None for d in with_scores[1:]), "prompt logprobs come on the first delta only"
    assert with_scores[0].num_cached_tokens == 0
    assert plain_again[0].num_cached_tokens > 0 and plain_again[0].prompt_logprobs is None
    bare_scores = bare[0].prompt_logprobs or []  # batched otherwise: equal to the tolerance, not bit for bit
    check_scores(bare_scores, prompt, expected, num_top=0)
    for deltas in (first, with_scores, plain_again):
        assert [t for d in deltas for t in d.token_ids] == hf_tokens
    assert engine.block_manager.num_used_blocks == 0
