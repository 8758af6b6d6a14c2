"""The C kernels' x86-64 variants (kernel_cache.X86_VARIANTS): the best one a CPU runs is chosen from its flags,
every variant builds on this machine, and each one this CPU runs passes a focused subset of the kernel tests
(attention, a matrix multiply, a fused op) and, loaded through EngineConfig.kernel_variant, gives transformers'
exact greedy tokens in float32. The full kernel suite runs on the default variant and on avx2 (conftest.py).

Which variant has which path: the C bf16 path (gemm.c, decoder.c, the bf16 attention heads, qgemm_vnni.c) is in
avx512-bf16 only; the others run bf16 matrix multiplies with torch (oneDNN) around the same C attention and fused
ops in their plain forms. AVX-512 VNNI's int8 loops (qgemm_int8, gguf_gemm) are in avx512-bf16 and avx512-vnni;
avx512 and avx2 run their AVX2 loops."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import shutil
from pathlib import Path

import pytest
import torch

from lmserve.cli import build_parser, serve_config_from_args
from lmserve.config import KERNEL_VARIANTS, EngineConfig, default_c_compiler
from lmserve.engine.engine import NativeEngine
from lmserve.engine.modeling import fused_ops, gemm, kernel_cache, kernel_loader, qgemm, qgemm_gguf, qgemm_vnni
from lmserve.preflight import PreflightError, check_kernel_variant, check_quantization
from tests.engine.test_attention import BLOCK_SIZE, LAYOUT, NUM_BLOCKS, NUM_HEADS, NUM_KV_HEADS, check_paged_attention
from tests.engine.test_exactness import engine_greedy, hf_greedy
from tests.cli_process import call_cli
from tests.engine.test_kernel_abi import exported_functions

X86 = [v.name for v in kernel_cache.X86_VARIANTS]
F32, BF16 = torch.float32, torch.bfloat16
# What each variant's build reports (lmserve_has_avx512_bf16, lmserve_has_int8_bf16, qgemm and gguf inner loops).
PATHS = {
    "avx512-bf16": (1, 1, "AVX-512 VNNI", "AVX-512 VNNI"),
    "avx512-vnni": (0, 0, "AVX-512 VNNI", "AVX-512 VNNI"),
    "avx512": (0, 0, "AVX2", "AVX2"),
    "avx2": (0, 0, "AVX2", "AVX2"),
}


def flags_line(*names: str) -> bytes:
    return b"flags\t\t: fpu " + " ".join(names).encode()


V3 = kernel_cache.VARIANTS["avx2"].cpu_flags
V4 = kernel_cache.VARIANTS["avx512"].cpu_flags


@pytest.mark.parametrize(
    ("cpu", "flags", "expected"),
    [
        ("Zen 4", (*V4, "avx512_bf16", "avx512_vnni", "avx512_vbmi"), "avx512-bf16"),
        ("Sapphire Rapids (AMX: no kernel of its own)", (*V4, "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"), "avx512-bf16"),
        ("Ice Lake / Cascade Lake", (*V4, "avx512_vnni"), "avx512-vnni"),
        ("Skylake-SP", V4, "avx512"),
        ("Zen 3 / Haswell", V3, "avx2"),
        ("AVX2 short of x86-64-v3 (no movbe; bf16 alone adds nothing)", (*V3[:-3], "avx512_bf16"), "native"),
        ("Sandy Bridge", ("avx", "sse4_2", "popcnt"), "native"),
    ],
)  # fmt: skip
def test_the_best_variant_the_cpu_runs_is_chosen(cpu: str, flags: tuple[str, ...], expected: str) -> None:
    assert kernel_cache.choose_variant("auto", flags_line(*flags)) == expected, cpu
    assert kernel_cache.choose_variant("avx2", flags_line(*flags)) == "avx2"  # a setting is taken as it is


def test_the_variant_names_agree_and_none_is_native() -> None:
    assert KERNEL_VARIANTS == ("auto", *kernel_cache.VARIANTS)
    assert X86 == ["avx512-bf16", "avx512-vnni", "avx512", "avx2"]
    for name in X86:
        flags = kernel_cache.build_flags(name)
        assert "-march=native" not in flags and any(f.startswith("-march=x86-64-v") for f in flags)
    assert kernel_cache.image_variants() == (tuple(X86) if kernel_cache.is_x86_64() else ("native",))


def test_only_native_keys_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A named level's build is the same on every CPU (a baked image's matches any node); -march=native's is not."""
    keys = {v: kernel_cache.kernel_key(kernel_cache.SOURCE_DIR, v) for v in kernel_cache.VARIANTS}
    assert len(set(keys.values())) == len(keys)
    monkeypatch.setattr(kernel_cache, "cpu_flags", lambda: flags_line(*V3))
    assert {v: kernel_cache.kernel_key(kernel_cache.SOURCE_DIR, v) for v in X86} == {v: keys[v] for v in X86}
    assert kernel_cache.kernel_key(kernel_cache.SOURCE_DIR, "native") != keys["native"]


def test_a_variant_the_cpu_cannot_run_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """On an AVX2 CPU: AVX-512 kernels are refused at start (never loaded: SIGILL), int8 under bf16 too; on a
    VNNI + BF16 CPU int8 under bf16 is refused with a variant that lacks qgemm_vnni.c's path."""
    if kernel_cache.cpu_has_int8_bf16():
        for variant, runs in (("avx512-vnni", False), ("avx512-bf16", True), ("native", True)):
            assert kernel_cache.variant_runs_int8_bf16(variant) == runs
        config = EngineConfig(quantization="int8", dtype="bfloat16", kernel_variant="avx512-vnni", cache_dir=tmp_path)
        with pytest.raises(PreflightError, match=r"and kernels built for them \(not --kernel-variant avx512-vnni\)"):
            check_quantization(config)
    monkeypatch.setattr(kernel_cache, "cpu_flags", lambda: flags_line(*V3, "avx512_bf16"))
    with pytest.raises(PreflightError, match=r"--kernel-variant avx512 needs CPU flags this CPU lacks \(avx512f "):
        check_kernel_variant(EngineConfig(kernel_variant="avx512"))
    check_kernel_variant(EngineConfig(kernel_variant="avx2"))
    assert kernel_loader.open_library(tmp_path, "false", "avx512-vnni") is None  # "false": no build is tried
    with pytest.raises(PreflightError, match="needs a CPU with AVX-512 VNNI and BF16: add --dtype float32"):
        check_quantization(EngineConfig(quantization="int8", dtype="bfloat16", cache_dir=tmp_path))


def test_the_setting_reaches_the_engine_and_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"LMSERVE_KERNEL_VARIANT": "avx2"}
    assert serve_config_from_args(build_parser(env).parse_args(["serve"]), env).engine.kernel_variant == "avx2"
    flag = serve_config_from_args(build_parser({}).parse_args(["serve", "--kernel-variant", "avx512-vnni"]), {})
    assert flag.engine.kernel_variant == "avx512-vnni"
    vllm = call_cli("serve", "--engine", "vllm", "--kernel-variant", "avx2")
    assert vllm.returncode == 2 and "--kernel-variant chooses the native engine's C kernels" in vllm.stderr
    monkeypatch.setattr(kernel_cache, "cpu_flags", lambda: flags_line(*V3))  # an AVX2 node
    refused = call_cli("serve", env={"LMSERVE_KERNEL_VARIANT": "avx512-bf16"})
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    (line,) = [line for line in refused.stderr.splitlines() if "error:" in line]
    assert line.startswith("error: --kernel-variant avx512-bf16 needs CPU flags this CPU lacks (avx512f ")
    assert line.endswith("auto would choose avx2 here")


@pytest.fixture(scope="session")
def variant_builds(cache_dir: Path) -> dict[str, Path]:
    """Every x86 variant built into the suite's cache (once per source change), runnable here or not."""
    if not kernel_cache.is_x86_64():
        pytest.skip("the x86-64 variants build on x86-64 machines")
    compiler = default_c_compiler()
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler})")
    return {v: kernel_loader.ensure_built(cache_dir, compiler, v) for v in X86}


def test_every_variant_builds_and_exports_the_abi(variant_builds: dict[str, Path]) -> None:
    for variant, library in variant_builds.items():
        assert library.name.startswith(f"lmserve-kernels-{variant}-") and library.stat().st_size > 0
        assert "gemm_bf16" in exported_functions(library) and "paged_attention_f32" in exported_functions(library)


@pytest.fixture(params=X86)
def variant(
    request: pytest.FixtureRequest, variant_builds: dict[str, Path], cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """Each x86 variant this CPU runs, as the kernel wrappers' library for the test's duration."""
    missing = kernel_cache.missing_cpu_flags(request.param)
    if missing:
        pytest.skip(f"{request.param}: built only, this CPU lacks {' '.join(missing)}")
    lib = kernel_loader.open_library(cache_dir, default_c_compiler(), request.param)
    assert lib is not None and Path(lib._name) == variant_builds[request.param]
    monkeypatch.setattr(kernel_loader, "library", lambda: lib)
    return request.param


def test_each_variant_runs_its_paths(variant: str) -> None:
    lib = kernel_loader.loaded_library()
    has_bf16, has_int8_bf16, qgemm_isa, gguf_isa = PATHS[variant]
    assert (lib.lmserve_has_avx512_bf16(), lib.lmserve_has_int8_bf16()) == (has_bf16, has_int8_bf16)
    assert (qgemm.qgemm_isa(), qgemm_gguf.gguf_isa()) == (qgemm_isa, gguf_isa)
    assert qgemm_vnni.available() == bool(has_int8_bf16)
    assert gemm.gemm_bf16_available() == (bool(has_bf16) and b"amx_bf16" not in kernel_cache.cpu_flags())
    # attention: float32 exact to 1e-5, bf16 and float32 over a bf16 cache to bf16's precision
    for dtypes in ((F32, F32), (BF16, BF16), (F32, BF16)):
        check_paged_attention(LAYOUT, NUM_HEADS, NUM_KV_HEADS, 64, BLOCK_SIZE, NUM_BLOCKS, dtypes, use_kernel=True)
    gen = torch.Generator().manual_seed(0)
    # a matrix multiply: qgemm_int8 within 2% of the float product it stands for
    x, w = torch.randn(5, 96, generator=gen), torch.randn(40, 96, generator=gen)
    got, want = qgemm.qgemm_int8(x, qgemm.quantize_weight(w)), x @ w.T
    assert torch.linalg.norm(got - want) <= 0.02 * torch.linalg.norm(want)
    if gemm.gemm_bf16_available():  # and gemm.c's bf16 product where the variant has it
        xb, wb = x.to(BF16), w.to(BF16)
        torch.testing.assert_close(gemm.gemm_bf16(xb, gemm.pack_weight(wb)).float(), xb.float() @ wb.float().T, rtol=1e-2, atol=5e-2)
    # a fused op: residual add and RMS norm in bf16
    h, residual = (torch.randn(7, 96, generator=gen).to(BF16) for _ in range(2))
    weight = torch.randn(96, generator=gen).to(BF16)
    expected = weight * torch.nn.functional.rms_norm((residual + h).float(), (96,), eps=1e-5).to(BF16)
    torch.testing.assert_close(fused_ops.add_rms_norm(h, residual, weight, 1e-5), expected, rtol=1e-2, atol=1e-2)


PROMPTS = [[1, 4093, 314, 253, 2951], [1, 28, 30, 2, 99, 1234, 17], [1, 9, 9, 9]]


def greedy(model_dir: Path, dtype: str, kernel_variant: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Greedy tokens of an engine loading `kernel_variant` as the server does (EngineConfig -> load_kernels),
    in a process library of its own for the call."""
    with monkeypatch.context() as m:
        m.setattr(kernel_loader, "_process_library", [])
        config = EngineConfig(dtype=dtype, num_kv_blocks=64, kernel_variant=kernel_variant, cache_dir=cache_dir)
        engine = NativeEngine.load(model_dir, "tiny", config)
        assert Path(kernel_loader.loaded_library()._name).name.startswith(f"lmserve-kernels-{kernel_variant}-")
        return asyncio.run(engine_greedy(engine, PROMPTS, concurrent=True))


def test_each_variant_gives_the_same_greedy_tokens(
    variant_builds: dict[str, Path], tiny_llama_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """float32: transformers' exact tokens on every variant this CPU runs; bf16: the same tokens on every
    variant that takes the same bf16 path (all but avx512-bf16, whose C bf16 path rounds differently)."""
    runnable = [v for v in X86 if not kernel_cache.missing_cpu_flags(v)]
    expected = hf_greedy(tiny_llama_dir, PROMPTS, frozenset({2}))
    caplog.set_level(logging.INFO, logger=kernel_loader.log.name)
    for variant in runnable:
        assert greedy(tiny_llama_dir, "float32", variant, cache_dir, monkeypatch) == expected, variant
        assert f"C kernels: {variant} ({kernel_cache.VARIANTS[variant].description}), as configured" in caplog.text
    torch_bf16 = {v: greedy(tiny_llama_dir, "bfloat16", v, cache_dir, monkeypatch) for v in runnable if v != "avx512-bf16"}
    assert len({str(tokens) for tokens in torch_bf16.values()}) <= 1, torch_bf16


def test_auto_loads_the_best_variant_and_says_so(cache_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=kernel_loader.log.name)
    monkeypatch.setattr(kernel_loader, "_process_library", [])
    best = kernel_cache.choose_variant()
    lib = kernel_loader.load_kernels(cache_dir, default_c_compiler())
    if lib is None:
        pytest.skip("no C compiler")
    assert Path(lib._name).name.startswith(f"lmserve-kernels-{best}-")
    assert f"C kernels: {best} ({kernel_cache.VARIANTS[best].description}), chosen from this CPU's flags" in caplog.text
    # A second engine in the same process asking for another variant gets the one loaded, with a warning.
    other = "avx2" if best != "avx2" else "avx512"
    if not kernel_cache.missing_cpu_flags(other):
        assert kernel_loader.load_kernels(cache_dir, default_c_compiler(), other) is lib
        assert f"C kernels: {other} asked for, but {Path(lib._name).name} are this process's already" in caplog.text
    if b"avx512_bf16" in kernel_cache.cpu_flags().split() and b"avx512_vnni" in kernel_cache.cpu_flags().split():
        assert best == "avx512-bf16"
