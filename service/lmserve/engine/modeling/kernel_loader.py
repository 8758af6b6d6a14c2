"""The C kernels' shared library: built once per machine, opened, and given its ctypes types. The kernel
families' wrappers (attention_kernel, fused_ops, gemm, qgemm, qgemm_vnni, qgemm_gguf, layer_stack, sampling,
token_mask) call the library this module opened.

The ABI is declared once, in abi.h: kernel_abi reads it, and `open_library` gives each exported function
its ctypes types from there. Built with the compiler and into the cache that EngineConfig names
(kernel_cache.py: one library per instruction-set variant, keyed by the sources' hash and the compiler
flags), under a file lock so concurrent processes build it once; a baked image's cache holds every x86
variant already. The runner opens the variant EngineConfig.kernel_variant names, by default the best this
CPU runs (kernel_cache.choose_variant), and logs which (`load_kernels`); the wrappers use that library
(`library()`). Without a compiler and a build there is none, and attention falls back to torch ops
(EngineConfig.attention chooses; "torch" forces them).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

import torch

from lmserve.engine.modeling import kernel_abi, kernel_cache
from lmserve.progress import progress_step

log = logging.getLogger(__name__)

# The activation dtypes the kernels take, by the suffix of their C names (name_f32, name_bf16).
KERNEL_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
_CTYPES = {"pointer": ctypes.c_void_p, "int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float}
_RESTYPES = {"int": ctypes.c_int, "void": None}


def _build(sources: tuple[Path, ...], target: Path, compiler: str, variant: str = "native") -> None:
    if shutil.which(compiler) is None:
        raise FileNotFoundError(f"no C compiler ({compiler})")
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    with progress_step(f"building the C kernels with {compiler} into {target.parent} (once per machine and source change; 5-30 s)"):
        command = [compiler, *kernel_cache.build_flags(variant), *map(str, sources), "-o", str(tmp), "-lm"]
        subprocess.run(command, check=True, capture_output=True, text=True)
    os.replace(tmp, target)  # atomic: a reader never sees a half-written library


def _declare(lib: ctypes.CDLL, abi: kernel_abi.Abi) -> None:
    """Every function of abi.h gets its ctypes argument and result types from its declaration there."""
    for function in abi.functions.values():
        fn = getattr(lib, function.name)
        fn.argtypes = [_CTYPES[p.c_type] for p in function.params]
        fn.restype = _RESTYPES[function.returns]


def ensure_built(cache_dir: Path, compiler: str, variant: str) -> Path:
    """The library of `variant` for these sources in cache_dir, built first if it is not there (any variant
    builds on any x86-64 machine; only running it needs its CPU flags). A cache
    that holds it already (a baked image's) is only read: no lock file is opened, no record written, so a
    read-only cache works."""
    source_dir = kernel_cache.SOURCE_DIR
    target = kernel_cache.library_path(cache_dir, kernel_cache.kernel_key(source_dir, variant), variant)
    if target.exists():
        if str(source_dir) not in kernel_cache.read_users(target):
            try:
                with open(target.with_suffix(".lock"), "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    kernel_cache.remember_user(target, source_dir)
            except OSError:
                pass  # a read-only cache: the build is only reported as unused by `lmserve cache`
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():  # another process may have built it while this one waited
            _build(kernel_cache.sources(source_dir)[0], target, compiler, variant)
        kernel_cache.remember_user(target, source_dir)
    return target


@cache
def open_library(cache_dir: Path, compiler: str, variant: str = "native") -> ctypes.CDLL | None:
    """The kernels of `variant` (kernel_cache.VARIANTS, "-asan" ones too), built into cache_dir/kernels first
    where needed; None, with a warning, where they cannot be built or this CPU cannot run them."""
    missing = kernel_cache.missing_cpu_flags(variant)
    if missing:  # never loaded: its first AVX-512 instruction would kill the process (SIGILL)
        log.warning("C kernels %s unavailable: this CPU lacks %s; using torch ops", variant, " ".join(missing))
        return None
    try:
        lib = ctypes.CDLL(str(ensure_built(Path(cache_dir), compiler, variant)))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("C kernels unavailable (%s); using torch ops", str(detail).strip()[:300])
        return None
    _declare(lib, kernel_abi.read())
    return lib


# The library the kernel families' wrappers call: the one `load_kernels` opened first. A shared library, once
# opened, stays mapped for the life of the process, so this is process-wide by nature; it is the only
# state of this module, set once (the wrappers' callers, deep in the model's forward, hold no config).
_process_library: list[ctypes.CDLL] = []


def load_kernels(cache_dir: Path, compiler: str, requested: str = "auto") -> ctypes.CDLL | None:
    """Open (building if needed) the kernels for this process, from the engine's config: the variant
    `requested` names, or for "auto" the best this CPU runs; once per process, before the first step
    (ModelRunner), so that a build never lands on the engine thread. Logs which variant it loaded."""
    variant = kernel_cache.choose_variant(requested)
    lib = open_library(Path(cache_dir), compiler, variant)
    if lib is None:
        return library()
    if _process_library and _process_library[0] is not lib:  # a second engine in one process asking another
        log.warning("C kernels: %s asked for, but %s are this process's already; using those", variant,
                    Path(_process_library[0]._name).name)
        return library()
    why = "chosen from this CPU's flags" if requested == "auto" else "as configured"
    log.info("C kernels: %s (%s), %s", variant, kernel_cache.VARIANTS[variant].description, why)
    if not _process_library:
        _process_library.append(lib)
    return library()


def library() -> ctypes.CDLL | None:
    """The kernels this process opened with load_kernels, or None (not loaded, or no compiler)."""
    return _process_library[0] if _process_library else None


def loaded_library() -> ctypes.CDLL:
    """library(), which a wrapper needs: raises where the kernels are not loaded."""
    lib = library()
    if lib is None:
        raise RuntimeError("the C kernels are not loaded (kernel_loader.load_kernels, from EngineConfig)")
    return lib


def check_tensors(kind: str, *tensors: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> None:
    """The kernels read raw pointers: every tensor must be contiguous and of the kernel's dtype."""
    for t in tensors:
        if t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{kind}: expected contiguous {dtype} tensors, got {t.dtype} {tuple(t.stride())}")
