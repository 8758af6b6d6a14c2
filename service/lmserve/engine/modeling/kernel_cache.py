"""Where the C kernels' library is cached, its key, and which source folders still use each build.

Torch-free, so `lmserve cache` can list and prune builds without importing torch. The library is
`cache_dir/kernels/lmserve-kernels-{key}.so` (`lmserve-kernels-portable-{key}.so` for the build without
AVX-512 that the tests also run), key = hash of the C sources and headers, the compiler flags, the machine
and its CPU's instruction-set flags (-march=native code may not run on another CPU sharing the cache).
Beside it, `{name}.json` lists the source folders (checkouts) that loaded it; a build is still used while
one of them exists and still hashes to its key. Builds named `paged_attention-{key}.so` (the library's
name before it held more than attention) are listed too, so that `lmserve cache prune` removes them.
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
# What the code generator sees; tools/kernel_disasm.py compiles with these too.
CODEGEN_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")
# A warning is a build failure: every exported function declared in abi.h (-Wmissing-prototypes), no
# unused parameter or variable, no implicit conversion the compiler doubts.
WARNING_FLAGS = ("-Wall", "-Wextra", "-Werror", "-Wmissing-prototypes", "-Wstrict-prototypes")
FLAGS = CODEGEN_FLAGS + WARNING_FLAGS
# Build variants: "native", everything this CPU has; "portable", the same sources with AVX-512 off, so
# that the code paths of CPUs without it are compiled and tested on every machine (tests/engine).
# The "-asan" ones add AddressSanitizer and UBSan (`make kernels-asan`; a process loading them needs libasan
# preloaded).
_PORTABLE = ("-mno-avx512f",)
_SANITIZERS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer")
VARIANTS: dict[str, tuple[str, ...]] = {
    "native": (),
    "portable": _PORTABLE,
    "native-asan": _SANITIZERS,
    "portable-asan": _PORTABLE + _SANITIZERS,
}
SOURCE_DIR = Path(__file__).parent


@cache
def cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return b""


# qgemm_vnni.c (int8 weights under bf16 activations) compiles to its real body (-march=native) where the CPU has these.
INT8_BF16_FLAGS = (b"avx512_vnni", b"avx512_bf16", b"avx512bw", b"avx512vl")


def cpu_has_int8_bf16() -> bool:
    """This CPU runs qgemm_vnni.c: AVX-512 VNNI and BF16 (with BW and VL)."""
    flags = cpu_flags().split()
    return all(f in flags for f in INT8_BF16_FLAGS)


def sources(source_dir: Path) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """(the .c files compiled into one library, the .h files they include), each sorted."""
    return tuple(sorted(source_dir.glob("*.c"))), tuple(sorted(source_dir.glob("*.h")))


def build_flags(variant: str = "native") -> tuple[str, ...]:
    return FLAGS + VARIANTS[variant]


def kernel_key(source_dir: Path, variant: str = "native") -> str:
    c_files, headers = sources(source_dir)
    source = b"".join(path.read_bytes() for path in (*c_files, *headers))
    identity = source + " ".join(build_flags(variant)).encode() + os.uname().machine.encode() + cpu_flags()
    return hashlib.sha256(identity).hexdigest()[:16]


def library_path(cache_dir: Path, key: str, variant: str = "native") -> Path:
    infix = "" if variant == "native" else f"{variant}-"
    return Path(cache_dir) / KERNELS_DIR / f"{LIBRARY_PREFIX}{infix}{key}.so"


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
            keys_of[source_dir] = frozenset(kernel_key(Path(source_dir), v) for v in VARIANTS) if is_dir else frozenset()
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
    "build_flags",
    "KERNELS_DIR",
    "KernelBuild",
    "cpu_flags",
    "kernel_builds",
    "kernel_key",
    "library_path",
    "remember_user",
    "sources",
]
