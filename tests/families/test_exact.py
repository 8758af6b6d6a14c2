"""Every family, native or through transformers' class: float32 greedy equals transformers' `generate` token
for token, alone (with prefix-cache hits) and batched with chunked prefill; on the native path bf16 does not
depend on the batch."""

from __future__ import annotations

import asyncio

import pytest

from lmserve.config import EngineConfig
from lmserve.engine.engine import NativeEngine
from lmserve.engine.modeling import families
from lmserve.checkpoints import CheckpointError
from lmserve.checkpoints.architectures import NATIVE_TYPES
from tests.engine.test_exactness import engine_greedy
from tests.families.conftest import Family
from tests.families.variants import GENERIC, NATIVE


def test_native_types_are_the_specs() -> None:
    assert NATIVE_TYPES == set(families.SPECS)


def _run(family: Family, concurrent: bool, **overrides) -> tuple[NativeEngine, list[list[int]]]:
    engine = NativeEngine.load(family.folder, family.name, EngineConfig(block_size=16, num_kv_blocks=96, **overrides))
    return engine, asyncio.run(engine_greedy(engine, family.prompts, concurrent))


@pytest.mark.parametrize("family", [*NATIVE, *GENERIC], indirect=True)
def test_float32_greedy_matches_transformers(family: Family) -> None:
    alone, got_alone = _run(family, concurrent=False, dtype="float32")
    assert alone.runner.architecture.path == ("native" if family.name in NATIVE else "transformers")
    assert alone.block_manager.num_prefix_hits > 0, "the chat prompts' shared system prompt should hit the cache"
    batched, got_batched = _run(family, concurrent=True, dtype="float32", max_num_batched_tokens=32)
    for i, expected in enumerate(family.expected):
        length = len(family.prompts[i])
        assert got_alone[i] == expected, f"{family.name}: prompt {i} ({length} tokens) diverged run alone"
        assert got_batched[i] == expected, f"{family.name}: prompt {i} ({length} tokens) diverged batched, chunked"
    assert len({tuple(t) for t in family.expected}) > 4, "the prompts should lead to different outputs"
    assert batched.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("family", list(NATIVE), indirect=True)
def test_bf16_greedy_does_not_depend_on_the_batch(family: Family) -> None:
    """Native families only: every kernel computes a row the same whatever the step holds (rotary from tables,
    attention one query row at a time, gemm.c by rows). transformers' modules, on the generic path, make no
    such promise (a vectorised cos rounds a step's tail elements apart)."""
    _, alone = _run(family, concurrent=False, dtype="bfloat16")
    _, batched = _run(family, concurrent=True, dtype="bfloat16", max_num_batched_tokens=32)
    for i, (a, b) in enumerate(zip(alone, batched, strict=True)):
        assert a == b, f"{family.name}: bf16 prompt {i} differs batched from alone"


@pytest.mark.parametrize("family", ["gemma2", "qwen3-moe"], indirect=True)
def test_model_impl_transformers_serves_a_native_family_exactly(family: Family) -> None:
    """--model-impl transformers: the generic path for a family that has a native spec (windows, soft-caps,
    experts through transformers' own modules), exact too."""
    engine, got = _run(family, concurrent=True, dtype="float32", max_num_batched_tokens=32, model_impl="transformers")
    assert engine.runner.architecture.family == f"{engine.runner.hf_config.model_type} (transformers)"
    assert got == family.expected


@pytest.mark.parametrize("family", ["cohere"], indirect=True)
def test_model_impl_native_refuses_a_family_without_a_spec(family: Family) -> None:
    with pytest.raises(CheckpointError, match=r"model_type='cohere'.*has no native implementation \(--model-impl native\)"):
        _run(family, concurrent=False, dtype="float32", model_impl="native")
