"""Tiny checkpoints of every family (tests/families/variants.py), built once per session as real folders,
with transformers' float32 greedy outputs on a fixed set of prompts as the reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from lmserve.config import EngineConfig
from lmserve.engine.engine import NativeEngine
from tests.conftest import _build_tiny
from tests.engine.test_exactness import build_prompts, hf_greedy
from tests.families.variants import GENERIC, NATIVE

# Of test_exactness's sixteen prompts: chat ones sharing a long system prompt (prefix-cache hits), plain
# ones, and three long enough (40-80 tokens) to pass every sliding window and longrope's original length.
PROMPT_INDEXES = (0, 1, 2, 5, 9, 12, 13, 15)


@dataclass(frozen=True)
class Family:
    name: str
    folder: Path
    prompts: list[list[int]]
    expected: list[list[int]]  # transformers' float32 greedy tokens per prompt


_BUILT: dict[str, Family] = {}


def family_checkpoint(name: str, tmp_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Family:
    if name not in _BUILT:
        config = {**NATIVE, **GENERIC}[name]()
        folder = _build_tiny(tmp_factory.mktemp(f"family-{name}"), config, smollm2_dir)
        probe = NativeEngine.load(folder, name, EngineConfig(dtype="float32", num_kv_blocks=16))
        prompts = [build_prompts(probe)[i] for i in PROMPT_INDEXES]
        _BUILT[name] = Family(name, folder, prompts, hf_greedy(folder, prompts, probe.eos_token_ids))
    return _BUILT[name]


@pytest.fixture(scope="module")
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Family:
    return family_checkpoint(request.param, tmp_path_factory, smollm2_dir)
