"""The kernels' ABI has one source, abi.h: the library exports what it declares and nothing else, Python
takes each function's types and the shared constants from it, and the build treats a warning as an error."""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lmserve.config import default_c_compiler
from lmserve.engine.modeling import gemm, kernel_abi, kernel_cache, kernel_loader, layer_stack, qgemm_vnni

_INTERNAL_PROTOTYPE = re.compile(r"^(?:int|void)\s+(\w+)\s*\(", re.MULTILINE)


def exported_functions(library: Path) -> set[str]:
    """The functions the .so defines and exports (nm -D: the dynamic symbol table, text symbols)."""
    out = subprocess.run(["nm", "-D", "--defined-only", str(library)], check=True, capture_output=True, text=True)
    return {line.split()[-1] for line in out.stdout.splitlines() if line.split()[1] == "T"}


@pytest.mark.parametrize("variant", ["native", "portable"])
def test_the_library_exports_what_abi_h_declares(variant: str, request: pytest.FixtureRequest) -> None:
    lib: ctypes.CDLL = request.getfixturevalue(f"{variant}_library")
    abi = kernel_abi.read()
    internal = set(_INTERNAL_PROTOTYPE.findall((kernel_abi.HEADER.parent / "kernels.h").read_text()))
    exported = exported_functions(Path(lib._name))
    # Every declared function is there; everything else exported is kernels.h's, shared among the sources
    # (attention_bf16_team only in builds with AVX-512 BF16).
    assert set(abi.functions) <= exported
    assert exported - set(abi.functions) <= internal
    assert internal - exported <= ({"attention_bf16_team"} if variant == "portable" or not lib.lmserve_has_avx512_bf16() else set())
    for function in abi.functions.values():  # ctypes got its types from the declaration
        fn = getattr(lib, function.name)
        assert len(fn.argtypes) == len(function.params)
        assert fn.restype == (None if function.returns == "void" else ctypes.c_int)


def test_abi_h_is_read_as_declared() -> None:
    abi = kernel_abi.read()
    assert abi.constants == {
        "GEMM_GROUP_COLS": 64, "QGEMM_GROUP_COLS": 4, "QGEMM_K_ALIGN": 32, "LAYER_SLOTS": 14,
        # qgemm_gguf.c's block size and the ggml type ids it takes (GGMLQuantizationType's values)
        "GGUF_BLOCK": 32, "GGUF_Q4_1": 3, "GGUF_Q8_0": 8,
        # decoder_stack_f32q's third weight kind, int8 (clear of the ggml type ids); decoder_stack_bf16's two
        "WEIGHT_INT8": 1000, "WEIGHT_BF16": 0,
        # decoder_stack_bf16's LoRA table: qkv, o, gate/up, down per layer
        "LORA_PROJECTIONS": 4,
        # qgemm_vnni.c's column groups (two zmm of 16 int32 lanes)
        "VNNI_GROUP_COLS": 32,
    }  # fmt: skip
    assert abi.layer_slots == (
        "qkv_w", "qkv_b", "o_w", "o_b", "gate_up_w", "gate_up_b", "down_w", "down_b", "input_norm", "post_norm",
        "qkv_s", "o_s", "gate_up_s", "down_s",
    )  # fmt: skip
    # LayerWeights names the same slots, in the same order.
    assert tuple(f.name for f in dataclasses.fields(layer_stack.LayerWeights)) == abi.layer_slots
    gemm = abi.functions["gemm_bf16"]
    assert [p.c_type for p in gemm.params] == ["pointer"] * 5 + ["int64_t"] * 3 + ["int", "int"]
    assert abi.functions["lmserve_has_avx512_bf16"].params == ()
    lora = abi.functions["lora_bf16"]
    assert [p.c_type for p in lora.params] == ["pointer"] * 5 + ["int64_t"] + ["pointer"] * 2 + ["int64_t"] * 3 + ["int"]
    qgemm = abi.functions["qgemm_int8"]
    assert [p.c_type for p in qgemm.params] == ["pointer"] * 5 + ["int64_t"] * 3 + ["int"]
    assert abi.functions["apply_token_bitmask_f32"].returns == "void"


def test_a_declaration_abi_h_cannot_carry_is_an_error() -> None:
    header = kernel_abi.HEADER.read_text().replace("int64_t vocab);", "double vocab);")
    with pytest.raises(ValueError, match=r"apply_token_bitmask_f32: parameter 'double vocab' is neither a pointer"):
        kernel_abi.parse(header)


def test_the_portable_build_has_no_avx512_code(portable_library: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_loader, "library", lambda: portable_library)
    assert portable_library.lmserve_has_avx512_bf16() == 0
    assert portable_library.lmserve_has_int8_bf16() == 0
    assert not gemm.gemm_bf16_available()
    assert not qgemm_vnni.available()


def test_a_warning_fails_the_build(tmp_path: Path) -> None:
    compiler = default_c_compiler()
    if shutil.which(compiler) is None:
        pytest.skip("no C compiler")
    for path in (*kernel_cache.sources(kernel_cache.SOURCE_DIR)[0], *kernel_cache.sources(kernel_cache.SOURCE_DIR)[1]):
        shutil.copy(path, tmp_path / path.name)
    with (tmp_path / "token_mask.c").open("a") as f:
        f.write("\nint lmserve_undeclared(void);\nint lmserve_undeclared(void) { int unused; return 0; }\n")
    with pytest.raises(subprocess.CalledProcessError) as failed:
        kernel_loader._build((tmp_path / "token_mask.c",), tmp_path / "out.so", compiler)
    assert "unused variable 'unused'" in failed.value.stderr.replace("‘", "'").replace("’", "'")
    assert not (tmp_path / "out.so").exists()


def test_a_read_only_cache_with_the_build_is_only_read(tmp_path: Path) -> None:
    """A baked image's cache: the library is there, recorded as this checkout's; loading it opens no lock
    file and writes nothing (a read-only cache would refuse), and where the record is missing and cannot
    be written the library still loads."""
    key = kernel_cache.kernel_key(kernel_cache.SOURCE_DIR)
    target = kernel_cache.library_path(tmp_path, key)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"\x7fELF")
    kernel_cache.remember_user(target, kernel_cache.SOURCE_DIR)
    before = sorted(p.name for p in target.parent.iterdir())
    assert kernel_loader.ensure_built(tmp_path, "false", "native") == target  # "false": no build is tried
    assert sorted(p.name for p in target.parent.iterdir()) == before  # no .lock, no new record
    kernel_cache.users_path(target).unlink()
    target.parent.chmod(0o555)
    try:
        if not _is_read_only(target.parent):
            pytest.skip("running as root: a read-only folder is writable")
        assert kernel_loader.ensure_built(tmp_path, "false", "native") == target
        assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    finally:
        target.parent.chmod(0o755)


def _is_read_only(folder: Path) -> bool:
    try:
        with open(folder / ".probe", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
    except OSError:
        return True
    (folder / ".probe").unlink()
    return False
