"""qgemm.c (`--quantization int8`) against float references: the int8 products summed exactly and scaled
in float64, and the float matmul it approximates, within the bound that the two roundings to int8 allow."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lmserve.config import default_c_compiler
from lmserve.engine.modeling import kernel_abi, kernel_cache, kernel_loader, qgemm

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49, 33), (3, 7), (6, 100)]  # (out, in): odd N and K tails
ROWS = [1, 2, 3, 7, 64, 67]  # one row (decode), the 2-row pairs and their remainder, several 64-row blocks


def _data(rows: int, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(rows * 7919 + out_features * 31 + in_features)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    x = torch.randn(rows, in_features, generator=gen)
    x[0, 0] = 8.0  # an outlier (2-3x the rest), as normed activations have: the row's scale follows it
    return x, weight


def _int_weight(packed: qgemm.QuantizedWeight) -> torch.Tensor:
    """The int8 values [out, Kp] of a packed weight, as float64."""
    groups, steps = packed.data.shape[:2]
    return packed.data.permute(0, 2, 1, 3).reshape(groups * 4, steps * 32)[: packed.out_features].double()


def _reference(xq: torch.Tensor, sx: torch.Tensor, packed: qgemm.QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_b (xq_b . wq_b) * sx_b * sw in float64 (exact up to float64 rounding), and the same sum of
    absolute values (the scale of float32's rounding error in the kernel's accumulation)."""
    xd = (xq.double().view(xq.shape[0], -1, 32) * sx.double()[:, :, None]).view(xq.shape)
    wq, sw = _int_weight(packed), packed.scales[: packed.out_features].double()
    return (xd @ wq.T) * sw, (xd.abs() @ wq.abs().T) * sw


@pytest.mark.parametrize("kernels", ["native", "portable"], indirect=True)
def test_quantize_rows_is_symmetric_absmax_per_block_of_32(kernels: str) -> None:
    x, _ = _data(5, 1, 77)
    x[3] = 0.0  # an all-zero row: scales 0, values 0
    x[1, 32:64] = 0.0  # an all-zero block
    xq, sx = qgemm.quantize_rows(x)
    assert xq.shape == (5, 96) and sx.shape == (5, 3) and torch.all(xq[:, 77:] == 0)
    padded = torch.nn.functional.pad(x, (0, 96 - 77)).view(5, 3, 32)
    amax = padded.abs().amax(dim=2)
    assert torch.equal(sx, amax / 127)
    assert torch.all(xq[3] == 0) and torch.all(sx[3] == 0) and torch.all(xq[1, 32:64] == 0)
    want = torch.round(padded * (127 / torch.where(amax > 0, amax, 1.0))[:, :, None]).view(5, 96)
    assert torch.equal(xq.float(), want)
    assert xq.abs().max() == 127


@pytest.mark.parametrize("kernels", ["native", "portable"], indirect=True)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_qgemm_matches_float_references(kernels: str, rows: int, out_features: int, in_features: int) -> None:
    x, weight = _data(rows, out_features, in_features)
    packed = qgemm.quantize_weight(weight)
    got = qgemm.qgemm_int8(x, packed)
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    # 1. The kernel's own arithmetic: a block's int32 sum is exact; the float32 accumulation of the Kp / 32
    #    scaled block sums (in up to 8 lanes, then across them) and the final scaling add a rounding each,
    #    so the error stays below (Kp / 32 + 8) * 2^-24 times the sum of the terms' absolute values.
    xq, sx = qgemm.quantize_rows(x)
    exact, magnitude = _reference(xq, sx, packed)
    assert torch.all((got.double() - exact).abs() <= (sx.shape[1] + 8) * 2**-24 * magnitude + 1e-30)
    # 2. Against the float matmul it stands for: each factor is off by at most half its scale, so
    #    |y - x.w| <= sum_k (|x_k| sw / 2 + |w_k| sx_b(k) / 2 + sx_b(k) sw / 4), plus float32's own rounding.
    want = x.double() @ weight.double().T
    sw = packed.scales[:out_features].double()
    sx_k = sx.double().repeat_interleave(32, dim=1)[:, :in_features]  # each value's block scale
    bound = (
        x.double().abs().sum(1, keepdim=True) * sw[None, :] / 2
        + sx_k @ weight.double().abs().T / 2
        + sx_k.sum(1, keepdim=True) * sw[None, :] / 4
    )
    assert torch.all((got.double() - want).abs() <= bound * (1 + 1e-5) + 1e-6)
    # and, as a whole, far tighter than that worst case (the outlier row included): under 2% in norm
    assert torch.linalg.norm(got.double() - want) <= 0.02 * torch.linalg.norm(want)


@pytest.mark.parametrize("kernels", ["native"], indirect=True)
def test_qgemm_bias_and_leading_dims(kernels: str) -> None:
    x, weight = _data(6, 40, 64)
    bias = torch.randn(40)
    packed = qgemm.quantize_weight(weight)
    got = qgemm.qgemm_int8(x.view(2, 3, 64), packed, bias)
    assert got.shape == (2, 3, 40)
    assert torch.equal(got.view(6, 40), qgemm.qgemm_int8(x, packed) + bias)
    assert qgemm.qgemm_int8(x[:0], packed).shape == (0, 40)
    with pytest.raises(ValueError, match="float32"):
        qgemm.qgemm_int8(x.to(torch.bfloat16), packed)


def test_quantized_weight_round_trips_within_half_a_step() -> None:
    _, weight = _data(1, 49, 33)
    packed = qgemm.quantize_weight(weight)
    assert packed.data.dtype == torch.int8 and packed.data.shape == (13, 2, 4, 32)
    error = (packed.dequantize() - weight).abs()
    assert torch.all(error <= packed.scales[:49, None] / 2 + 1e-7)
    assert torch.all(_int_weight(packed)[:, 33:] == 0) and torch.all(packed.scales[49:] == 0)


# ---- the other inner loops: each compiled alone from qgemm.c, held to the same reference ----------------

_ISA_FLAGS = {
    "plain C": ("-march=x86-64",),  # no AVX2: the fallback every other CPU (aarch64) builds
    "AVX-512 VNNI": ("-march=x86-64-v3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"),
}


def _build_alone(tmp_path: Path, isa: str) -> Path:
    compiler = default_c_compiler()
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler})")
    flags = [f for f in kernel_cache.FLAGS if f != "-march=native"]
    target = tmp_path / f"qgemm-{isa.replace(' ', '_')}.so"
    source = kernel_cache.SOURCE_DIR / "qgemm.c"
    subprocess.run([compiler, *flags, *_ISA_FLAGS[isa], str(source), "-o", str(target), "-lm"], check=True)
    return target


@pytest.mark.parametrize("isa", list(_ISA_FLAGS))
def test_every_inner_loop_compiles_and_where_the_cpu_runs_it_agrees(
    isa: str, tmp_path: Path, native_library: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VNNI loop cannot run on a CPU without AVX-512 VNNI: there it is only compiled (with -Werror)."""
    lib = ctypes.CDLL(str(_build_alone(tmp_path, isa)))
    cpu = kernel_cache.cpu_flags().split()
    if isa == "AVX-512 VNNI" and not (b"avx512_vnni" in cpu and b"avx512bw" in cpu):
        if shutil.which("objdump") is not None:
            disassembly = subprocess.run(["objdump", "-d", lib._name], capture_output=True, check=True).stdout
            assert b"vpdpbusd" in disassembly
        pytest.skip("compiled only: this CPU has no AVX-512 VNNI")
    kernel_loader._declare(lib, kernel_abi.Abi(
        {n: f for n, f in kernel_abi.read().functions.items() if n in (
            "qgemm_int8", "quantize_rows_int8", "lmserve_qgemm_isa")}, {}, ()))  # fmt: skip
    assert qgemm.QGEMM_ISAS[lib.lmserve_qgemm_isa()] == isa
    for rows, (out_features, in_features) in [(1, (49, 33)), (5, (576, 576)), (67, (6, 100))]:
        x, weight = _data(rows, out_features, in_features)
        packed = qgemm.quantize_weight(weight)
        monkeypatch.setattr(kernel_loader, "library", lambda: lib)
        got, (xq, sx) = qgemm.qgemm_int8(x, packed), qgemm.quantize_rows(x)
        monkeypatch.setattr(kernel_loader, "library", lambda: native_library)
        assert all(map(torch.equal, (xq, sx), qgemm.quantize_rows(x)))  # the same rounding
        exact, magnitude = _reference(xq, sx, packed)  # the sums within float32 accumulation's error
        assert torch.all((got.double() - exact).abs() <= (sx.shape[1] + 8) * 2**-24 * magnitude + 1e-30)
