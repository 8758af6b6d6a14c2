"""A sliding window on the paged cache: a long request holds only the blocks its window spans (read from the
block manager at every step), and its output stays exactly transformers'."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmserve.config import EngineConfig
from lmserve.engine.engine import NativeEngine
from lmserve.engine.scheduler import SchedulerOutput
from lmserve.types import GenerationRequest, SamplingParams
from tests.families.conftest import family_checkpoint
from tests.families.variants import WINDOW

BLOCK_SIZE = 4
NEW_TOKENS = 48


@pytest.mark.parametrize("name", ["mistral-window", "starcoder2"])  # every layer has the window
def test_blocks_behind_the_window_are_released(
    name: str, tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path
) -> None:
    family = family_checkpoint(name, tmp_path_factory, smollm2_dir)
    prompt = max(family.prompts, key=len)  # about 80 tokens: ten windows
    engine = NativeEngine.load(
        family.folder, name, EngineConfig(dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=64)
    )
    assert engine.block_manager.sliding_window == WINDOW
    held: list[tuple[int, int]] = []  # (tokens computed, blocks in use) before each step

    def observe(scheduled: SchedulerOutput) -> None:
        for item in scheduled.scheduled:
            held.append((item.request.num_computed_tokens, engine.block_manager.num_used_blocks))

    engine.runner.fault_hook = observe

    async def run() -> list[int]:
        await engine.start()
        try:
            params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
            tokens: list[int] = []
            async for delta in engine.generate(GenerationRequest(prompt, params, "long")):
                tokens.extend(delta.token_ids)
            return tokens
        finally:
            await engine.stop()

    got = asyncio.run(run())
    decode_steps = [blocks for computed, blocks in held if computed > len(prompt)]
    assert len(decode_steps) >= NEW_TOKENS - 2
    bound = -(-(WINDOW + 1) // BLOCK_SIZE) + 1  # the window and the newest token, across a block boundary
    assert max(decode_steps) <= bound, f"{name}: {max(decode_steps)} blocks held at once, the window needs {bound}"
    assert -(-(len(prompt) + NEW_TOKENS) // BLOCK_SIZE) > 4 * bound  # without release it would hold far more

    model = AutoModelForCausalLM.from_pretrained(family.folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt):].tolist()  # fmt: skip
    assert got == expected
