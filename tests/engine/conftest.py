"""The C kernels for the kernel tests: "native", the variant this CPU runs by default (kernel_cache.choose_variant:
avx512-bf16 on an AVX-512 BF16 CPU), and "portable", the avx2 variant (x86-64-v3, AVX-512 off), so that the
code paths of CPUs without AVX-512 run here too, whatever this CPU has (tests/engine/test_kernel_variants.py
covers the levels between). A kernel that should build here and does not fails the test run instead of
skipping: the library wherever a C compiler is, gemm.c and decoder.c wherever the CPU has AVX-512 BF16 and
no AMX. With `--kernel-sanitizers` (make kernels-asan) the same tests run the AddressSanitizer/UBSan builds
instead."""

from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

import pytest

from lmserve.config import default_c_compiler
from lmserve.engine.modeling import gemm, kernel_cache, kernel_loader


def cpu_runs_gemm_bf16() -> bool:
    """gemm.c and decoder.c must run on this CPU: AVX-512 BF16, and no AMX (there oneDNN is faster)."""
    flags = kernel_cache.cpu_flags().split()
    return b"avx512_bf16" in flags and b"amx_bf16" not in flags


def _open(cache_dir: Path, variant: str, sanitized: bool) -> ctypes.CDLL:
    compiler = default_c_compiler()
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}): the kernels cannot be built here")
    variant = f"{variant}-asan" if sanitized else variant
    lib = kernel_loader.open_library(cache_dir, compiler, variant)
    assert lib is not None, f"the {variant} C kernels failed to build with {compiler} (see the warning logged)"
    return lib


@pytest.fixture(scope="session")
def sanitized(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--kernel-sanitizers"))


@pytest.fixture(scope="session")
def native_library(cache_dir: Path, sanitized: bool) -> ctypes.CDLL:
    """The variant the server loads here by default."""
    lib = _open(cache_dir, kernel_cache.choose_variant(), sanitized)
    assert bool(lib.lmserve_has_avx512_bf16()) == (b"avx512_bf16" in kernel_cache.cpu_flags().split())
    return lib


@pytest.fixture(scope="session")
def portable_library(cache_dir: Path, sanitized: bool) -> ctypes.CDLL:
    """The avx2 variant (x86-64-v3): no AVX-512 code."""
    missing = kernel_cache.missing_cpu_flags("avx2")
    if missing:
        pytest.skip(f"the avx2 kernels need {' '.join(missing)}, which this CPU lacks")
    lib = _open(cache_dir, "avx2", sanitized)
    assert lib.lmserve_has_avx512_bf16() == 0
    return lib


@pytest.fixture(params=["native", "portable"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The kernel wrappers (kernel_loader.library) call this build for the test's duration: "native" or "portable";
    "none" (by indirect parametrisation): no library, torch ops."""
    lib = None if request.param == "none" else request.getfixturevalue(f"{request.param}_library")
    monkeypatch.setattr(kernel_loader, "library", lambda: lib)
    return request.param


@pytest.fixture
def gemm_kernels(native_library: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> None:
    """gemm.c's (and decoder.c's) tests: run where the CPU should run it, and then it must; skipped elsewhere."""
    if not cpu_runs_gemm_bf16():
        pytest.skip("gemm.c needs AVX-512 BF16 and no AMX; this CPU runs the portable paths only")
    monkeypatch.setattr(kernel_loader, "library", lambda: native_library)
    assert gemm.gemm_bf16_available(), "this CPU has AVX-512 BF16 and no AMX: gemm.c must build and run"
