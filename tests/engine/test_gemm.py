"""gemm.c (the bf16 projections on AVX-512 BF16 CPUs) against a float32 matmul of the same bf16 inputs."""

from __future__ import annotations

import pytest
import torch

from lmserve.engine.modeling import fused_ops, gemm
from lmserve.engine.modeling.layers import linear, prepack

BF16 = torch.bfloat16

# Skipped where the CPU lacks AVX-512 BF16 or has AMX; a failure to build or run gemm.c elsewhere fails.
pytestmark = pytest.mark.usefixtures("gemm_kernels")


# Rows: every register-block remainder (1-6) and several blocks; columns: whole 64-column groups, a
# partial last group, and fewer than one group.
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 13, 64])
@pytest.mark.parametrize(("out_features", "in_features"), [(960, 576), (576, 1536), (100, 64), (24, 30)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_matches_float32_matmul(rows: int, out_features: int, in_features: int, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=gen).to(BF16)
    x = torch.randn(rows, in_features, generator=gen).to(BF16)
    bias = torch.randn(out_features, generator=gen).to(BF16) if with_bias else None
    packed = prepack(weight)
    assert isinstance(packed, gemm.PackedWeight)
    got = linear(x, packed, bias)
    want = x.float() @ weight.float().T + (0 if bias is None else bias.float())
    assert got.dtype == BF16 and got.shape == (rows, out_features)
    # float32 sums in another order, then one rounding to bf16: within a bf16 step of the exact value.
    torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-3 * want.abs().max().item())
    # The float32 output (the LM head's logits) is those very sums, unrounded.
    sums = gemm.gemm_bf16(x, packed, bias, out_dtype=torch.float32)
    assert sums.dtype == torch.float32 and torch.equal(sums.to(BF16), got)
    torch.testing.assert_close(sums, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("rows", [1, 5, 6, 13, 64])
@pytest.mark.parametrize(("inter", "in_features"), [(1536, 576), (32, 64), (96, 30)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_silu_mul_is_the_gemm_then_silu_mul(rows: int, inter: int, in_features: int, with_bias: bool) -> None:
    """A gate/up weight packed for silu_mul gives, in one pass, bit for bit what its plain gemm followed by
    fused_ops' silu_mul gives; and that is SiLU-and-multiply within bf16 rounding."""
    gen = torch.Generator().manual_seed(rows * 7 + inter)
    weight = torch.randn(2 * inter, in_features, generator=gen).to(BF16)
    x = torch.randn(rows, in_features, generator=gen).to(BF16)
    bias = torch.randn(2 * inter, generator=gen).to(BF16) if with_bias else None
    assert gemm.silu_mul_packable(weight)
    packed = gemm.pack_weight(weight, silu_mul=True)
    got = gemm.gemm_bf16(x, packed, None if bias is None else gemm.interleave_gate_up(bias))
    gate_up = gemm.gemm_bf16(x, gemm.pack_weight(weight), bias)
    assert got.shape == (rows, inter) and got.dtype == BF16
    assert torch.equal(got, fused_ops.silu_mul(gate_up))
    gate, up = gate_up.float().split(inter, dim=-1)
    torch.testing.assert_close(got.float(), torch.nn.functional.silu(gate) * up, rtol=2**-7, atol=1e-2)


def test_silu_mul_packing_needs_whole_groups() -> None:
    assert not gemm.silu_mul_packable(torch.empty(2 * 40, 64, dtype=BF16))  # 40 is not a multiple of 32
    with pytest.raises(ValueError, match="silu_mul"):
        gemm.pack_weight(torch.empty(2 * 40, 64, dtype=BF16), silu_mul=True)
    with pytest.raises(ValueError, match="bfloat16 only for silu_mul"):
        packed = gemm.pack_weight(torch.zeros(64, 64, dtype=BF16), silu_mul=True)
        gemm.gemm_bf16(torch.zeros(1, 64, dtype=BF16), packed, out_dtype=torch.float32)


def test_gemm_keeps_leading_dims_and_takes_strided_input() -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(128, 64, generator=gen).to(BF16)
    x = torch.randn(3, 4, 128, generator=gen).to(BF16)[..., ::2]  # [3, 4, 64], not contiguous
    got = gemm.gemm_bf16(x, gemm.pack_weight(weight))
    assert got.shape == (3, 4, 128)
    torch.testing.assert_close(got.float(), (x.float() @ weight.float().T), rtol=2**-8, atol=0.05)
    assert gemm.gemm_bf16(torch.empty(0, 64, dtype=BF16), gemm.pack_weight(weight)).shape == (0, 128)


def test_gemm_refuses_what_it_cannot_run() -> None:
    assert not gemm.gemm_bf16_fits(torch.empty(4, 3, dtype=BF16))  # odd in_features: no k pairs
    assert not gemm.gemm_bf16_fits(torch.empty(4, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match="bfloat16"):
        gemm.gemm_bf16(torch.ones(2, 64), gemm.pack_weight(torch.ones(8, 64, dtype=BF16)))
