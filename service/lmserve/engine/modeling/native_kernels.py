"""C kernels, built once per machine and called via ctypes: attention over the paged cache
(paged_attention.c), the fused elementwise ops of a bf16 layer, or of a float32 one with quantized weights
(fused_ops.c), the bf16 matrix
multiply of the projections on AVX-512 BF16 CPUs (gemm.c), the int8 one of `--quantization int8` (qgemm.c),
a whole step's decoder layers in one call (decoder.c: bf16, or float32 with int8 / GGUF weights), temperature sampling (sampling.c) and constrained decoding's token masks (token_mask.c).

Why C: a decode step's attention is thousands of tiny (query heads x context) products; as torch ops it
needs a gather of every block the batch touches plus batched matmuls of tiny matrices, which cost more
than the model's own matmuls at 64 sequences. The kernel reads blocks in place.

The ABI is declared once, in abi.h: kernel_abi reads it, and `open_library` gives each exported function
its ctypes types from there. Built with the compiler and into the cache that EngineConfig names
(kernel_cache.py: keyed by the sources' hash, the compiler flags and the CPU's instruction-set flags, since
-march=native code may not run on another CPU sharing the cache), under a file lock so concurrent processes
build it once. The runner opens it at load (`load_kernels`); the wrappers below use that library
(`library()`). Without a compiler there is none, and attention falls back to torch ops
(EngineConfig.attention chooses; "torch" forces them).
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from lmserve.engine.modeling import kernel_abi, kernel_cache
from lmserve.engine.modeling.qgemm_vnni import VNNIWeight
from lmserve.progress import progress_step

log = logging.getLogger(__name__)

_C_TYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
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


def _ensure_built(cache_dir: Path, compiler: str, variant: str) -> Path:
    """The library for these sources, flags and CPU in cache_dir, built first if it is not there. A cache
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
    """The kernels built for this CPU (variant "native") or without AVX-512 ("portable", for the tests),
    built into cache_dir/kernels first where needed; None, with a warning, where they cannot be built."""
    try:
        lib = ctypes.CDLL(str(_ensure_built(Path(cache_dir), compiler, variant)))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("C kernels unavailable (%s); using torch ops", str(detail).strip()[:300])
        return None
    _declare(lib, kernel_abi.read())
    return lib


# The library the wrappers below call: the one `load_kernels` opened first. A shared library, once
# opened, stays mapped for the life of the process, so this is process-wide by nature; it is the only
# state of this module, set once (the wrappers' callers, deep in the model's forward, hold no config).
_process_library: list[ctypes.CDLL] = []


def load_kernels(cache_dir: Path, compiler: str) -> ctypes.CDLL | None:
    """Open (building if needed) the kernels for this process, from the engine's config; once per process,
    before the first step (ModelRunner), so that a build never lands on the engine thread."""
    lib = open_library(Path(cache_dir), compiler)
    if lib is not None and not _process_library:
        _process_library.append(lib)
    return library()


def library() -> ctypes.CDLL | None:
    """The kernels this process opened with load_kernels, or None (not loaded, or no compiler)."""
    return _process_library[0] if _process_library else None


def _loaded() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("the C kernels are not loaded (native_kernels.load_kernels, from EngineConfig)")
    return lib


def paged_attention_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """paged_attention_kernel runs for this dtype and device (float32 or bf16 on CPU, kernels loaded)."""
    return device.type == "cpu" and dtype in _C_TYPES and library() is not None


def _threads_for(work: int) -> int:
    """One thread for a tiny call (waking a second costs more than it saves), else every intra-op thread."""
    return 1 if work < 16384 else torch.get_num_threads()


def _planes(kv_cache: torch.Tensor) -> tuple[int, int]:
    """Addresses of the K and V planes of one layer's [2, ...] cache, without making view tensors."""
    k = kv_cache.data_ptr()
    return k, k + kv_cache.stride(0) * kv_cache.element_size()


# paged_attention.c's kernel for (q's dtype, the cache's): float32 over float32 (the kernel held to transformers),
# bf16 over bf16, float32 over bf16 (the quantized-weight path's cache, kv_cache_dtype).
_ATTENTION_KERNELS = {
    (torch.float32, torch.float32): "paged_attention_f32",
    (torch.bfloat16, torch.bfloat16): "paged_attention_bf16",
    (torch.float32, torch.bfloat16): "paged_attention_f32_bf16kv",
}


# The same with a sliding window and/or soft-capping (paged_attention.c's portable kernels).
_WINDOWED_KERNELS = {
    (torch.float32, torch.float32): "paged_attention_windowed_f32",
    (torch.bfloat16, torch.bfloat16): "paged_attention_windowed_bf16",
}


def paged_attention_kernel(
    q: torch.Tensor,  # [num_rows, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_kv_heads, num_blocks, block_size, head_dim]
    out: torch.Tensor,  # like q; rows in q_rows are written
    block_table: torch.Tensor,  # [num_seqs, max_blocks] int64
    seq_of_query: torch.Tensor,  # [num_queries] int64
    ctx_lens: torch.Tensor,  # [num_queries] int64: keys visible to each query
    q_rows: torch.Tensor,  # [num_queries] int64
    max_ctx: int,
    scale: float,
    window: int | None = None,  # each query sees only its last `window` keys
    softcap: float | None = None,  # scores -> softcap * tanh(score / softcap)
) -> None:
    """q over the cache, by the kernel of _ATTENTION_KERNELS (_WINDOWED_KERNELS with a window or soft-cap) for
    their two dtypes."""
    windowed = window is not None or softcap is not None
    name = (_WINDOWED_KERNELS if windowed else _ATTENTION_KERNELS).get((q.dtype, kv_cache.dtype))
    if name is None or out.dtype != q.dtype:
        what = " with a window or soft-cap" if windowed else ""
        raise ValueError(f"paged_attention_kernel: no kernel{what} for {q.dtype} queries over a {kv_cache.dtype} cache")
    fn = getattr(_loaded(), name)
    for t in (q, out, kv_cache, block_table, seq_of_query, ctx_lens, q_rows):
        if not t.is_contiguous():
            raise ValueError("paged_attention_kernel: every tensor must be contiguous")
    _, num_kv_heads, num_blocks, block_size, head_dim = kv_cache.shape
    num_queries, num_heads = q_rows.shape[0], q.shape[1]
    k_plane, v_plane = _planes(kv_cache)
    failed = fn(
        q.data_ptr(), k_plane, v_plane, out.data_ptr(), block_table.data_ptr(),
        seq_of_query.data_ptr(), ctx_lens.data_ptr(), q_rows.data_ptr(),
        num_queries, num_heads, num_kv_heads, head_dim, num_blocks, block_size, block_table.shape[1],
        max_ctx, scale, *((window or 0, softcap or 0.0) if windowed else ()),
        _threads_for(num_queries * num_heads * max_ctx),
    )  # fmt: skip
    if failed:
        raise MemoryError("paged attention kernel could not allocate its scratch buffers")


def fused_ops_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """add_rms_norm, silu_mul and rope_and_cache run for this dtype and device (bf16 or float32 on CPU, kernels
    loaded). float32 takes them with quantized weights only (forward_path.choose_forward_path)."""
    return device.type == "cpu" and dtype in _C_TYPES and library() is not None


def _check(kind: str, *tensors: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> None:
    """The kernels read raw pointers: every tensor must be contiguous and of the kernel's dtype."""
    for t in tensors:
        if t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{kind}: expected contiguous {dtype} tensors, got {t.dtype} {tuple(t.stride())}")


def _fused(lib: ctypes.CDLL, name: str, dtype: torch.dtype):
    """fused_ops.c's `name` for this dtype: name_bf16 or name_f32."""
    if dtype not in _C_TYPES:
        raise ValueError(f"{name}: no kernel for {dtype}")
    return getattr(lib, f"{name}_{_C_TYPES[dtype]}")


def add_rms_norm(
    x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """residual += x in place (when x is given); returns weight * rms_norm(residual). bf16 or float32, [rows, dim]."""
    rows, dim = residual.shape
    _check("add_rms_norm", residual, weight, *(() if x is None else (x,)), dtype=residual.dtype)
    out = torch.empty_like(residual)
    _fused(_loaded(), "add_rms_norm", residual.dtype)(
        None if x is None else x.data_ptr(), residual.data_ptr(), weight.data_ptr(), out.data_ptr(),
        rows, dim, eps, torch.get_num_threads(),
    )  # fmt: skip
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[rows, 2 * inter] (gate | up) -> silu(gate) * up, [rows, inter]. bf16 or float32."""
    rows, width = gate_up.shape
    _check("silu_mul", gate_up, dtype=gate_up.dtype)
    out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
    _fused(_loaded(), "silu_mul", gate_up.dtype)(gate_up.data_ptr(), out.data_ptr(), rows, width // 2, torch.get_num_threads())
    return out


def rope_and_cache(
    qkv: torch.Tensor,  # [rows, (heads + 2 * kv_heads) * head_dim], contiguous
    cos: torch.Tensor,  # [rows, 1, head_dim]
    sin: torch.Tensor,
    kv_cache: torch.Tensor,  # [2, kv_heads, num_blocks, block_size, head_dim]
    slot_mapping: torch.Tensor,  # [rows] int64
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q and k, and k, v written to their cache slots, in one pass (bf16, or float32 whose cache is
    bf16: the quantized path's, the values rounded to nearest even). Returns q, k contiguous, in qkv's dtype."""
    _, num_kv_heads, num_blocks, block_size, head_dim = kv_cache.shape
    rows = qkv.shape[0]
    k_plane, v_plane = _planes(kv_cache)
    _check("rope_and_cache", qkv, cos, sin, dtype=qkv.dtype)
    _check("rope_and_cache", kv_cache)
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (rows,) or not slot_mapping.is_contiguous():
        raise ValueError("rope_and_cache: slot_mapping must be a contiguous int64 tensor, one slot per row")
    q = torch.empty(rows, num_heads, head_dim, dtype=qkv.dtype)
    k = torch.empty(rows, num_kv_heads, head_dim, dtype=qkv.dtype)
    _fused(_loaded(), "rope_cache", qkv.dtype)(
        qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), q.data_ptr(), k.data_ptr(),
        k_plane, v_plane, slot_mapping.data_ptr(),
        rows, num_heads, num_kv_heads, head_dim, num_blocks * block_size, torch.get_num_threads(),
    )  # fmt: skip
    return q, k


# ---- bf16 matrix multiply (gemm.c) ------------------------------------------------------------------

_GROUP_COLS = kernel_abi.read().constants["GEMM_GROUP_COLS"]


@dataclass(frozen=True)
class PackedWeight:
    """A bf16 weight [out_features, in_features] reordered for gemm_bf16 (see gemm.c):
    [ceil(out / 64), in / 2, 64, 2], the columns past out_features zero. silu_mul: an MLP's fused
    gate/up weight, its halves interleaved 32 columns at a time (interleave_gate_up), for which gemm_bf16
    returns silu(gate) * up, [..., out_features / 2]."""

    data: torch.Tensor
    out_features: int
    in_features: int
    silu_mul: bool = False


def gemm_bf16_available() -> bool:
    """gemm_bf16 (and decoder_stack, which is built on it) runs here: the kernels were built with AVX-512
    BF16, on a CPU without AMX (whose tile unit oneDNN drives far faster than vdpbf16ps can)."""
    lib = library()
    return lib is not None and bool(lib.lmserve_has_avx512_bf16()) and b"amx_bf16" not in kernel_cache.cpu_flags()


def gemm_bf16_fits(weight: torch.Tensor) -> bool:
    """gemm_bf16 runs here and fits this weight (bf16 on CPU, an even in_features)."""
    return (
        gemm_bf16_available()
        and weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and weight.shape[1] % 2 == 0
    )


def silu_mul_packable(weight: torch.Tensor) -> bool:
    """A fused gate/up weight [2 * intermediate, in] that pack_weight can pack for silu_mul: gemm.c runs it
    (gemm_bf16_fits) and intermediate is a multiple of 32."""
    return gemm_bf16_fits(weight) and weight.shape[0] % _GROUP_COLS == 0


def interleave_gate_up(t: torch.Tensor, group: int = _GROUP_COLS) -> torch.Tensor:
    """[2 * intermediate, ...] gate rows then up rows -> group / 2 gate rows, the matching up rows, and so on:
    each of gemm.c's 64-column groups (qgemm_vnni.c's 32) then holds both halves of group / 2 activations."""
    half = group // 2
    return t.reshape(2, t.shape[0] // group, half, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def pack_weight(weight: torch.Tensor, silu_mul: bool = False) -> PackedWeight:
    """Pack for gemm_bf16; silu_mul (a fused gate/up weight, silu_mul_packable): so that gemm_bf16 applies
    SiLU-and-multiply as it writes. Its bias, if any, must then be passed through interleave_gate_up too."""
    if silu_mul:
        if not silu_mul_packable(weight):
            raise ValueError(f"a gate/up weight of shape {tuple(weight.shape)} cannot be packed for silu_mul")
        return dataclasses.replace(pack_weight(interleave_gate_up(weight.detach())), silu_mul=True)
    out_features, in_features = weight.shape
    groups = -(-out_features // _GROUP_COLS)
    padded = torch.zeros(groups * _GROUP_COLS, in_features, dtype=weight.dtype)
    padded[:out_features] = weight.detach()
    data = padded.view(groups, _GROUP_COLS, in_features // 2, 2).permute(0, 2, 1, 3).contiguous()
    return PackedWeight(data, out_features, in_features)


def gemm_bf16(
    x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """x [..., in_features] @ weight.T (+ bias) -> [..., out_features] with float32 accumulation, rounded to
    bf16, or (out_dtype float32) the float32 sums as they are. A weight packed for silu_mul gives
    silu(gate) * up instead, [..., out_features / 2] in bf16 (the bias interleaved as the weight is)."""

    def call(x_ptr: int, bias_ptr: int | None, y_ptr: int | None, y_f32_ptr: int | None, rows: int) -> int:
        _loaded().gemm_bf16(
            x_ptr, weight.data.data_ptr(), bias_ptr, y_ptr, y_f32_ptr, rows, weight.out_features, weight.in_features,
            int(weight.silu_mul), torch.get_num_threads(),
        )  # fmt: skip
        return 0

    return bf16_matmul("gemm_bf16", x, weight, bias, out_dtype, call)


def pack_lora_a(a: torch.Tensor) -> torch.Tensor:
    """LoRA A factors [width, in] (width a multiple of 16) for lora_bf16: 16-column groups [width / 16, in / 2,
    16, 2], flat (a weight's 64-column groups would be mostly padding at LoRA's ranks)."""
    width, in_features = a.shape
    return a.detach().reshape(width // 16, 16, in_features // 2, 2).permute(0, 2, 1, 3).contiguous().flatten()


def lora_bf16(
    x: torch.Tensor, y: torch.Tensor, runs: torch.Tensor, scales: torch.Tensor, a_packed: torch.Tensor,
    b_packed: torch.Tensor, width: int,
) -> None:  # fmt: skip
    """y [rows, out] += each run's LoRA update of x [rows, in], in place (gemm.c's lora_bf16; modeling/lora.py):
    runs [num_runs, 3] int64 (first row, end row, slot), scales [num_runs] float32, a_packed / b_packed each
    slot's A [width, in] (pack_lora_a) / B [out, width] (pack_weight), one slot per row."""
    _check("lora_bf16", x, y)
    rows, out_features = y.shape
    scratch = torch.empty(rows, width, dtype=torch.bfloat16)
    _loaded().lora_bf16(
        x.data_ptr(), y.data_ptr(), scratch.data_ptr(), runs.data_ptr(), scales.data_ptr(), runs.shape[0],
        a_packed.data_ptr(), b_packed.data_ptr(), out_features, x.shape[1], width, torch.get_num_threads(),
    )  # fmt: skip


def bf16_matmul(
    kind: str, x: torch.Tensor, weight, bias: torch.Tensor | None, out_dtype: torch.dtype, call
) -> torch.Tensor:
    """What gemm_bf16 and qgemm_vnni share: bf16 x [..., in_features] flattened to rows; out [rows, out_features]
    in bf16 or float32 (bf16 only, [rows, out_features / 2], for a weight packed for silu_mul); `call(x_ptr,
    bias_ptr or None, bf16 out_ptr or None, float32 out_ptr or None, rows)` (the kernel; 0, 1: no memory, 2: not
    in this build) where there are rows; out shaped as x's leading dimensions."""
    if out_dtype not in (torch.bfloat16, torch.float32) or (weight.silu_mul and out_dtype != torch.bfloat16):
        raise ValueError(f"{kind} writes bfloat16 or float32 (bfloat16 only for silu_mul), not {out_dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight.in_features).contiguous()
    _check(kind, x2, *(() if bias is None else (bias,)))
    rows = x2.shape[0]
    width = weight.out_features // 2 if weight.silu_mul else weight.out_features
    out = torch.empty(rows, width, dtype=out_dtype)
    if rows:
        f32 = out_dtype == torch.float32
        failed = call(
            x2.data_ptr(), None if bias is None else bias.data_ptr(), None if f32 else out.data_ptr(),
            out.data_ptr() if f32 else None, rows,
        )  # fmt: skip
        if failed == 2:
            raise RuntimeError(f"{kind}: this build of the kernels does not have it (its CPU lacks the instructions)")
        if failed:
            raise MemoryError(f"{kind} could not allocate its activation buffer")
    return out.view(*lead, width)


# ---- int8 matrix multiply (qgemm.c) -------------------------------------------------------------------

_QCOLS = kernel_abi.read().constants["QGEMM_GROUP_COLS"]
_QK = kernel_abi.read().constants["QGEMM_K_ALIGN"]
QGEMM_ISAS = {2: "AVX-512 VNNI", 1: "AVX2", 0: "plain C"}


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight [out_features, in_features] as symmetric int8 with one float32 scale per output channel
    (|row|max / 127), packed for qgemm_int8 (see qgemm.c): data [ceil(out / 4), Kp / 32, 4, 32] int8 with
    Kp = in_features rounded up to 32, padding zero; scales [out padded to 4] float32, padding zero."""

    data: torch.Tensor
    scales: torch.Tensor
    out_features: int
    in_features: int

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out_features, in_features] these int8 values and scales stand for."""
        groups, steps = self.data.shape[:2]
        q = self.data.permute(0, 2, 1, 3).reshape(groups * _QCOLS, steps * _QK)
        w = q[: self.out_features, : self.in_features].float()
        return w * self.scales[: self.out_features, None]


def qgemm_available() -> bool:
    """qgemm_int8 runs here: the kernels are loaded (any CPU; the instruction set is qgemm_isa's)."""
    return library() is not None


def qgemm_isa() -> str:
    """Which inner loop the loaded library's qgemm_int8 runs: AVX-512 VNNI, AVX2 or plain C."""
    return QGEMM_ISAS[int(_loaded().lmserve_qgemm_isa())]


def quantize_weight(weight: torch.Tensor) -> QuantizedWeight:
    """Quantize a float weight [out, in] per output channel (symmetric: scale = |row|max / 127, values
    rounded to nearest even and clamped to [-127, 127]) and pack it for qgemm_int8."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    scales = w.abs().amax(dim=1) / 127.0
    q = torch.round(w / torch.where(scales > 0, scales, 1.0)[:, None]).clamp_(-127, 127).to(torch.int8)
    n_pad = -(-out_features // _QCOLS) * _QCOLS
    k_pad = -(-in_features // _QK) * _QK
    padded = torch.zeros(n_pad, k_pad, dtype=torch.int8)
    padded[:out_features, :in_features] = q
    data = padded.view(n_pad // _QCOLS, _QCOLS, k_pad // _QK, _QK).permute(0, 2, 1, 3).contiguous()
    padded_scales = torch.zeros(n_pad, dtype=torch.float32)
    padded_scales[:out_features] = scales
    return QuantizedWeight(data, padded_scales, out_features, in_features)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation quantization qgemm_int8 applies: float32 [M, K] -> (int8 [M, Kp] with zero padding,
    float32 scales [M, Kp / 32], one per block of 32 along K). For the tests; qgemm_int8 does it inside
    its own call."""
    x2 = x.contiguous()
    rows, k = x2.shape
    k_pad = -(-k // _QK) * _QK
    xq = torch.empty(rows, k_pad, dtype=torch.int8)
    sx = torch.empty(rows, k_pad // _QK, dtype=torch.float32)
    if rows:
        _loaded().quantize_rows_int8(x2.data_ptr(), xq.data_ptr(), sx.data_ptr(), rows, k, k_pad, torch.get_num_threads())
    return xq, sx


def _quantized_matmul(
    kind: str, x: torch.Tensor, in_features: int, out_features: int, bias: torch.Tensor | None, call
) -> torch.Tensor:
    """What qgemm_int8 and gguf_gemm share: float32 x [..., in_features] flattened to rows, a float32 out
    [rows, out_features], `call(x_ptr, bias_ptr or None, out_ptr, rows)` (the kernel; 0, 1: no memory, 2: K
    not a multiple of 32, qgemm_gguf.c's) where there are rows, and out shaped as x's leading dimensions."""
    if x.dtype != torch.float32:
        raise ValueError(f"{kind} takes float32 activations, not {x.dtype}")
    if bias is not None:
        _check(kind, bias, dtype=torch.float32)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).contiguous()
    rows = x2.shape[0]
    out = torch.empty(rows, out_features, dtype=torch.float32)
    failed = call(x2.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(), rows) if rows else 0
    if failed == 2:
        raise ValueError(f"{kind}: in_features {in_features} is not a multiple of {GGUF_BLOCK}")
    if failed:
        raise MemoryError(f"{kind} could not allocate its activation buffer")
    return out.view(*lead, out_features)


def qgemm_int8(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in_features] float32 @ weight.T -> [..., out_features] float32, by qgemm.c: x quantized to
    int8 with a scale per block of 32 values of a row, the products summed in int32 per block, scaled back
    (+ bias, float32, added in the same call)."""

    def call(x_ptr: int, bias_ptr: int | None, out_ptr: int, rows: int) -> int:
        return _loaded().qgemm_int8(
            x_ptr, weight.data.data_ptr(), weight.scales.data_ptr(), bias_ptr, out_ptr, rows, weight.out_features,
            weight.in_features, torch.get_num_threads(),
        )  # fmt: skip

    return _quantized_matmul("qgemm_int8", x, weight.in_features, weight.out_features, bias, call)


# ---- a whole step's decoder layers in one call (decoder.c) ------------------------------------------

@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's tensors for decoder_stack, named as abi.h's layer slots (lmserve_layer_slot,
    which also fixes their order in the table); None: no such tensor (a projection without a bias). The
    projections are all PackedWeight (bf16, gemm.c), all VNNIWeight (int8 under bf16, qgemm_vnni.c), all
    QuantizedWeight (int8 under float32, qgemm.c) or all GGUFWeight of one kind; int8 weights' per-channel
    scales fill the _s slots."""

    qkv_w: PackedWeight | QuantizedWeight | VNNIWeight | GGUFWeight
    qkv_b: torch.Tensor | None
    o_w: PackedWeight | QuantizedWeight | VNNIWeight | GGUFWeight
    o_b: torch.Tensor | None
    gate_up_w: PackedWeight | QuantizedWeight | VNNIWeight | GGUFWeight
    gate_up_b: torch.Tensor | None
    down_w: PackedWeight | QuantizedWeight | VNNIWeight | GGUFWeight
    down_b: torch.Tensor | None
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv_s: torch.Tensor | None = None
    o_s: torch.Tensor | None = None
    gate_up_s: torch.Tensor | None = None
    down_s: torch.Tensor | None = None

    @classmethod
    def of(cls, qkv, o, gate_up, down, input_norm: torch.Tensor, post_norm: torch.Tensor) -> LayerWeights:
        """From the layer's four projections, each (weight, bias), and its two norms' weights."""
        scales = {
            f"{name}_s": w.scales if isinstance(w, (QuantizedWeight, VNNIWeight)) else None
            for name, (w, _) in zip(("qkv", "o", "gate_up", "down"), (qkv, o, gate_up, down), strict=True)
        }
        return cls(
            qkv_w=qkv[0], qkv_b=qkv[1], o_w=o[0], o_b=o[1], gate_up_w=gate_up[0], gate_up_b=gate_up[1],
            down_w=down[0], down_b=down[1], input_norm=input_norm, post_norm=post_norm, **scales,
        )  # fmt: skip


WEIGHT_BF16 = kernel_abi.read().constants["WEIGHT_BF16"]
LORA_PROJECTIONS = kernel_abi.read().constants["LORA_PROJECTIONS"]
WEIGHT_INT8 = kernel_abi.read().constants["WEIGHT_INT8"]


def stack_weight_kind(layers: list[LayerWeights]) -> int:
    """decoder_stack's weight_kind for these layers (abi.h): WEIGHT_BF16 for gemm.c's, WEIGHT_INT8 for int8 ones
    (VNNIWeight under bf16, QuantizedWeight under float32), GGUF_Q4_1 or GGUF_Q8_0; raises ValueError where the
    projections are not all of one kind, or of a kind no stack takes (plain or oneDNN-packed tensors)."""
    projections = [w for layer in layers for w in (layer.qkv_w, layer.o_w, layer.gate_up_w, layer.down_w)]
    kinds = {w.kind if isinstance(w, GGUFWeight) else type(w).__name__ for w in projections}
    if len(kinds) != 1:
        raise ValueError(f"decoder_stack: the projections must be of one kind, not {sorted(kinds)}")
    weight = projections[0]
    if isinstance(weight, PackedWeight):
        return WEIGHT_BF16
    if isinstance(weight, (QuantizedWeight, VNNIWeight)):
        return WEIGHT_INT8
    if isinstance(weight, GGUFWeight):
        return GGUF_TYPES[weight.kind][0]
    raise ValueError(f"decoder_stack takes packed or quantized projections, not {type(weight).__name__}")


def _stack_dtype(layers: list[LayerWeights]) -> torch.dtype:
    """The activations' dtype of a stack of these layers: bf16 for gemm.c's and qgemm_vnni.c's weights."""
    return torch.bfloat16 if isinstance(layers[0].qkv_w, (PackedWeight, VNNIWeight)) else torch.float32


def layer_table(layers: list[LayerWeights]) -> torch.Tensor:
    """[num_layers, LAYER_SLOTS] int64 addresses for decoder_stack, in abi.h's slot order; None -> 0. The
    tensors must outlive the table (they are the model's own)."""
    slots = kernel_abi.read().layer_slots
    stack_weight_kind(layers)  # one kind throughout
    dtype = _stack_dtype(layers)
    rows = []
    for layer in layers:
        row = []
        for slot in slots:
            t = getattr(layer, slot)
            if isinstance(t, (PackedWeight, QuantizedWeight, VNNIWeight, GGUFWeight)):
                t = t.data
            elif t is not None and not slot.endswith("_s"):
                _check("decoder_stack", t, dtype=dtype)
            if t is not None and not t.is_contiguous():
                raise ValueError(f"decoder_stack: the {slot} tensor is not contiguous")
            row.append(0 if t is None else t.data_ptr())
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64).view(len(layers), len(slots))


def decoder_stack(
    residual: torch.Tensor,  # [rows, hidden] bf16 or float32, updated in place
    table: torch.Tensor,  # layer_table(...)
    weight_kind: int,  # stack_weight_kind(...) of the same layers
    cos: torch.Tensor,  # [rows, 1, head_dim]
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,  # [rows] int64
    kv_caches: torch.Tensor,  # [num_layers, 2, kv_heads, num_blocks, block_size, head_dim]
    plan,  # attention.KernelPlan covering every row
    num_heads: int,
    intermediate_size: int,
    silu_gate_up: bool,  # the table's gate/up weights are packed for silu_mul (bf16 only)
    eps: float,
    scale: float,
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # bf16: (table, runs, scales), lora.py's
) -> None:
    """Every decoder layer of a step in one C call (see decoder.c): the same arithmetic as running add_rms_norm,
    the projections, rope_and_cache, paged_attention_kernel and silu_mul layer by layer. bf16 (residual's
    dtype) with gemm.c's packed weights or qgemm_vnni.c's int8 ones, or float32 with quantized ones."""
    num_layers, _, num_kv_heads, num_blocks, block_size, head_dim = kv_caches.shape
    rows, hidden = residual.shape
    dtype = residual.dtype
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"decoder_stack runs bf16 or float32 activations, not {dtype}")
    _check("decoder_stack", residual, cos, sin, dtype=dtype)
    _check("decoder_stack", kv_caches)  # bf16 either way (kv_cache_dtype)
    for t in (slot_mapping, plan.block_table, plan.seq_of_query, plan.ctx_lens, plan.q_rows):
        if t.dtype != torch.int64 or not t.is_contiguous():
            raise ValueError("decoder_stack: slot mapping and attention plan must be contiguous int64 tensors")
    if table.shape != (num_layers, kernel_abi.read().constants["LAYER_SLOTS"]) or slot_mapping.shape != (rows,):
        raise ValueError("decoder_stack: the layer table or slot mapping does not fit the cache and rows")
    lib = _loaded()
    common = (
        residual.data_ptr(), table.data_ptr(), num_layers, cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(),
        kv_caches.data_ptr(), num_blocks, block_size, plan.block_table.data_ptr(), plan.seq_of_query.data_ptr(),
        plan.ctx_lens.data_ptr(), plan.q_rows.data_ptr(), plan.q_rows.shape[0], plan.block_table.shape[1],
        plan.max_ctx, rows, hidden, num_heads, num_kv_heads, head_dim, intermediate_size,
    )  # fmt: skip
    if dtype == torch.bfloat16:
        lora_args: tuple = (None, None, None, 0)
        if lora is not None:
            lora_table, runs, scales = lora
            if silu_gate_up or lora_table.shape != (num_layers, LORA_PROJECTIONS, 3):
                raise ValueError("decoder_stack: a LoRA table needs one row per layer and gate/up without silu_mul")
            lora_args = (lora_table.data_ptr(), runs.data_ptr(), scales.data_ptr(), runs.shape[0])
        failed = lib.decoder_stack_bf16(
            *common, weight_kind, int(silu_gate_up), eps, scale, *lora_args, torch.get_num_threads()
        )
    else:
        failed = lib.decoder_stack_f32q(*common, weight_kind, eps, scale, torch.get_num_threads())
    if failed == 2:
        raise ValueError(f"decoder_stack: weight kind {weight_kind} or these sizes are not the {dtype} stack's")
    if failed:
        raise MemoryError("decoder_stack could not allocate its scratch buffers")


# ---- temperature sampling (sampling.c) ----------------------------------------------------------------


def sample_temperature_supported(logits: torch.Tensor) -> bool:
    """sample_temperature runs for these logits (float32 on CPU, kernels loaded)."""
    return logits.device.type == "cpu" and logits.dtype == torch.float32 and library() is not None


def sample_temperature(logits: torch.Tensor, temperatures: list[float], uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of float32 logits [rows, vocab]: row r drawn from softmax(logits[r] / T_r) by
    inverting its CDF at uniforms[r] (in [0, 1)). A token without mass (a -inf logit, or one whose
    probability underflows float32) is never drawn; a row without finite positive mass gets its argmax.
    Returns int64 [rows]."""
    rows, vocab = logits.shape
    x = logits.contiguous()
    temps = torch.tensor(temperatures, dtype=torch.float32)
    u = uniforms.to(torch.float32).contiguous().view(rows)
    out = torch.empty(rows, dtype=torch.int64)
    if rows and _loaded().sample_temperature_f32(
        x.data_ptr(), temps.data_ptr(), u.data_ptr(), out.data_ptr(), rows, vocab, torch.get_num_threads()
    ):
        raise MemoryError("the sampling kernel could not allocate its scratch buffer")
    return out


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> bool:
    """logits[rows[j], t] = -inf where bit t of bitmask row j is 0 (float32 CPU logits [n, vocab], in place;
    rows int64, bitmask int32 [len(rows), words]). False (nothing done) where the library is unavailable."""
    lib = library() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    if lib is None or logits.stride(1) != 1 or not bitmask.is_contiguous() or not rows.is_contiguous():
        return False
    lib.apply_token_bitmask_f32(
        logits.data_ptr(), logits.stride(0), bitmask.data_ptr(), bitmask.shape[1], rows.data_ptr(), rows.numel(), logits.shape[1]
    )
    return True


# ---- GGUF Q4_1 / Q8_0 blocks as weights (qgemm_gguf.c) -------------------------------------------------

GGUF_BLOCK = kernel_abi.read().constants["GGUF_BLOCK"]
# --quantization value -> (ggml type id, bytes per block of GGUF_BLOCK weights)
GGUF_TYPES = {
    "q4_1": (kernel_abi.read().constants["GGUF_Q4_1"], 20),
    "q8_0": (kernel_abi.read().constants["GGUF_Q8_0"], 34),
}
GGUF_ISAS = {2: "AVX-512 VNNI", 1: "AVX2", 0: "plain C"}


@dataclass(frozen=True)
class GGUFWeight:
    """A weight [out_features, in_features] as a GGUF file stores it: data uint8 [out_features, in_features /
    32 * block bytes], each row its blocks of 32 weights (Q4_1: f16 d, f16 m, 16 bytes of nibbles; Q8_0: f16
    d, 32 int8), for gguf_gemm. `kind` is "q4_1" or "q8_0"."""

    data: torch.Tensor
    kind: str
    out_features: int
    in_features: int

    def __post_init__(self) -> None:
        block_bytes = GGUF_TYPES[self.kind][1]
        expected = (self.out_features, self.in_features // GGUF_BLOCK * block_bytes)
        if self.in_features % GGUF_BLOCK or self.data.dtype != torch.uint8 or tuple(self.data.shape) != expected:
            raise ValueError(
                f"a {self.kind} weight [{self.out_features}, {self.in_features}] needs uint8 blocks {expected}, "
                f"got {self.data.dtype} {tuple(self.data.shape)}"
            )
        if not self.data.is_contiguous():
            raise ValueError("GGUF weight blocks must be contiguous")


def gguf_gemm_available() -> bool:
    """gguf_gemm runs here: the kernels are loaded (any CPU; the instruction set is gguf_isa's)."""
    return library() is not None


def gguf_isa() -> str:
    """Which inner loop the loaded library's gguf_gemm runs: AVX-512 VNNI, AVX2 or plain C."""
    return GGUF_ISAS[int(_loaded().lmserve_gguf_isa())]


def gguf_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The activation quantization gguf_gemm applies, alone (for the tests): float32 [M, K] -> (int8 [M, K],
    block scales dx [M, K / 32], dx * block sums [M, K / 32])."""
    x2 = x.float().contiguous()
    rows, k = x2.shape
    qx = torch.empty(rows, k, dtype=torch.int8)
    dx = torch.empty(rows, k // GGUF_BLOCK, dtype=torch.float32)
    sx = torch.empty_like(dx)
    _loaded().gguf_quantize_rows(x2.data_ptr(), qx.data_ptr(), dx.data_ptr(), sx.data_ptr(), rows, k, torch.get_num_threads())
    return qx, dx, sx


def gguf_gemm(x: torch.Tensor, weight: GGUFWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in_features] float32 @ weight.T -> [..., out_features] float32 by qgemm_gguf.c (x quantized
    per block of 32 inside the call; + bias, float32, in the same call)."""

    def call(x_ptr: int, bias_ptr: int | None, out_ptr: int, rows: int) -> int:
        return _loaded().gguf_gemm(
            x_ptr, weight.data.data_ptr(), bias_ptr, out_ptr, rows, weight.out_features, weight.in_features,
            GGUF_TYPES[weight.kind][0], torch.get_num_threads(),
        )  # fmt: skip

    return _quantized_matmul("gguf_gemm", x, weight.in_features, weight.out_features, bias, call)
