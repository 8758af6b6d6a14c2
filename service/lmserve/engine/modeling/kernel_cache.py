"""Where the C kernels' library is cached, its key, which instruction-set variant this CPU runs, and which
source folders still use each build.

Torch-free, so `lmserve cache` can list and prune builds without importing torch. The library is
`cache_dir/kernels/lmserve-kernels-{variant}-{key}.so`. The variants are x86-64 levels compiled for a named
instruction set (VARIANTS: -march=x86-64-v3 up to x86-64-v4 with AVX-512 BF16 and VNNI), so one image can
carry them all and each node runs the best its CPU has (choose_variant, from /proc/cpuinfo); "native" is
-march=native, for other architectures and CPUs below x86-64-v3. key = hash of the C sources and headers,
the compiler flags and the machine, and for "native" the CPU's instruction-set flags too (its code may not
run on another CPU sharing the cache; a named level's runs on any CPU that has the level). Beside it,
`{name}.json` lists the source folders (checkouts) that loaded it; a build is still used while one of
them exists and still hashes to its key. Builds under older names (`lmserve-kernels-{key}.so`,
`paged_attention-{key}.so`) are listed too, so that `lmserve cache prune` removes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

KERNELS_DIR = "kernels"
LIBRARY_PREFIX = "lmserve-kernels-"
LEGACY_PREFIXES = ("paged_attention-",)
# What the code generator sees, with a variant's instruction-set flags; tools/kernel_disasm.py compiles
# with these too.
CODEGEN_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11")
# A warning is a build failure: every exported function declared in abi.h (-Wmissing-prototypes), no
# unused parameter or variable, no implicit conversion the compiler doubts.
WARNING_FLAGS = ("-Wall", "-Wextra", "-Werror", "-Wmissing-prototypes", "-Wstrict-prototypes")
FLAGS = CODEGEN_FLAGS + WARNING_FLAGS
# "{variant}-asan" adds AddressSanitizer and UBSan to any variant (`make kernels-asan`; a process loading
# it needs libasan preloaded).
ASAN_SUFFIX = "-asan"
_SANITIZERS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer")


@dataclass(frozen=True)
class KernelVariant:
    name: str
    compile_flags: tuple[str, ...]  # the instruction set the compiler may use
    cpu_flags: tuple[str, ...]  # /proc/cpuinfo flags a CPU needs to run it (none for "native": its own)
    description: str  # for the start-up log line


# gcc's x86-64 levels as /proc/cpuinfo names them (pni: SSE3, abm: LZCNT).
_X86_64_V3 = (
    "cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2",  # x86-64-v2
    "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave",
)  # fmt: skip
_X86_64_V4 = (*_X86_64_V3, "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
# The x86-64 variants, best first. The sources' #if blocks choose the code: AVX2+FMA loops (qgemm, qgemm_gguf,
# float32 attention); AVX-512 VNNI's int8 products (qgemm_int8, gguf_gemm); with AVX-512 BF16 too, the bf16
# path's C code (gemm.c, decoder.c, the bf16 attention and fused ops, qgemm_vnni.c). No kernel uses AMX:
# an AMX CPU runs avx512-bf16, and its bf16 matrix multiplies go to oneDNN (gemm.gemm_bf16_available).
X86_VARIANTS = (
    KernelVariant("avx512-bf16", ("-march=x86-64-v4", "-mavx512bf16", "-mavx512vnni"),
                  (*_X86_64_V4, "avx512_bf16", "avx512_vnni"), "x86-64-v4 + avx512_bf16 avx512_vnni"),
    KernelVariant("avx512-vnni", ("-march=x86-64-v4", "-mavx512vnni"), (*_X86_64_V4, "avx512_vnni"),
                  "x86-64-v4 + avx512_vnni"),
    KernelVariant("avx512", ("-march=x86-64-v4",), _X86_64_V4, "x86-64-v4: AVX-512 F/BW/CD/DQ/VL"),
    KernelVariant("avx2", ("-march=x86-64-v3",), _X86_64_V3, "x86-64-v3: AVX2, FMA, BMI2, F16C"),
)  # fmt: skip
NATIVE = KernelVariant("native", ("-march=native",), (), "-march=native: every instruction set of this CPU")
VARIANTS: dict[str, KernelVariant] = {v.name: v for v in (*X86_VARIANTS, NATIVE)}
SOURCE_DIR = Path(__file__).parent


@cache
def cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return b""


# qgemm_vnni.c (int8 weights under bf16 activations) compiles to its real body where the build has these.
INT8_BF16_FLAGS = (b"avx512_vnni", b"avx512_bf16", b"avx512bw", b"avx512vl")


def cpu_has_int8_bf16() -> bool:
    """This CPU runs qgemm_vnni.c: AVX-512 VNNI and BF16 (with BW and VL)."""
    flags = cpu_flags().split()
    return all(f in flags for f in INT8_BF16_FLAGS)


def sources(source_dir: Path) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """(the .c files compiled into one library, the .h files they include), each sorted."""
    return tuple(sorted(source_dir.glob("*.c"))), tuple(sorted(source_dir.glob("*.h")))


def _base(variant: str) -> KernelVariant:
    return VARIANTS[variant.removesuffix(ASAN_SUFFIX)]


def build_flags(variant: str = "native") -> tuple[str, ...]:
    sanitizers = _SANITIZERS if variant.endswith(ASAN_SUFFIX) else ()
    return FLAGS + _base(variant).compile_flags + sanitizers


def all_variants() -> tuple[str, ...]:
    """Every name build_flags takes: each variant, and each with AddressSanitizer."""
    return (*VARIANTS, *(f"{name}{ASAN_SUFFIX}" for name in VARIANTS))


def is_x86_64() -> bool:
    return os.uname().machine in ("x86_64", "amd64")


def missing_cpu_flags(variant: str, flags: bytes | None = None) -> tuple[str, ...]:
    """The CPU flags `variant` needs and this CPU (or `flags`, a /proc/cpuinfo flags line) lacks; () where
    it runs here. An x86 variant needs an x86-64 machine first."""
    if _base(variant).name != "native" and flags is None and not is_x86_64():
        return (f"an x86-64 CPU (this is {os.uname().machine})",)
    have = set((cpu_flags() if flags is None else flags).decode(errors="replace").split())
    return tuple(f for f in _base(variant).cpu_flags if f not in have)


def choose_variant(requested: str = "auto", flags: bytes | None = None) -> str:
    """`requested` itself, or for "auto" the best x86 variant this CPU (or `flags`) runs; "native" where
    none does (another architecture, an x86 CPU below x86-64-v3)."""
    if requested != "auto":
        return requested
    if flags is None and not is_x86_64():
        return "native"
    return next((v.name for v in X86_VARIANTS if not missing_cpu_flags(v.name, flags)), "native")


def image_variants() -> tuple[str, ...]:
    """What a container image bakes: every x86 variant on an x86-64 machine, else "native"."""
    return tuple(v.name for v in X86_VARIANTS) if is_x86_64() else ("native",)


def variant_runs_int8_bf16(variant: str) -> bool:
    """qgemm_vnni.c has its real body in `variant` (AVX-512 VNNI and BF16) and this CPU runs it."""
    if _base(variant).name == "native":
        return cpu_has_int8_bf16()
    return all(f.decode() in _base(variant).cpu_flags for f in INT8_BF16_FLAGS) and not missing_cpu_flags(variant)


def kernel_key(source_dir: Path, variant: str = "native") -> str:
    c_files, headers = sources(source_dir)
    source = b"".join(path.read_bytes() for path in (*c_files, *headers))
    # -march=native's code is this CPU's; a named level's is the same on every CPU.
    cpu = cpu_flags() if _base(variant).name == "native" else b""
    identity = source + " ".join(build_flags(variant)).encode() + os.uname().machine.encode() + cpu
    return hashlib.sha256(identity).hexdigest()[:16]


def library_path(cache_dir: Path, key: str, variant: str = "native") -> Path:
    return Path(cache_dir) / KERNELS_DIR / f"{LIBRARY_PREFIX}{variant}-{key}.so"


def users_path(library: Path) -> Path:
    return library.with_suffix(".json")


def read_users(library: Path) -> list[str]:
    try:
        users = json.loads(users_path(library).read_text()).get("source_dirs", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [str(u) for u in users] if isinstance(users, list) else []


def remember_user(library: Path, source_dir: Path) -> None:
    """Add `source_dir` to the library's users (under the caller's build lock)."""
    users = read_users(library)
    if str(source_dir) in users:
        return
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=library.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"source_dirs": [*users, str(source_dir)]}, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, users_path(library))
    except OSError:
        pass  # a read-only cache: the build is only reported as unused by `lmserve cache`


@dataclass(frozen=True)
class KernelBuild:
    path: Path  # the .so
    key: str
    size_bytes: int
    users: tuple[str, ...]  # source folders that loaded it
    is_used: bool  # one of them exists and still hashes to `key`


def kernel_builds(cache_dir: Path) -> list[KernelBuild]:
    folder = Path(cache_dir) / KERNELS_DIR
    prefixes = (LIBRARY_PREFIX, *LEGACY_PREFIXES)
    libraries = sorted(p for prefix in prefixes for p in folder.glob(f"{prefix}*.so")) if folder.is_dir() else []
    keys_of: dict[str, frozenset[str]] = {}  # a source folder -> its keys now, one per variant (none: gone)

    def keys_now(source_dir: str) -> frozenset[str]:
        if source_dir not in keys_of:
            is_dir = Path(source_dir).is_dir()
            keys_of[source_dir] = frozenset(kernel_key(Path(source_dir), v) for v in all_variants()) if is_dir else frozenset()
        return keys_of[source_dir]

    builds = []
    for library in libraries:
        key = library.stem.rsplit("-", 1)[-1]
        users = read_users(library)
        # This checkout's build counts as used even before anything loaded it through remember_user.
        is_used = key in keys_now(str(SOURCE_DIR)) or any(key in keys_now(u) for u in users)
        builds.append(KernelBuild(library, key, library.stat().st_size, tuple(users), is_used))
    return builds


__all__ = [
    "FLAGS",
    "VARIANTS",
    "X86_VARIANTS",
    "KernelVariant",
    "all_variants",
    "build_flags",
    "choose_variant",
    "image_variants",
    "missing_cpu_flags",
    "variant_runs_int8_bf16",
    "KERNELS_DIR",
    "KernelBuild",
    "cpu_flags",
    "kernel_builds",
    "kernel_key",
    "library_path",
    "remember_user",
    "sources",
]
