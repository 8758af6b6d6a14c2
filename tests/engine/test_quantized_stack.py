"""The quantized float32 path (--quantization int8, q4_1, q8_0): the decoder stack in one C call
(decoder.c's decoder_stack_f32q) against the layer-by-layer path with the same weights, bit for bit, and that
path's float32 fused ops against the torch expressions they replace. On the build for this CPU and on the
portable one (plain C products)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmserve.config import EngineConfig
from lmserve.engine.modeling import fused_ops, layer_stack, qgemm
from lmserve.engine.modeling.forward_path import ForwardPath, choose_forward_path
from lmserve.engine.modeling.layers import rotate_half
from lmserve.engine.runner import ModelRunner
from tests.checkpoints.gguf_model import gguf_blocks_of
from tests.engine.forward_steps import MIXED_STEPS, forward_steps

F32 = torch.float32
CPU = torch.device("cpu")
_needs_kernels = pytest.mark.usefixtures("kernels")


@_needs_kernels
def test_float32_fused_ops_match_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(7, 100, generator=gen).mul(4) for _ in range(2))  # 100: not a multiple of 8
    weight = torch.randn(100, generator=gen)
    expected_residual = residual + x
    got = fused_ops.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(residual, expected_residual)  # the add in place, as torch adds
    # the sum of squares in another order, 1 / sqrt for rsqrt: a few ulp
    torch.testing.assert_close(got, F.rms_norm(expected_residual, (100,), weight, 1e-5), rtol=1e-5, atol=1e-6)

    gate_up = torch.randn(5, 2 * 72, generator=gen).mul(3)
    gate, up = gate_up.split(72, dim=-1)
    torch.testing.assert_close(fused_ops.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-6)


@_needs_kernels
def test_float32_rope_and_cache_gives_torchs_bits() -> None:
    heads, kv_heads, head_dim, rows = 4, 2, 16, 3
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=gen)
    angles = torch.rand(rows, 1, head_dim // 2, generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    cache = torch.zeros(2, kv_heads, 4, 8, head_dim, dtype=torch.bfloat16)  # the quantized path's cache
    slots = torch.tensor([9, 0, 30])
    q, k = fused_ops.rope_and_cache(qkv, cos, sin, cache, slots, heads)
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(rows, heads + kv_heads, head_dim)
    expected = qk * cos + rotate_half(qk) * sin  # decoder.py's expression: three roundings, as the kernel's
    assert q.dtype == k.dtype == F32
    assert torch.equal(q, expected[:, :heads]) and torch.equal(k, expected[:, heads:])
    flat = cache.view(2, kv_heads, 32, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(rows, kv_heads, head_dim)
    for r, slot in enumerate(slots.tolist()):  # stored rounded to nearest even, as torch's .to(bfloat16)
        assert torch.equal(flat[0, :, slot], k[r].bfloat16()) and torch.equal(flat[1, :, slot], v[r].bfloat16())
    with pytest.raises(ValueError, match="bfloat16"):  # a float32 cache is not this kernel's
        fused_ops.rope_and_cache(qkv, cos, sin, torch.zeros(2, kv_heads, 4, 8, head_dim), slots, heads)


@pytest.fixture(scope="module")
def tiny_llama_biased_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A tiny Llama with a bias on every projection, so that the stack adds each one where the per-op path does."""
    from transformers import LlamaConfig

    from tests.conftest import _TINY_DIMS, _build_tiny

    config = LlamaConfig(num_hidden_layers=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=False, **_TINY_DIMS)
    return _build_tiny(tmp_path_factory.mktemp("tiny_llama_biased"), config, smollm2_dir)


@pytest.fixture(scope="module")
def tiny_llama_hd64_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """Heads of 64 in groups of 3, as SmolLM2's: the float32-over-bf16 attention's AVX2 tiles, not its
    portable loops (the other tiny models' heads are 16 wide)."""
    from transformers import LlamaConfig

    from tests.conftest import _TINY_DIMS, _build_tiny

    dims = {**_TINY_DIMS, "hidden_size": 192, "num_attention_heads": 3, "num_key_value_heads": 1}
    config = LlamaConfig(num_hidden_layers=2, tie_word_embeddings=False, **dims)
    return _build_tiny(tmp_path_factory.mktemp("tiny_llama_hd64"), config, smollm2_dir)


def _quantized_runner(model_dir: Path, kind: str, cache_dir: Path) -> ModelRunner:
    """A float32 runner whose projections are int8 (quantized at load) or GGUF blocks of its own weights."""
    config = dict(dtype="float32", num_kv_blocks=8, block_size=16, cache_dir=cache_dir)
    if kind == "int8":
        return ModelRunner(model_dir, EngineConfig(quantization="int8", **config))
    runner = ModelRunner(model_dir, EngineConfig(**config))
    runner.model.use_gguf_weights(*gguf_blocks_of(runner.model, kind))
    # The runner sized its cache for float32 weights; a server loading GGUF blocks sizes it after (bf16).
    runner.kv_caches = torch.zeros_like(runner.kv_caches, dtype=runner.model.kv_cache_dtype())
    return runner


@_needs_kernels
@pytest.mark.parametrize(
    ("kind", "which"),
    [(k, w) for k in ("int8", "q4_1", "q8_0") for w in ("tiny_llama_biased", "tiny_qwen2")] + [("int8", "tiny_llama_hd64")],
)
def test_quantized_stack_matches_the_layer_by_layer_path(
    kind: str, which: str, cache_dir: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """decoder_stack_f32q runs the per-op path's kernels in its order: hidden states and the (bf16) KV cache bit
    for bit the same over steps that prefill (the per-op path in both: float32 prefills take torch's attention), then
    a prompt's later chunk beside decodes, then decodes. The per-op path itself stays within float32 rounding
    of the same weights on torch's elementwise ops (ATTENTION_KERNEL)."""
    runner = _quantized_runner(request.getfixturevalue(f"{which}_dir"), kind, cache_dir)
    model = runner.model
    assert runner.kv_caches.dtype == torch.bfloat16
    assert choose_forward_path("auto", model, F32, CPU) is ForwardPath.DECODER_STACK
    stack_calls = []
    decoder_stack = layer_stack.decoder_stack
    monkeypatch.setattr(layer_stack, "decoder_stack", lambda *a: stack_calls.append(1) or decoder_stack(*a))
    ids = torch.randint(100, 5000, (60,), generator=torch.Generator().manual_seed(5))
    steps = MIXED_STEPS

    stacked, stacked_cache = forward_steps(runner, ForwardPath.DECODER_STACK, steps, ids)
    assert len(stack_calls) == 2  # the two steps without a fresh prefill
    per_op, per_op_cache = forward_steps(runner, ForwardPath.FUSED_OPS, steps, ids)
    assert len(stack_calls) == 2
    for a, b in zip(stacked, per_op, strict=True):
        assert a.abs().sum() > 0
        assert torch.equal(a, b)
    assert torch.equal(stacked_cache, per_op_cache)
    torch_ops, _ = forward_steps(runner, ForwardPath.ATTENTION_KERNEL, steps, ids)
    for a, b in zip(per_op, torch_ops, strict=True):
        # An ulp's difference may tip an activation's rounding to int8 by a step (1/127 of its block's largest),
        # so compare whole steps' states: up to 1e-3 seen here; a wrong rotation or norm would be of order 1.
        assert ((a - b).norm() / b.norm()).item() < 1e-2


@_needs_kernels
def test_mixed_weight_kinds_do_not_take_the_stack(tiny_llama_dir: Path, cache_dir: Path) -> None:
    """One projection left float among GGUF ones: the stack, which takes one kind, is not chosen."""
    runner = _quantized_runner(tiny_llama_dir, "q8_0", cache_dir)
    model = runner.model
    assert choose_forward_path("auto", model, F32, CPU) is ForwardPath.DECODER_STACK
    down = model.layers[1].mlp.down_proj
    down.packed = qgemm.quantize_weight(torch.randn(down.out_features, down.in_features))
    assert not model.can_run_decoder_stack()
    assert choose_forward_path("auto", model, F32, CPU) is ForwardPath.FUSED_OPS


@_needs_kernels
def test_quantized_runner_keeps_a_bf16_cache_of_twice_the_blocks(tiny_llama_dir: Path, cache_dir: Path) -> None:
    """Quantized projections read and write a bf16 KV cache, so one memory budget holds twice float32's blocks."""
    config = dict(dtype="float32", block_size=16, kv_cache_memory_bytes=1 << 20, cache_dir=cache_dir)
    plain = ModelRunner(tiny_llama_dir, EngineConfig(**config))
    int8 = ModelRunner(tiny_llama_dir, EngineConfig(quantization="int8", **config))
    assert plain.kv_caches.dtype == F32 and int8.kv_caches.dtype == torch.bfloat16
    assert int8.kv_spec.num_blocks == 2 * plain.kv_spec.num_blocks
    assert int8.kv_spec.total_bytes == int8.kv_caches.numel() * 2 <= 1 << 20
