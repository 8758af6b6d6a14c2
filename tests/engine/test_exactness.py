"""Greedy decoding must produce exactly transformers' `generate` tokens in float32, however batched; in bf16 it
must produce the same tokens whatever the batch."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmserve.config import EngineConfig
from lmserve.engine.engine import NativeEngine
from lmserve.engine.modeling.forward_path import ForwardPath
from lmserve.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.slow  # every case loads a model and generates for sixteen prompts, checked against transformers' generate

SYSTEM = (
    "You are a careful assistant for a team that serves language models. Answer briefly and plainly, "
    "and say so when you do not know."
)
QUESTIONS = [
    "Hi",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a KV cache is in one sentence.",
    "Why is the sky blue? " * 6,
    "Translate 'good morning' into German.",
    "2+2=",
    "Name a colour.",
    "Summarise the plot of a detective story in which the butler did it, with a twist at the end. " * 3,
    "How many legs does a spider have?",
    "Tell me a joke about computers.",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, " * 8,
    "What is 17 times 3?",
    "Give me a word that rhymes with cat.",
]
MAX_NEW_TOKENS = 20


def build_prompts(engine: NativeEngine) -> list[list[int]]:
    """Sixteen prompts of mixed lengths; the chat ones share a long system prompt (prefix-cache hits)."""
    prompts = []
    for i, question in enumerate(QUESTIONS):
        if i % 2 == 0 and engine.tokenizer.has_chat_template:
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
            prompts.append(engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        else:
            prompts.append(engine.tokenizer.encode(question))
    return prompts


def hf_greedy(model_dir: Path, prompts: list[list[int]], eos_ids: frozenset[int]) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=sorted(eos_ids),
                pad_token_id=sorted(eos_ids)[0],
            )
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs


async def engine_greedy(engine: NativeEngine, prompts: list[list[int]], concurrent: bool) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0)

    async def one(i: int, prompt: list[int]) -> list[int]:
        tokens: list[int] = []
        async for delta in engine.generate(GenerationRequest(prompt, params, f"p{i}")):
            tokens.extend(delta.token_ids)
        return tokens

    await engine.start()
    try:
        if concurrent:
            return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
        return [await one(i, p) for i, p in enumerate(prompts)]
    finally:
        await engine.stop()


CASES = {
    # name: (engine overrides, run all prompts at once)
    "alone": (dict(), False),
    "all_at_once": (dict(), True),
    "all_at_once_no_prefix_cache": (dict(enable_prefix_caching=False), True),
    "chunked_prefill": (dict(max_num_batched_tokens=32), True),
    "tiny_pool_preempts": (dict(num_kv_blocks="tiny", max_num_batched_tokens=64), True),
    # The torch-ops fallback of the C paged-attention kernel (the default path) must be exact too.
    "torch_attention_chunked": (dict(attention="torch", max_num_batched_tokens=32), True),
    # Prompt-lookup speculative decoding verifies drafts in the same step: the tokens must not change, batched
    # with other drafting and plain decodes, in small steps, and when preempted and recomputed.
    "speculative": (dict(speculative_tokens=4, prompt_lookup_min=1), True),
    "speculative_tiny_pool_preempts": (
        dict(speculative_tokens=3, prompt_lookup_min=1, num_kv_blocks="tiny", max_num_batched_tokens=48),
        True,
    ),
}


@pytest.fixture(scope="module", params=["smollm2", "tiny_llama", "tiny_qwen2"])
def checkpoint(request: pytest.FixtureRequest) -> tuple[str, Path, list[list[int]], list[list[int]]]:
    model_dir: Path = request.getfixturevalue(f"{request.param}_dir")
    probe = NativeEngine.load(model_dir, request.param, EngineConfig(dtype="float32", num_kv_blocks=64))
    prompts = build_prompts(probe)
    expected = hf_greedy(model_dir, prompts, probe.eos_token_ids)
    return request.param, model_dir, prompts, expected


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(checkpoint, case: str) -> None:
    name, model_dir, prompts, expected = checkpoint
    overrides, concurrent = CASES[case]
    overrides = dict(overrides)
    block_size = 16
    if overrides.get("num_kv_blocks") == "tiny":
        # Room for the longest request plus a couple of blocks: sixteen at once must preempt.
        longest = max(len(p) for p in prompts) + MAX_NEW_TOKENS
        overrides["num_kv_blocks"] = math.ceil(longest / block_size) + 2
    config = EngineConfig(dtype="float32", block_size=block_size, **overrides)
    engine = NativeEngine.load(model_dir, name, config)
    got = asyncio.run(engine_greedy(engine, prompts, concurrent))
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"{name}/{case}: prompt {i} ({len(prompts[i])} tokens) diverged"
    assert engine.block_manager.num_used_blocks == 0, "blocks leaked after every request finished"
    if case.endswith("tiny_pool_preempts"):
        assert engine.scheduler.num_preemptions_total > 0, "the pool was meant to force preemption"
    if case.startswith("speculative") and name == "smollm2":  # the random-weight models rarely repeat a prompt
        stats = engine.stats()
        assert 0 < stats.num_accepted_tokens_total < stats.num_draft_tokens_total, "drafts both kept and rejected"
    if case == "all_at_once" and name == "smollm2":
        assert engine.block_manager.num_prefix_hits > 0, "the shared system prompt should hit the prefix cache"
    if case == "alone":
        # Run alone, later chat prompts reuse the system prompt's cached blocks.
        assert engine.block_manager.num_prefix_hits > 0


@pytest.mark.usefixtures("gemm_kernels")  # decoder.c runs where gemm.c does (AVX-512 BF16, no AMX)
def test_bf16_greedy_does_not_depend_on_the_batch(smollm2_dir: Path) -> None:
    """bf16 on this CPU runs decoder.c's one-call layers. Every row's arithmetic there is its own (gemm rows,
    norms, one attention item per query and KV head), so greedy outputs must not depend on what else is in
    the step: alone, all at once with small prefill chunks, and with a pool so small that requests are
    preempted and recomputed."""
    base = NativeEngine.load(smollm2_dir, "smollm2", EngineConfig(dtype="bfloat16", num_kv_blocks=256))
    assert base.runner.forward_path is ForwardPath.DECODER_STACK
    prompts = build_prompts(base)
    alone = asyncio.run(engine_greedy(base, prompts, concurrent=False))
    longest = max(len(p) for p in prompts) + MAX_NEW_TOKENS
    for overrides in (dict(max_num_batched_tokens=40), dict(num_kv_blocks=math.ceil(longest / 16) + 2, max_num_batched_tokens=64)):
        engine = NativeEngine.load(smollm2_dir, "smollm2", EngineConfig(dtype="bfloat16", **overrides))
        got = asyncio.run(engine_greedy(engine, prompts, concurrent=True))
        for i, (g, e) in enumerate(zip(got, alone, strict=True)):
            assert g == e, f"{overrides}: prompt {i} ({len(prompts[i])} tokens) diverged from its run alone"
        assert len({tuple(t) for t in alone}) > 8  # the prompts lead to different outputs
    assert engine.scheduler.num_preemptions_total > 0, "the small pool was meant to force preemption"
