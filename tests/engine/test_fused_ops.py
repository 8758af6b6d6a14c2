"""The fused C elementwise ops of the bf16 path against the torch expressions they replace."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmserve.config import EngineConfig
from lmserve.engine.modeling import attention_kernel, fused_ops, gemm, kernel_loader
from lmserve.engine.modeling.attention import SeqLayout, build_metadata
from lmserve.engine.modeling.forward_path import ForwardPath, choose_forward_path
from lmserve.engine.modeling.decoder import DecoderModel
from lmserve.engine.modeling.layers import rotate_half
from lmserve.engine.runner import ModelRunner
from tests.engine.forward_steps import forward_steps

BF16 = torch.bfloat16
CPU = torch.device("cpu")

# Each op on the build for this CPU and on the portable one (tests/engine/conftest.py).
_needs_kernels = pytest.mark.usefixtures("kernels")


@_needs_kernels
def test_add_rms_norm_matches_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(37, 576, generator=gen).mul(4).to(BF16) for _ in range(2))
    weight = torch.randn(576, generator=gen).to(BF16)
    expected_residual = residual + x
    expected = weight * F.rms_norm(expected_residual.float(), (576,), eps=1e-5).to(BF16)
    got = fused_ops.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(residual, expected_residual)  # updated in place, rounded as torch rounds
    # Only the order of the sum of squares differs from torch: at most one bf16 step, rarely.
    assert (got != expected).float().mean() < 0.01
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
    # Without x: a plain norm, residual untouched.
    before = residual.clone()
    plain = fused_ops.add_rms_norm(None, residual, weight, 1e-5)
    assert torch.equal(residual, before)
    torch.testing.assert_close(plain, weight * F.rms_norm(before.float(), (576,), eps=1e-5).to(BF16))


@_needs_kernels
def test_silu_mul_matches_torch() -> None:
    gate_up = torch.randn(9, 2 * 1536, generator=torch.Generator().manual_seed(1)).mul(3).to(BF16)
    gate, up = gate_up.split(1536, dim=-1)
    expected = F.silu(gate) * up
    got = fused_ops.silu_mul(gate_up)
    assert got.shape == (9, 1536)
    assert (got != expected).float().mean() < 0.01
    torch.testing.assert_close(got, expected)


@_needs_kernels
@pytest.mark.parametrize("width", [8, 40, 100])
def test_fused_ops_on_widths_not_a_multiple_of_16(width: int) -> None:
    """The vector kernels' masked tails: no element past the row is read into a result or written."""
    gen = torch.Generator().manual_seed(width)
    x, residual = (torch.randn(5, width, generator=gen).mul(4).to(BF16) for _ in range(2))
    weight = torch.randn(width, generator=gen).to(BF16)
    expected = weight * F.rms_norm((residual + x).float(), (width,), eps=1e-5).to(BF16)
    torch.testing.assert_close(fused_ops.add_rms_norm(x, residual, weight, 1e-5), expected, rtol=1e-2, atol=1e-2)
    gate_up = torch.randn(5, 2 * width, generator=gen).mul(3).to(BF16)
    gate, up = gate_up.split(width, dim=-1)
    torch.testing.assert_close(fused_ops.silu_mul(gate_up), F.silu(gate) * up)


@_needs_kernels
@pytest.mark.parametrize("head_dim", [64, 128, 40])  # 40: a vector of sixteen and a tail of four per half
def test_rope_and_cache_matches_torch_and_fills_slots(head_dim: int) -> None:
    heads, kv_heads, num_blocks, block_size, rows = 6, 2, 10, 4, 7
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=gen).to(BF16)
    # Whole heads of zeros (a q head in even rows, a k head in odd ones): the sign of a zero result must
    # follow torch's too (rotate_half negates, so -0 * sin + x * cos can be -0).
    qkv[::2, :head_dim] = 0.0
    qkv[1::2, heads * head_dim : (heads + 1) * head_dim] = 0.0
    angles = torch.rand(rows, head_dim // 2, generator=gen) * 6
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(BF16)[:, None], emb.sin().to(BF16)[:, None]
    cache = torch.zeros(2, kv_heads, num_blocks, block_size, head_dim, dtype=BF16)
    slots = torch.tensor([3, 17, 4, 39, 0, 22, 8])

    q, k = fused_ops.rope_and_cache(qkv, cos, sin, cache, slots, heads)

    qk = qkv[:, : (heads + kv_heads) * head_dim].view(rows, heads + kv_heads, head_dim)
    expected = qk * cos + rotate_half(qk) * sin
    bits = lambda t: t.contiguous().view(torch.int16)  # noqa: E731  (torch.equal takes -0 for +0)
    assert torch.equal(bits(q), bits(expected[:, :heads]))  # same three roundings as torch: bit-identical
    assert torch.equal(bits(k), bits(expected[:, heads:]))
    v = qkv[:, (heads + kv_heads) * head_dim :].view(rows, kv_heads, head_dim)
    flat = cache.view(2, kv_heads, num_blocks * block_size, head_dim)
    assert torch.equal(flat[0][:, slots].transpose(0, 1), k)
    assert torch.equal(flat[1][:, slots].transpose(0, 1), v)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots] = False
    assert not flat[:, :, untouched].any()


@pytest.mark.usefixtures("native_library")
def test_fused_layers_match_unfused_forward(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole bf16 model, fused (C elementwise ops; where gemm.c runs, SiLU in gate/up's gemm) against
    unfused (torch ops on a gate/up weight packed plainly, torch's SiLU), over a prefill and a decode step."""
    config = EngineConfig(dtype="bfloat16", num_kv_blocks=8, block_size=16)
    fused_runner = ModelRunner(smollm2_dir, config)
    expected = ForwardPath.DECODER_STACK if gemm.gemm_bf16_available() else ForwardPath.FUSED_OPS
    assert fused_runner.forward_path is expected
    assert fused_runner.model.layers[0].mlp.gate_up_proj.applies_silu == gemm.gemm_bf16_available()
    monkeypatch.setattr(gemm, "silu_mul_packable", lambda weight: False)
    plain_runner = ModelRunner(smollm2_dir, config)
    assert not any(layer.mlp.gate_up_proj.applies_silu for layer in plain_runner.model.layers)

    def forward(runner: ModelRunner, path: ForwardPath) -> tuple[torch.Tensor, torch.Tensor]:
        model = runner.model
        run = model.forward_for(path)
        ids = torch.randint(100, 5000, (21,), generator=torch.Generator().manual_seed(3))
        prefill = build_metadata([SeqLayout(0, 20, 0, [0, 1])], 16, CPU, BF16, use_kernel=True)
        with torch.inference_mode():
            first = run(ids[:20], torch.arange(20), runner.kv_caches, prefill)
            decode = build_metadata([SeqLayout(0, 1, 20, [0, 1])], 16, CPU, BF16, use_kernel=True)
            second = run(ids[20:], torch.tensor([20]), runner.kv_caches, decode)
        return model.compute_logits(first[-1:]).float(), model.compute_logits(second).float()

    fused = forward(fused_runner, ForwardPath.FUSED_OPS)
    unfused = forward(plain_runner, ForwardPath.ATTENTION_KERNEL)
    for a, b in zip(fused, unfused, strict=True):
        assert a.argmax() == b.argmax()
        # Two bf16 computations that round in different places: their logits (magnitude ~10-30) drift
        # apart by about a percent (bf16 against float32 is ~0.6% here); a broken op is off by far more.
        assert (a - b).norm() / b.norm() < 0.03


def test_attention_flag_and_env_choose_the_path(smollm2_dir: Path) -> None:
    from lmserve.cli import build_parser, serve_config_from_args

    env = {"LMSERVE_ATTENTION": "torch"}
    config = serve_config_from_args(build_parser(env).parse_args(["serve"]), env)
    assert config.engine.attention == "torch"
    args = build_parser(env).parse_args(["serve", "--attention", "kernel"])
    assert serve_config_from_args(args, env).engine.attention == "kernel"  # a flag wins over its variable
    runner = ModelRunner(smollm2_dir, EngineConfig(dtype="bfloat16", num_kv_blocks=4, attention="torch"))
    assert runner.forward_path is ForwardPath.TORCH
    assert choose_forward_path("torch", runner.model, BF16, CPU) is ForwardPath.TORCH
    has_kernel = attention_kernel.paged_attention_supported(torch.float32, CPU)
    float32_path = ForwardPath.ATTENTION_KERNEL if has_kernel else ForwardPath.TORCH
    assert choose_forward_path("auto", runner.model, torch.float32, CPU) is float32_path
    assert choose_forward_path("auto", runner.model, BF16, torch.device("meta")) is ForwardPath.TORCH
    with pytest.raises(RuntimeError, match="unavailable"):
        choose_forward_path("kernel", runner.model, BF16, torch.device("meta"))
    with pytest.raises(ValueError, match="auto, kernel or torch"):
        choose_forward_path("fast", runner.model, BF16, CPU)


def test_kernels_are_loaded_before_the_weights_are_packed(
    tiny_llama_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packing asks which kernels there are (gemm.c's layout where it runs, else oneDNN's): the runner
    must have loaded them by then, in a process that has not loaded them before."""
    if kernel_loader.open_library(cache_dir, EngineConfig().c_compiler) is None:
        pytest.skip("no C compiler: nothing to load")
    monkeypatch.setattr(kernel_loader, "_process_library", [])
    loaded_at_packing: list[bool] = []
    prepack = DecoderModel.prepack_weights

    def spy(model: DecoderModel, quantization: str = "none") -> str | None:
        loaded_at_packing.append(kernel_loader.library() is not None)
        return prepack(model, quantization)

    monkeypatch.setattr(DecoderModel, "prepack_weights", spy)
    ModelRunner(tiny_llama_dir, EngineConfig(dtype="float32", num_kv_blocks=4, cache_dir=cache_dir))
    assert loaded_at_packing == [True]


def _tiny_qwen2(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path, name: str, intermediate_size: int) -> Path:
    """A tiny Qwen2 (q/k/v biases) whose heads are 64 wide, a size decoder.c's attention takes."""
    from transformers import Qwen2Config

    from tests.conftest import SMOLLM2_VOCAB_SIZE, _build_tiny

    config = Qwen2Config(
        hidden_size=128, num_attention_heads=2, num_key_value_heads=1, intermediate_size=intermediate_size,
        num_hidden_layers=2, vocab_size=SMOLLM2_VOCAB_SIZE, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    return _build_tiny(tmp_path_factory.mktemp(name), config, smollm2_dir)


@pytest.fixture(scope="module")
def qwen2_head64_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    return _tiny_qwen2(tmp_path_factory, smollm2_dir, "qwen2_head64", 256)


@pytest.fixture(scope="module")
def llama_head128_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A tiny Llama with 128-wide heads, biases on every projection and its own (untied) LM head."""
    from transformers import LlamaConfig

    from tests.conftest import SMOLLM2_VOCAB_SIZE, _build_tiny

    config = LlamaConfig(
        hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128, intermediate_size=256,
        num_hidden_layers=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        vocab_size=SMOLLM2_VOCAB_SIZE, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    return _build_tiny(tmp_path_factory.mktemp("llama_head128"), config, smollm2_dir)


@pytest.fixture(scope="module")
def qwen2_inter80_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """Its MLP is 80 wide: not a multiple of 32, so its gate/up weight is packed plainly and silu_mul runs as
    a step of its own (in decoder.c too)."""
    return _tiny_qwen2(tmp_path_factory, smollm2_dir, "qwen2_inter80", 80)


@pytest.mark.usefixtures("gemm_kernels")  # decoder.c needs gemm.c (AVX-512 BF16, no AMX)
@pytest.mark.parametrize(
    ("which", "silu_in_gemm"),
    [("smollm2", True), ("qwen2_head64", True), ("llama_head128", True), ("qwen2_inter80", False)],
)
def test_decoder_stack_matches_the_layer_by_layer_path(
    which: str, silu_in_gemm: bool, request: pytest.FixtureRequest
) -> None:
    """decoder.c runs the per-op path's kernels in the same order and split over threads: the hidden states
    and the KV cache come out bit for bit the same, over prefills, then a batch mixing a fresh prompt, a
    prompt's later chunk and decodes. With SiLU in gate/up's gemm or as a step of its own."""
    model_dir = request.getfixturevalue(f"{which}_dir")
    runner = ModelRunner(model_dir, EngineConfig(dtype="bfloat16", num_kv_blocks=8, block_size=16))
    model = runner.model
    assert runner.forward_path is ForwardPath.DECODER_STACK
    assert all(layer.mlp.gate_up_proj.applies_silu == silu_in_gemm for layer in model.layers)
    ids = torch.randint(100, 5000, (100,), generator=torch.Generator().manual_seed(5))
    # (start_row, new tokens, cached tokens, blocks) per sequence: B, C, D prefill; then A fresh, B's next
    # chunk, C and D decode.
    steps = [
        [(0, 18, 0, [2, 3]), (18, 30, 0, [4, 5]), (48, 5, 0, [6])],
        [(0, 20, 0, [0, 1]), (20, 7, 18, [2, 3]), (27, 1, 30, [4, 5]), (28, 1, 5, [6])],
    ]

    stacked, stacked_cache = forward_steps(runner, ForwardPath.DECODER_STACK, steps, ids)
    per_op, per_op_cache = forward_steps(runner, ForwardPath.FUSED_OPS, steps, ids)
    for a, b in zip(stacked, per_op, strict=True):
        assert a.abs().sum() > 0
        assert torch.equal(a, b)
    assert torch.equal(stacked_cache, per_op_cache)
