"""gemm.c's lora_bf16 (runs of rows, each by its own slot's LoRA factors) against torch, and decoder.c adding
the updates inside its one call: the same tokens as the layer-by-layer path, on a bf16 model whose head size
the stack takes, with bf16 weights and with int8 ones. Those are skipped, with gemm.c's or qgemm_vnni.c's
reason, on CPUs without AVX-512 BF16 (VNNI); there bf16 LoRA runs as torch ops, and float32's exactness is
tests/api/test_lora.py's. Adapters over float32 activations with int8 weights run everywhere."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from lmserve.config import EngineConfig
from lmserve.engine.engine import NativeEngine
from lmserve.engine.modeling import gemm
from lmserve.engine.modeling.kernel_cache import cpu_has_int8_bf16
from lmserve.engine.modeling.forward_path import ForwardPath
from lmserve.types import GenerationRequest, SamplingParams
from tests.checkpoints.lora_adapters import save_random_lora
from tests.conftest import SMOLLM2_VOCAB_SIZE, _build_tiny


@pytest.mark.parametrize("width, in_features, out_features, rows", [(48, 576, 960, 16), (16, 1536, 576, 7), (32, 64, 3072, 40)])
def test_lora_bf16_adds_each_runs_own_update(gemm_kernels, width: int, in_features: int, out_features: int, rows: int) -> None:
    torch.manual_seed(width + rows)
    num_slots = 3
    a = (torch.randn(num_slots * width, in_features) * 0.1).bfloat16()
    b = (torch.randn(num_slots * width, out_features) * 0.1).bfloat16()  # B transposed, [width, out] per slot
    a_packed = torch.stack([gemm.pack_lora_a(a[s * width : (s + 1) * width]) for s in range(num_slots)])
    b_packed = torch.stack(
        [gemm.pack_weight(b[s * width : (s + 1) * width].t().contiguous()).data.flatten() for s in range(num_slots)]
    )
    x = torch.randn(rows, in_features).bfloat16()
    y = torch.randn(rows, out_features).bfloat16()
    # Runs of uneven lengths over the slots, rows of no run (the base's) in between.
    middle = 4 + (rows - 5) // 2
    runs = [(0, 3, 2), (4, middle, 0), (middle, rows - 1, 1)]
    scales = [2.0, 0.5, 1.25]
    expected = y.float().clone()
    for (first, end, slot), scale in zip(runs, scales, strict=True):
        block = slice(slot * width, (slot + 1) * width)
        shrunk = (x[first:end].float() @ a[block].float().t() * scale).bfloat16().float()
        expected[first:end] += shrunk @ b[block].float()
    gemm.lora_bf16(
        x, y, torch.tensor(runs, dtype=torch.int64), torch.tensor(scales), a_packed, b_packed, width
    )
    untouched = [3, rows - 1]
    assert torch.equal(y[untouched].float(), expected[untouched])
    torch.testing.assert_close(y.float(), expected, atol=0.05 * expected.abs().max().item(), rtol=0.02)


@pytest.fixture(scope="module")
def stack_model(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> tuple[Path, dict[str, Path]]:
    """A tiny bf16-servable Llama with 64-wide heads (decoder.c's sizes) and three adapters."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=128, num_attention_heads=2, num_key_value_heads=1, intermediate_size=256, num_hidden_layers=2,
        vocab_size=SMOLLM2_VOCAB_SIZE, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    base = _build_tiny(tmp_path_factory.mktemp("stack-base"), config, smollm2_dir)
    root = tmp_path_factory.mktemp("stack-adapters")
    targets = (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], ["down_proj"])
    adapters = {
        f"s{i}": save_random_lora(base, root / f"s{i}", r=16, alpha=32, targets=t, seed=20 + i) for i, t in enumerate(targets)
    }
    return base, adapters


def _generate(engine: NativeEngine, loras: list[str | None]) -> list[list[int]]:
    async def run() -> list[list[int]]:
        await engine.start()

        async def one(i: int, lora: str | None) -> list[int]:
            prompt = [1, *range(400 + 9 * i, 430 + 9 * i)]
            request = GenerationRequest(prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), str(i), lora=lora)
            return [t async for d in engine.generate(request) for t in d.token_ids]

        try:
            return await asyncio.gather(*(one(i, lora) for i, lora in enumerate(loras)))
        finally:
            await engine.stop()

    return asyncio.run(run())


@pytest.mark.slow
def test_decoder_stack_adds_the_updates_as_the_layers_do(gemm_kernels, stack_model, tmp_path: Path) -> None:
    base, adapters = stack_model
    config = EngineConfig(dtype="bfloat16", device="cpu", num_kv_blocks=64, cache_dir=tmp_path,
                          lora_modules=tuple(adapters.items()), max_loras=2)  # fmt: skip
    engine = NativeEngine.load(base, "base", config)
    runner = engine.runner
    assert runner.forward_path is ForwardPath.DECODER_STACK and runner.model.stack_runs_loras()
    loras = [None, "s0", "s1", "s2", "s1", None, "s0", "s2"]
    stacked = _generate(engine, loras)
    runner._forward_lora = runner.model.forward_fused  # the layer-by-layer path, each projection adding its rows'
    layered = _generate(engine, loras)
    assert stacked == layered
    assert stacked[2] != _generate(engine, [None, None, None])[2], "the adapter changed nothing"


@pytest.mark.parametrize(
    "dtype",
    [
        "float32",  # int8 weights under float32 activations (qgemm.c): adapter steps run layer by layer
        pytest.param(
            "bfloat16", marks=pytest.mark.skipif(not cpu_has_int8_bf16(), reason="no AVX-512 VNNI and BF16 here")
        ),  # qgemm_vnni.c's int8 weights in decoder.c's stack, the adapters' updates added inside it
    ],
)
@pytest.mark.slow
def test_adapters_over_int8_weights(stack_model, tmp_path: Path, dtype: str) -> None:
    """--quantization int8 with adapters: the base projections stay int8 (their kernels), the updates are
    added to their output; in the bf16 stack the same tokens as layer by layer, and the adapters matter."""
    base, adapters = stack_model
    config = EngineConfig(dtype=dtype, device="cpu", quantization="int8", num_kv_blocks=64, cache_dir=tmp_path,
                          lora_modules=tuple(adapters.items()), max_loras=2)  # fmt: skip
    engine = NativeEngine.load(base, "base", config)
    runner = engine.runner
    assert runner.model.quantized()
    loras = [None, "s0", "s1", "s2", "s1", None]
    outputs = _generate(engine, loras)
    if dtype == "bfloat16":
        assert runner.forward_path is ForwardPath.DECODER_STACK and runner.model.stack_runs_loras()
        runner._forward_lora = runner.model.forward_fused
        assert _generate(engine, loras) == outputs
    assert outputs[2] != _generate(engine, [None, None, None])[2], "the adapter changed nothing"
