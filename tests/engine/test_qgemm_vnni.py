"""int8 weights under bf16 activations (qgemm_vnni.c, `--quantization int8` where the CPU has AVX-512 VNNI and
BF16): the matrix multiply against an exact float64 reference of the same int8 products, its activation
quantization against its formula, the fused SiLU against the separate kernel, and the decoder stack with
these weights against the layer-by-layer path, bit for bit. Skipped, with the reason, on a CPU without
AVX-512 VNNI and BF16, where the build has no such path (the portable build is checked to say so)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from lmserve.config import EngineConfig
from lmserve.engine.modeling import fused_ops, kernel_cache, kernel_loader, layer_stack, qgemm, qgemm_vnni
from lmserve.engine.modeling.forward_path import ForwardPath, choose_forward_path
from lmserve.engine.runner import ModelRunner
from tests.engine.forward_steps import MIXED_STEPS, forward_steps

BF16 = torch.bfloat16
CPU = torch.device("cpu")
CPU_HAS_VNNI_BF16 = kernel_cache.cpu_has_int8_bf16()
needs_vnni = pytest.mark.skipif(
    not CPU_HAS_VNNI_BF16, reason="this CPU has no AVX-512 VNNI and BF16: int8 runs under float32 activations (qgemm.c)"
)

SHAPES = [(576, 576), (960, 576), (3072, 576), (576, 1536), (49, 33), (100, 70)]  # (out, in): N and K tails
ROWS = [1, 2, 5, 6, 7, 13, 64, 67, 512]  # one row, each partial register block, several blocks, a prefill's 512


@pytest.fixture
def native(native_library: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> ctypes.CDLL:
    monkeypatch.setattr(kernel_loader, "library", lambda: native_library)
    return native_library


def test_the_build_has_the_path_where_the_cpu_does(native_library: ctypes.CDLL, portable_library: ctypes.CDLL) -> None:
    assert bool(native_library.lmserve_has_int8_bf16()) == CPU_HAS_VNNI_BF16
    assert portable_library.lmserve_has_int8_bf16() == 0
    x = torch.ones(1, 32, dtype=BF16)
    out = torch.empty(1, 32, dtype=torch.int8)
    scales = torch.empty(1, 1)
    assert portable_library.quantize_rows_bf16(x.data_ptr(), out.data_ptr(), scales.data_ptr(), scales.data_ptr(), 1, 32, 1) == 2


def _data(rows: int, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(rows * 7919 + out_features * 31 + in_features)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    x = torch.randn(rows, in_features, generator=gen)
    x[0, 0] = 8.0  # an outlier, as normed activations have: its block's scale follows it
    bias = torch.randn(out_features, generator=gen) * 0.1
    return x.to(BF16), weight, bias.to(BF16)


@needs_vnni
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_qgemm_vnni_sums_the_int8_products_exactly(native, rows: int, out_features: int, in_features: int) -> None:
    """float32 out: sum_b (xq_b . wq_b) * sx_b * sw + bias within float32 accumulation of the exact float64 sum;
    bf16 out: that float32 result rounded to nearest even, bit for bit."""
    x, weight, bias = _data(rows, out_features, in_features)
    packed = qgemm_vnni.pack_vnni(weight)
    assert torch.equal(packed.dequantize(), qgemm.quantize_weight(weight).dequantize())  # the same int8 weights
    xq, sx, cx = qgemm_vnni.quantize_rows(x)
    xd = (xq.double().view(rows, -1, 32) * sx.double()[:, :, None]).view(rows, -1)[:, :in_features]
    wq = packed.int8_values().double()
    sw = packed.scales[:out_features].double()
    exact = (xd @ wq.T) * sw + bias.double()
    bound = (xd.abs() @ wq.abs().T) * sw * 1e-6 + 1e-6  # float32 sums of at most a few thousand terms
    got = qgemm_vnni.qgemm_vnni(x, packed, bias, out_dtype=torch.float32)
    assert ((got.double() - exact).abs() <= bound).all()
    assert torch.equal(qgemm_vnni.qgemm_vnni(x, packed, bias), got.to(BF16))
    # and it approximates the float matmul it stands for (int8 weights and activations: about 1% of the scale)
    want = x.float() @ weight.T + bias.float()
    assert ((got - want).norm() / want.norm()).item() < 0.03


@needs_vnni
def test_activation_quantization_follows_its_formula(native) -> None:
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(9, 100, generator=gen) * torch.logspace(-3, 2, 100)).to(BF16)  # 100: a partial last block
    x[4, 32:64] = 0  # a block of zeros: scale 0, values 0
    xq, sx, cx = qgemm_vnni.quantize_rows(x)
    assert xq.shape == (9, 128) and sx.shape == cx.shape == (9, 4)
    padded = torch.zeros(9, 128)
    padded[:, :100] = x.float()
    blocks = padded.view(9, 4, 32)
    amax = blocks.abs().amax(-1)
    assert torch.equal(sx, amax / 127.0)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros(()))
    assert torch.equal(xq.view(9, 4, 32), torch.round(blocks * inv[:, :, None]).to(torch.int8))
    assert torch.equal(cx, -128 * xq.int().view(9, 4, 32).sum(-1))


@needs_vnni
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_fused_silu_equals_the_separate_kernel(native, rows: int) -> None:
    x, weight, bias = _data(rows, 2 * 96, 64)  # 96 activations: three groups of 16 gate and 16 up columns
    plain, fused = qgemm_vnni.pack_vnni(weight), qgemm_vnni.pack_vnni(weight, silu_mul=True)
    assert fused.silu_mul and torch.equal(fused.dequantize(), plain.dequantize())
    want = fused_ops.silu_mul(qgemm_vnni.qgemm_vnni(x, plain, bias))
    assert torch.equal(qgemm_vnni.qgemm_vnni(x, fused, bias), want)
    assert not qgemm_vnni.silu_mul_packable(torch.zeros(2 * 40, 64))  # 40 is not a multiple of 16
    with pytest.raises(ValueError, match="silu_mul"):
        qgemm_vnni.pack_vnni(torch.zeros(2 * 40, 64), silu_mul=True)


@pytest.fixture(scope="module")
def tiny_llama_bf16_hd64_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """Heads of 64 (the bf16 attention kernel's), biases on every projection and an untied head, so that the
    stack adds each bias where the per-op path does and the head is an int8 Linear of its own."""
    from transformers import LlamaConfig

    from tests.conftest import _TINY_DIMS, _build_tiny

    dims = {**_TINY_DIMS, "hidden_size": 192, "num_attention_heads": 3, "num_key_value_heads": 1}
    config = LlamaConfig(num_hidden_layers=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=False, **dims)
    return _build_tiny(tmp_path_factory.mktemp("tiny_llama_bf16_hd64"), config, smollm2_dir)


@needs_vnni
@pytest.mark.parametrize("which", ["tiny_llama_bf16_hd64", "smollm2"])
def test_int8_bf16_stack_matches_the_layer_by_layer_path(
    which: str, native, cache_dir: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """decoder_stack_bf16 with qgemm_vnni.c's weights runs the per-op path's kernels in its order: hidden states
    and the KV cache bit for bit the same over prefills, a later chunk beside decodes, and decodes. The per-op
    path stays near the torch-ops path with the same weights (bf16 rounding may tip an int8 step)."""
    config = EngineConfig(dtype="bfloat16", quantization="int8", num_kv_blocks=8, block_size=16, cache_dir=cache_dir)
    runner = ModelRunner(request.getfixturevalue(f"{which}_dir"), config)
    model = runner.model
    assert runner.packed_weights.startswith("int8 with bf16 activations")
    assert isinstance(model.layers[0].mlp.gate_up_proj.packed, qgemm_vnni.VNNIWeight)
    assert model.layers[0].mlp.gate_up_proj.applies_silu
    assert runner.kv_caches.dtype == BF16
    assert choose_forward_path("auto", model, BF16, CPU) is ForwardPath.DECODER_STACK
    stack_calls = []
    decoder_stack = layer_stack.decoder_stack
    monkeypatch.setattr(layer_stack, "decoder_stack", lambda *a: stack_calls.append(1) or decoder_stack(*a))
    ids = torch.randint(100, 5000, (60,), generator=torch.Generator().manual_seed(5))
    steps = MIXED_STEPS
    stacked, stacked_cache = forward_steps(runner, ForwardPath.DECODER_STACK, steps, ids)
    assert len(stack_calls) == 3  # bf16 prefills take the C attention kernel too
    per_op, per_op_cache = forward_steps(runner, ForwardPath.FUSED_OPS, steps, ids)
    for a, b in zip(stacked, per_op, strict=True):
        assert a.abs().sum() > 0
        assert torch.equal(a, b)
    assert torch.equal(stacked_cache, per_op_cache)
    torch_ops, _ = forward_steps(runner, ForwardPath.ATTENTION_KERNEL, steps, ids)
    for a, b in zip(per_op, torch_ops, strict=True):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 5e-2
    hidden = stacked[-1]
    logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32  # the int8 head writes float32 sums
    head = model.packed_head if model.tie_word_embeddings else model.lm_head.packed
    assert isinstance(head, qgemm_vnni.VNNIWeight)
    want = model.norm(hidden).float() @ head.dequantize().T
    assert ((logits - want).norm() / want.norm()).item() < 3e-2


def test_int8_under_bf16_is_refused_by_the_portable_build(
    portable_library: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path, cache_dir: Path
) -> None:
    """Where the kernels have no VNNI path, --quantization int8 with bf16 activations is refused with the way out."""
    monkeypatch.setattr(kernel_loader, "library", lambda: portable_library)
    config = EngineConfig(dtype="bfloat16", quantization="int8", num_kv_blocks=8, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="needs a CPU with AVX-512 VNNI and BF16: add --dtype float32"):
        ModelRunner(tiny_llama_dir, config)


def test_the_inner_loop_bench_builds_and_measures_where_it_can(tmp_path: Path) -> None:
    """benchmarks/c/vnni_ops_bench.c compiles warning-free anywhere; on a VNNI and BF16 CPU it prints each variant's
    rate twice, elsewhere it says why and exits 2."""
    import shutil
    import subprocess

    from lmserve.config import default_c_compiler

    compiler = default_c_compiler()
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler})")
    source = Path(__file__).resolve().parents[2] / "benchmarks" / "c" / "vnni_ops_bench.c"
    binary = tmp_path / "vnni_ops_bench"
    subprocess.run([compiler, "-O3", "-march=native", "-Wall", "-Werror", str(source), "-o", str(binary)], check=True)
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    if not CPU_HAS_VNNI_BF16:
        assert result.returncode == 2 and "no AVX-512 VNNI and BF16" in result.stdout
        return
    assert result.returncode == 0, result.stdout + result.stderr
    rates = [float(line.split("G multiply-adds/s")[0].split()[-1]) for line in result.stdout.splitlines()]
    assert len(rates) == 8 and all(rate > 0 for rate in rates)
