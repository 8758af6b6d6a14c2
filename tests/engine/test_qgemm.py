"""qgemm.c (`--quantization int8`) against float references: the int8 products summed exactly, and the
float matmul it approximates, within the bound that the two roundings to int8 allow."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from service.config import default_c_compiler
from service.engine.modeling import kernel_cache, native_kernels

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49, 33), (3, 7), (6, 100)]  # (out, in): odd N and K tails
ROWS = [1, 2, 3, 7, 64, 67]  # one row (decode), the 2-row pairs and their remainder, several 64-row blocks


def _data(rows: int, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(rows * 7919 + out_features * 31 + in_features)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    x = torch.randn(rows, in_features, generator=gen)
    x[0, 0] = 8.0  # an outlier (2-3x the rest), as normed activations have: the row's scale follows it
    return x, weight


def _exact(xq: torch.Tensor, sx: torch.Tensor, packed: native_kernels.QuantizedWeight) -> torch.Tensor:
    """The int8 products summed in float64 (exact for these sizes), times the two scales."""
    k = packed.in_features
    wq = packed.dequantize().double() / packed.scales[: packed.out_features, None].double()
    sums = xq[:, :k].double() @ wq.round().T
    return sums * sx.double()[:, None] * packed.scales[: packed.out_features].double()[None, :]


@pytest.mark.parametrize("kernels", ["native", "portable"], indirect=True)
def test_quantize_rows_is_symmetric_absmax_per_row(kernels: str) -> None:
    x, _ = _data(5, 1, 77)
    x[3] = 0.0  # an all-zero row: scale 0, values 0
    xq, sx = native_kernels.quantize_rows(x)
    assert xq.shape == (5, 96) and torch.all(xq[:, 77:] == 0)
    amax = x.abs().amax(dim=1)
    assert torch.equal(sx, amax / 127)
    assert torch.all(xq[3] == 0) and sx[3] == 0
    want = torch.round(x * (127 / torch.where(amax > 0, amax, 1.0))[:, None])
    assert torch.equal(xq[:, :77].float(), want)
    assert xq.abs().max() == 127


@pytest.mark.parametrize("kernels", ["native", "portable"], indirect=True)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_qgemm_matches_float_references(kernels: str, rows: int, out_features: int, in_features: int) -> None:
    x, weight = _data(rows, out_features, in_features)
    packed = native_kernels.quantize_weight(weight)
    got = native_kernels.qgemm_int8(x, packed)
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    # 1. The kernel's own arithmetic: int32 sums are exact, then float(sum) * sx * sw, two float32 roundings
    #    past the exact value: relative error below 3 * 2^-24 per element.
    xq, sx = native_kernels.quantize_rows(x)
    exact = _exact(xq, sx, packed)
    assert torch.all((got.double() - exact).abs() <= 3 * 2**-24 * exact.abs() + 1e-30)
    # 2. Against the float matmul it stands for: each factor is off by at most half its scale, so
    #    |y - x.w| <= sum_k (|x_k| sw / 2 + |w_k| sx / 2 + sx sw / 4), plus float32's own rounding.
    want = x.double() @ weight.double().T
    sw = packed.scales[:out_features].double()
    bound = (
        x.double().abs().sum(1, keepdim=True) * sw[None, :] / 2
        + sx.double()[:, None] * weight.double().abs().sum(1)[None, :] / 2
        + in_features * sx.double()[:, None] * sw[None, :] / 4
    )
    assert torch.all((got.double() - want).abs() <= bound * (1 + 1e-5) + 1e-6)
    # and, as a whole, far tighter than that worst case (the outlier row included): under 3% in norm
    assert torch.linalg.norm(got.double() - want) <= 0.03 * torch.linalg.norm(want)


@pytest.mark.parametrize("kernels", ["native"], indirect=True)
def test_qgemm_bias_and_leading_dims(kernels: str) -> None:
    x, weight = _data(6, 40, 64)
    bias = torch.randn(40)
    packed = native_kernels.quantize_weight(weight)
    got = native_kernels.qgemm_int8(x.view(2, 3, 64), packed, bias)
    assert got.shape == (2, 3, 40)
    assert torch.equal(got.view(6, 40), native_kernels.qgemm_int8(x, packed) + bias)
    assert native_kernels.qgemm_int8(x[:0], packed).shape == (0, 40)
    with pytest.raises(ValueError, match="float32"):
        native_kernels.qgemm_int8(x.to(torch.bfloat16), packed)


def test_quantized_weight_round_trips_within_half_a_step() -> None:
    _, weight = _data(1, 49, 33)
    packed = native_kernels.quantize_weight(weight)
    assert packed.data.dtype == torch.int8 and packed.data.shape == (13, 2, 4, 32)
    error = (packed.dequantize() - weight).abs()
    assert torch.all(error <= packed.scales[:49, None] / 2 + 1e-7)
    assert torch.equal(packed.comp[:49], 128 * packed.data.permute(0, 2, 1, 3).reshape(52, 64)[:49].int().sum(1))


# ---- the other inner loops: each compiled alone from qgemm.c, the same results bit for bit -----------

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
    native_kernels._declare(lib, native_kernels.kernel_abi.Abi(
        {n: f for n, f in native_kernels.kernel_abi.read().functions.items() if n in (
            "qgemm_int8", "quantize_rows_int8", "lmserve_qgemm_isa")}, {}, ()))  # fmt: skip
    assert native_kernels.QGEMM_ISAS[lib.lmserve_qgemm_isa()] == isa
    for rows, (out_features, in_features) in [(1, (49, 33)), (5, (576, 576)), (67, (6, 100))]:
        x, weight = _data(rows, out_features, in_features)
        packed = native_kernels.quantize_weight(weight)
        monkeypatch.setattr(native_kernels, "library", lambda: lib)
        got = native_kernels.qgemm_int8(x, packed)
        monkeypatch.setattr(native_kernels, "library", lambda: native_library)
        assert torch.equal(got, native_kernels.qgemm_int8(x, packed))
