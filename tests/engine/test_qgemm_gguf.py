"""qgemm_gguf.c (`--quantization q4_1 | q8_0`): GGUF's Q4_1 and Q8_0 weight blocks, as stored, times float32
activations that the kernel quantizes per block of 32. Checked two ways on each build (this CPU's, and the
plain C one compiled here without AVX2), against float64 references:
1. its own arithmetic: the products of the quantized activations with the blocks, summed exactly, within
   float32 rounding;
2. the float matmul it approximates (gguf.quants.dequantize'd weights times x), within the bound that the
   activations' rounding allows: |x - dx * qx| <= dx / 2 per element, so per output
   |err| <= sum over blocks of dx_b / 2 * sum_i |w_i|, plus float32 rounding.
The AVX-512 VNNI path cannot run here (no such CPU); it is compiled, so that it at least builds."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lmserve.checkpoints.bundled import require_bundled
from lmserve.checkpoints.gguf_blocks import _read_blocks, read_tensor_table
from lmserve.config import default_c_compiler
from lmserve.engine.modeling import kernel_abi, kernel_cache, kernel_loader, qgemm_gguf

QTYPES = {"q4_1": gguf.GGMLQuantizationType.Q4_1, "q8_0": gguf.GGMLQuantizationType.Q8_0}
SHAPES = [(1, 576, 576), (1, 1536, 576), (1, 577, 1536), (1, 3, 64), (7, 33, 576), (7, 192, 64), (4, 5, 32), (9, 101, 96)]
SOURCE = kernel_cache.SOURCE_DIR / "qgemm_gguf.c"
FLOAT_SLACK = 1e-5  # float32 rounding of the per-block products and their sum, relative to sum |terms|


def _compiler() -> str:
    compiler = default_c_compiler()
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler})")
    return compiler


@pytest.fixture(scope="module")
def plain_c_library(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """qgemm_gguf.c (with qgemm.c, whose row quantizer it shares) built for the x86-64 baseline (no AVX2, FMA
    or F16C): its plain C path."""
    target = tmp_path_factory.mktemp("plain") / "qgemm_gguf_plain.so"
    flags = [f for f in kernel_cache.FLAGS if f != "-march=native"]
    subprocess.run([_compiler(), *flags, "-mno-avx2", "-mno-fma", "-mno-f16c", str(SOURCE), str(SOURCE.with_name("qgemm.c")), "-o", str(target), "-lm"],
                   check=True, capture_output=True, text=True)  # fmt: skip
    lib = ctypes.CDLL(str(target))
    abi = kernel_abi.read()
    for name in ("lmserve_gguf_isa", "gguf_quantize_rows", "gguf_gemm"):
        fn = getattr(lib, name)
        fn.argtypes = [kernel_loader._CTYPES[p.c_type] for p in abi.functions[name].params]
        fn.restype = kernel_loader._RESTYPES[abi.functions[name].returns]
    assert lib.lmserve_gguf_isa() == 0
    return lib


@pytest.fixture(params=["native", "plain"])
def build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    lib = request.getfixturevalue("native_library" if request.param == "native" else "plain_c_library")
    monkeypatch.setattr(kernel_loader, "library", lambda: lib)
    return request.param


def _weight(kind: str, w: np.ndarray) -> tuple[qgemm_gguf.GGUFWeight, torch.Tensor]:
    """w [N, K] float32 as GGUF blocks of `kind`, and the float64 weights those blocks stand for."""
    blocks = gguf.quants.quantize(w, QTYPES[kind])
    dequantized = torch.from_numpy(gguf.quants.dequantize(blocks, QTYPES[kind])).double()
    return qgemm_gguf.GGUFWeight(torch.from_numpy(blocks), kind, *w.shape), dequantized


def _data(m: int, n: int, k: int) -> tuple[np.ndarray, torch.Tensor]:
    gen = np.random.default_rng(m * 7919 + n * 31 + k)
    w = (gen.standard_normal((n, k)) * 0.05).astype(np.float32)
    w[0, :32] += 0.2  # a block whose minimum is far from zero: Q4_1's m term carries it
    x = torch.from_numpy(gen.standard_normal((m, k)).astype(np.float32))
    x[0, 3] = 8.0  # an outlier, as normed activations have: its block's scale follows it
    return w, x


def _exact(kind: str, weight: qgemm_gguf.GGUFWeight, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's arithmetic in float64 from its own quantized activations, and sum |terms| (for the
    float32 rounding bound)."""
    qx, dx, sx = qgemm_gguf.gguf_quantize_rows(x)
    n, k = weight.out_features, weight.in_features
    nb = k // 32
    raw = weight.data.numpy().reshape(n, nb, -1)
    d = torch.from_numpy(raw[:, :, :2].copy().view(np.float16).astype(np.float64)).reshape(n, nb)
    if kind == "q4_1":
        m = torch.from_numpy(raw[:, :, 2:4].copy().view(np.float16).astype(np.float64)).reshape(n, nb)
        qs = torch.from_numpy(raw[:, :, 4:].astype(np.int64))
        q = torch.cat([qs & 15, qs >> 4], dim=2).double()  # [n, nb, 32]: low nibbles are elements 0..15
    else:
        m = torch.zeros(n, nb, dtype=torch.float64)
        q = torch.from_numpy(raw[:, :, 2:].copy().view(np.int8).astype(np.float64))
    dots = torch.einsum("mbi,nbi->mnb", qx.double().view(-1, nb, 32), q)  # exact integers
    terms = d[None] * dx.double()[:, None, :] * dots + m[None] * sx.double()[:, None, :]
    return terms.sum(dim=2), terms.abs().sum(dim=2)


def test_quantize_rows_is_blockwise_absmax(native_library: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_loader, "library", lambda: native_library)
    _, x = _data(3, 1, 96)
    x[1, 32:64] = 0.0  # an all-zero block: scale 0, values 0
    qx, dx, sx = qgemm_gguf.gguf_quantize_rows(x)
    blocks = x.view(3, 3, 32)
    amax = blocks.abs().amax(dim=2)
    assert torch.equal(dx, amax / 127)
    want = torch.round(blocks * (127 / torch.where(amax > 0, amax, 1.0))[:, :, None])  # half to even
    assert torch.equal(qx.view(3, 3, 32).float(), want)
    assert torch.equal(sx, dx * want.sum(dim=2))
    assert dx[1, 1] == 0 and torch.all(qx[1, 32:64] == 0) and qx.abs().max() == 127


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_gguf_gemm_matches_float_references(build: str, kind: str, m: int, n: int, k: int) -> None:
    w, x = _data(m, n, k)
    weight, w_float = _weight(kind, w)
    got = qgemm_gguf.gguf_gemm(x, weight)
    assert got.shape == (m, n) and got.dtype == torch.float32
    exact, magnitude = _exact(kind, weight, x)
    assert torch.all((got.double() - exact).abs() <= FLOAT_SLACK * magnitude + 1e-6)
    reference = x.double() @ w_float.T
    half_step = (x.double().view(m, k // 32, 32).abs().amax(dim=2) / 127 / 2).repeat_interleave(32, dim=1)
    bound = half_step @ w_float.abs().T + FLOAT_SLACK * (x.double().abs() @ w_float.abs().T) + 1e-6
    err = (got.double() - reference).abs()
    assert torch.all(err <= bound), f"worst excess {(err - bound).max().item():.3g}"
    assert err.max() > 0  # the activations really were quantized: not a float path in disguise


def test_gguf_gemm_on_the_bundled_models_blocks(native_library: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real blocks: layer 0's ffn_down (Q4_1, K = 1536) and the first 999 rows of token_embd (Q8_0)."""
    monkeypatch.setattr(kernel_loader, "library", lambda: native_library)
    table = read_tensor_table(require_bundled("smollm2-135m-instruct"))
    for name, kind, rows in (("blk.0.ffn_down.weight", "q4_1", None), ("token_embd.weight", "q8_0", 999)):
        t = table.tensors[name]
        assert t.kind == kind
        blocks = np.ascontiguousarray(_read_blocks(require_bundled("smollm2-135m-instruct"), t).blocks[:rows])
        w_float = torch.from_numpy(gguf.quants.dequantize(blocks, QTYPES[kind])).double()
        weight = qgemm_gguf.GGUFWeight(torch.from_numpy(blocks), kind, *w_float.shape)
        x = torch.randn(3, weight.in_features, generator=torch.Generator().manual_seed(5))
        got = qgemm_gguf.gguf_gemm(x, weight).double()
        exact, magnitude = _exact(kind, weight, x)
        assert torch.all((got - exact).abs() <= FLOAT_SLACK * magnitude + 1e-6)
        reference = x.double() @ w_float.T
        assert (got - reference).norm() / reference.norm() < 0.02  # activation rounding: about 0.5% here


def test_gguf_weight_refuses_a_shape_its_blocks_do_not_fill() -> None:
    with pytest.raises(ValueError, match="needs uint8 blocks"):
        qgemm_gguf.GGUFWeight(torch.zeros(4, 41, dtype=torch.uint8), "q4_1", 4, 64)
    with pytest.raises(ValueError, match="needs uint8 blocks"):
        qgemm_gguf.GGUFWeight(torch.zeros(4, 20, dtype=torch.uint8), "q4_1", 4, 40)  # K not a multiple of 32


def test_vnni_path_compiles(tmp_path: Path) -> None:
    """The AVX-512 VNNI inner loop builds (it cannot run on a CPU without it): vpdpbusd in the object."""
    compiler = _compiler()
    obj = tmp_path / "vnni.o"
    isa = ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
    flags = [f for f in kernel_cache.FLAGS if f not in ("-march=native", "-shared")]
    subprocess.run([compiler, *flags, *isa, "-c", str(SOURCE), "-o", str(obj)], check=True, capture_output=True, text=True)
    objdump = shutil.which("objdump")
    if objdump is not None:
        assert "vpdpbusd" in subprocess.run([objdump, "-d", str(obj)], check=True, capture_output=True, text=True).stdout
