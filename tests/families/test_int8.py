"""`--quantization int8` on the native families beyond Llama's shape (sliding windows with soft-capping, per-head
q/k norms, plain MLPs with LayerNorm and Conv1D weights, experts): the quantized runner runs each family, under
float32 activations (qgemm.c) and, where the CPU has AVX-512 VNNI and BF16, under bf16 ones (qgemm_vnni.c),
whichever forward path the family takes, and its last hidden state stays correlated with the unquantized
runner's. Loosely: these tiny random models attend almost one-hot, so int8's ~1% per projection can grow to
tens of percent after two layers (the same for Llama's shape, and for qgemm.c), where a wrong layout, scale or
path gives an unrelated state (a relative error near 1.4). Quantization's quality is measured on the bundled
model (benchmarks/perplexity.py, tests/test_quantization.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmserve.config import EngineConfig
from lmserve.engine.modeling import kernel_cache
from lmserve.engine.modeling.attention import SeqLayout
from lmserve.engine.runner import ModelRunner
from tests.families.conftest import Family

FAMILIES = ["gemma2", "qwen3", "gpt2", "mixtral", "mistral-window"]
DTYPES = [
    "float32",
    pytest.param(
        "bfloat16", marks=pytest.mark.skipif(not kernel_cache.cpu_has_int8_bf16(), reason="no AVX-512 VNNI and BF16 here")
    ),
]


@torch.inference_mode()
def last_hidden(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    """The last hidden state of a prompt: its first part prefilled, the rest one token a step over the KV cache."""
    split = len(ids) - 3
    blocks = list(range(-(-len(ids) // runner.kv_spec.block_size)))
    meta = runner.attention_metadata([SeqLayout(0, split, 0, blocks)])
    hidden = runner.forward(torch.tensor(ids[:split]), torch.arange(split), meta)
    for pos in range(split, len(ids)):
        meta = runner.attention_metadata([SeqLayout(0, 1, pos, blocks)])
        hidden = runner.forward(torch.tensor(ids[pos : pos + 1]), torch.tensor([pos]), meta)
    return hidden[-1].float()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES, indirect=True)
def test_int8_runs_every_family_near_the_unquantized_model(family: Family, dtype: str, cache_dir: Path) -> None:
    config = dict(dtype=dtype, num_kv_blocks=16, cache_dir=cache_dir)
    ids = max(family.prompts, key=len)
    plain = last_hidden(ModelRunner(family.folder, EngineConfig(**config)), ids)
    int8_runner = ModelRunner(family.folder, EngineConfig(quantization="int8", **config))
    assert int8_runner.packed_weights.startswith("int8")
    quantized = last_hidden(int8_runner, ids)
    error = ((quantized - plain).norm() / plain.norm()).item()
    assert 0 < error < 0.5, (family.name, dtype, error, int8_runner.forward_path)
