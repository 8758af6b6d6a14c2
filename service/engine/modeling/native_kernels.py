"""C kernels, built once per machine and called via ctypes: attention over the paged cache
(paged_attention.c), the fused elementwise ops of a bf16 layer (fused_ops.c), the bf16 matrix
multiply of the projections on AVX-512 BF16 CPUs (gemm.c) and temperature sampling (sampling.c).

Why C: a decode step's attention is thousands of tiny (query heads x context) products; as torch ops it
needs a gather of every block the batch touches plus batched matmuls of tiny matrices, which cost more
than the model's own matmuls at 64 sequences. The kernel reads blocks in place.

Built with the system C compiler into the lmserve cache (kernel_cache.py: keyed by the sources' hash,
the compiler flags and the CPU's instruction-set flags, since -march=native code may not run on another
CPU sharing the cache), under a file lock so concurrent processes build it once. Without a compiler `load_kernel()`
returns None and attention falls back to torch ops (EngineConfig.attention chooses; "torch" forces them).
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import logging
import os
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from service.engine.modeling import kernel_cache
from service.progress import progress_step

log = logging.getLogger(__name__)

_C_TYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _cache_dir() -> Path:
    from service.config import default_cache_dir  # the config layer is the only reader of LMSERVE_*

    return default_cache_dir()


def _build(sources: tuple[Path, ...], target: Path) -> None:
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    compiler = compiler.split()[0]
    if shutil.which(compiler) is None:
        raise FileNotFoundError(f"no C compiler ({compiler})")
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    with progress_step(f"building the C kernels with {compiler} into {target.parent} (once per machine and source change; 5-30 s)"):
        command = [compiler, *kernel_cache.FLAGS, *map(str, sources), "-o", str(tmp), "-lm"]
        subprocess.run(command, check=True, capture_output=True, text=True)
    os.replace(tmp, target)  # atomic: a reader never sees a half-written library


@cache
def load_kernel() -> ctypes.CDLL | None:
    source_dir = kernel_cache.SOURCE_DIR
    key = kernel_cache.kernel_key(source_dir)
    target = kernel_cache.library_path(_cache_dir(), key)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                _build(kernel_cache.sources(source_dir)[0], target)
            kernel_cache.remember_user(target, source_dir)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("paged attention kernel unavailable (%s); using torch ops", str(detail).strip()[:300])
        return None
    i64p, f32 = ctypes.c_void_p, ctypes.c_float
    for suffix in _C_TYPES.values():
        fn = getattr(lib, f"paged_attention_{suffix}")
        fn.restype = ctypes.c_int
        fn.argtypes = [i64p] * 8 + [ctypes.c_int64] * 8 + [f32, ctypes.c_int]
    i64, i32 = ctypes.c_int64, ctypes.c_int
    lib.add_rms_norm_bf16.argtypes = [i64p] * 4 + [i64, i64, f32, i32]
    lib.silu_mul_bf16.argtypes = [i64p] * 2 + [i64, i64, i32]
    lib.rope_cache_bf16.argtypes = [i64p] * 8 + [i64] * 5 + [i32]
    lib.gemm_bf16.argtypes = [i64p] * 5 + [i64] * 3 + [i32, i32]
    lib.gemm_bf16_available.restype = ctypes.c_int
    lib.decoder_stack_bf16.argtypes = [i64p, i64p, i64] + [i64p] * 4 + [i64] * 2 + [i64p] * 4 + [i64] * 9 + [i32, f32, f32, i32]
    lib.decoder_stack_bf16.restype = ctypes.c_int
    lib.sample_temperature_f32.argtypes = [i64p] * 4 + [i64, i64, i32]
    lib.sample_temperature_f32.restype = ctypes.c_int
    lib.apply_token_bitmask_f32.argtypes = [i64p, i64, i64p, i64, i64p, i64, i64]
    lib.apply_token_bitmask_f32.restype = None
    for fn in (lib.add_rms_norm_bf16, lib.silu_mul_bf16, lib.rope_cache_bf16, lib.gemm_bf16):
        fn.restype = None
    return lib


def supports(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype in _C_TYPES and load_kernel() is not None


def _threads_for(work: int) -> int:
    """One thread for a tiny call (waking a second costs more than it saves), else every intra-op thread."""
    return 1 if work < 16384 else torch.get_num_threads()


def _planes(kv_cache: torch.Tensor) -> tuple[int, int]:
    """Addresses of the K and V planes of one layer's [2, ...] cache, without making view tensors."""
    k = kv_cache.data_ptr()
    return k, k + kv_cache.stride(0) * kv_cache.element_size()


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
) -> None:
    lib = load_kernel()
    if lib is None:
        raise RuntimeError("the paged attention kernel is unavailable")
    for t in (q, out, kv_cache, block_table, seq_of_query, ctx_lens, q_rows):
        if not t.is_contiguous():
            raise ValueError("paged_attention_kernel: every tensor must be contiguous")
    _, num_kv_heads, num_blocks, block_size, head_dim = kv_cache.shape
    num_queries, num_heads = q_rows.shape[0], q.shape[1]
    k_plane, v_plane = _planes(kv_cache)
    fn = lib.paged_attention_bf16 if q.dtype == torch.bfloat16 else lib.paged_attention_f32
    failed = fn(
        q.data_ptr(), k_plane, v_plane, out.data_ptr(), block_table.data_ptr(),
        seq_of_query.data_ptr(), ctx_lens.data_ptr(), q_rows.data_ptr(),
        num_queries, num_heads, num_kv_heads, head_dim, num_blocks, block_size, block_table.shape[1],
        max_ctx, scale, _threads_for(num_queries * num_heads * max_ctx),
    )  # fmt: skip
    if failed:
        raise MemoryError("paged attention kernel could not allocate its scratch buffers")


def fused_ops_supported(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and load_kernel() is not None


def _check(kind: str, *tensors: torch.Tensor) -> None:
    """The kernels read raw pointers: every tensor must be contiguous and of the kernel's dtype."""
    for t in tensors:
        if t.dtype != torch.bfloat16 or not t.is_contiguous():
            raise ValueError(f"{kind}: expected contiguous bfloat16 tensors, got {t.dtype} {tuple(t.stride())}")


def add_rms_norm(
    x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """residual += x in place (when x is given); returns weight * rms_norm(residual). bf16, [rows, dim]."""
    rows, dim = residual.shape
    _check("add_rms_norm", residual, weight, *(() if x is None else (x,)))
    out = torch.empty_like(residual)
    load_kernel().add_rms_norm_bf16(
        None if x is None else x.data_ptr(), residual.data_ptr(), weight.data_ptr(), out.data_ptr(),
        rows, dim, eps, torch.get_num_threads(),
    )  # fmt: skip
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[rows, 2 * inter] (gate | up) -> silu(gate) * up, [rows, inter]. bf16."""
    rows, width = gate_up.shape
    _check("silu_mul", gate_up)
    out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
    load_kernel().silu_mul_bf16(gate_up.data_ptr(), out.data_ptr(), rows, width // 2, torch.get_num_threads())
    return out


def rope_and_cache(
    qkv: torch.Tensor,  # [rows, (heads + 2 * kv_heads) * head_dim], contiguous
    cos: torch.Tensor,  # [rows, 1, head_dim]
    sin: torch.Tensor,
    kv_cache: torch.Tensor,  # [2, kv_heads, num_blocks, block_size, head_dim]
    slot_mapping: torch.Tensor,  # [rows] int64
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q and k, and k, v written to their cache slots, in one pass. Returns q, k contiguous."""
    _, num_kv_heads, num_blocks, block_size, head_dim = kv_cache.shape
    rows = qkv.shape[0]
    k_plane, v_plane = _planes(kv_cache)
    _check("rope_and_cache", qkv, cos, sin, kv_cache)
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (rows,) or not slot_mapping.is_contiguous():
        raise ValueError("rope_and_cache: slot_mapping must be a contiguous int64 tensor, one slot per row")
    q = torch.empty(rows, num_heads, head_dim, dtype=qkv.dtype)
    k = torch.empty(rows, num_kv_heads, head_dim, dtype=qkv.dtype)
    load_kernel().rope_cache_bf16(
        qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), q.data_ptr(), k.data_ptr(),
        k_plane, v_plane, slot_mapping.data_ptr(),
        rows, num_heads, num_kv_heads, head_dim, num_blocks * block_size, torch.get_num_threads(),
    )  # fmt: skip
    return q, k


# ---- bf16 matrix multiply (gemm.c) ------------------------------------------------------------------

_GROUP_COLS = 64  # gemm.c's GROUP_COLS


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


def gemm_available() -> bool:
    """gemm.c runs here: built with AVX-512 BF16, on a CPU without AMX (whose tile unit oneDNN drives far
    faster than vdpbf16ps can)."""
    lib = load_kernel()
    return lib is not None and bool(lib.gemm_bf16_available()) and b"amx_bf16" not in kernel_cache.cpu_flags()


def gemm_supported(weight: torch.Tensor) -> bool:
    """gemm.c runs here and fits this weight (bf16 on CPU, an even in_features)."""
    return (
        gemm_available()
        and weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and weight.shape[1] % 2 == 0
    )


def silu_mul_packable(weight: torch.Tensor) -> bool:
    """A fused gate/up weight [2 * intermediate, in] that pack_weight can pack for silu_mul: gemm.c runs it
    (gemm_supported) and intermediate is a multiple of 32."""
    return gemm_supported(weight) and weight.shape[0] % _GROUP_COLS == 0


def interleave_gate_up(t: torch.Tensor) -> torch.Tensor:
    """[2 * intermediate, ...] gate rows then up rows -> 32 gate rows, the matching 32 up rows, and so on:
    each of gemm.c's 64-column groups then holds both halves of 32 activations."""
    half = _GROUP_COLS // 2
    return t.reshape(2, t.shape[0] // _GROUP_COLS, half, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


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
    if out_dtype not in (torch.bfloat16, torch.float32) or (weight.silu_mul and out_dtype != torch.bfloat16):
        raise ValueError(f"gemm_bf16 writes bfloat16 or float32 (bfloat16 only for silu_mul), not {out_dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight.in_features).contiguous()
    _check("gemm_bf16", x2, *(() if bias is None else (bias,)))
    rows = x2.shape[0]
    width = weight.out_features // 2 if weight.silu_mul else weight.out_features
    out = torch.empty(rows, width, dtype=out_dtype)
    if rows:
        f32 = out_dtype == torch.float32
        load_kernel().gemm_bf16(
            x2.data_ptr(), weight.data.data_ptr(), None if bias is None else bias.data_ptr(),
            None if f32 else out.data_ptr(), out.data_ptr() if f32 else None,
            rows, weight.out_features, weight.in_features, int(weight.silu_mul), torch.get_num_threads(),
        )  # fmt: skip
    return out.view(*lead, width)


# ---- a whole step's decoder layers in one call (decoder.c) ------------------------------------------

LAYER_PTRS = 10  # decoder.c's: qkv, o, gate_up, down weights and biases, input and post-attention norms


def layer_table(layers: list[list[torch.Tensor | PackedWeight | None]]) -> torch.Tensor:
    """[num_layers, LAYER_PTRS] int64 addresses for decoder_stack, in decoder.c's order; None -> 0. The
    tensors must outlive the table (they are the model's own)."""
    rows = []
    for layer in layers:
        assert len(layer) == LAYER_PTRS
        row = []
        for t in layer:
            if isinstance(t, PackedWeight):
                t = t.data
            if t is not None:
                _check("decoder_stack", t)
            row.append(0 if t is None else t.data_ptr())
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64)


def decoder_stack(
    residual: torch.Tensor,  # [rows, hidden] bf16, updated in place
    table: torch.Tensor,  # layer_table(...)
    cos: torch.Tensor,  # [rows, 1, head_dim]
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,  # [rows] int64
    kv_caches: torch.Tensor,  # [num_layers, 2, kv_heads, num_blocks, block_size, head_dim]
    plan,  # attention.KernelPlan covering every row
    num_heads: int,
    intermediate_size: int,
    silu_gate_up: bool,  # the table's gate/up weights are packed for silu_mul
    eps: float,
    scale: float,
) -> None:
    """Every decoder layer of a bf16 step in one C call (see decoder.c): the same arithmetic as running
    add_rms_norm, gemm_bf16, rope_and_cache, paged_attention_kernel and silu_mul layer by layer."""
    num_layers, _, num_kv_heads, num_blocks, block_size, head_dim = kv_caches.shape
    rows, hidden = residual.shape
    _check("decoder_stack", residual, cos, sin, kv_caches)
    for t in (slot_mapping, plan.block_table, plan.seq_of_query, plan.ctx_lens, plan.q_rows):
        if t.dtype != torch.int64 or not t.is_contiguous():
            raise ValueError("decoder_stack: slot mapping and attention plan must be contiguous int64 tensors")
    if table.shape != (num_layers, LAYER_PTRS) or slot_mapping.shape != (rows,):
        raise ValueError("decoder_stack: the layer table or slot mapping does not fit the cache and rows")
    failed = load_kernel().decoder_stack_bf16(
        residual.data_ptr(), table.data_ptr(), num_layers, cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(),
        kv_caches.data_ptr(), num_blocks, block_size, plan.block_table.data_ptr(), plan.seq_of_query.data_ptr(),
        plan.ctx_lens.data_ptr(), plan.q_rows.data_ptr(), plan.q_rows.shape[0], plan.block_table.shape[1],
        plan.max_ctx, rows, hidden, num_heads, num_kv_heads, head_dim, intermediate_size, int(silu_gate_up), eps, scale,
        torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        raise MemoryError("decoder_stack could not allocate its scratch buffers")


# ---- temperature sampling (sampling.c) ----------------------------------------------------------------


def can_sample(logits: torch.Tensor) -> bool:
    return logits.device.type == "cpu" and logits.dtype == torch.float32 and load_kernel() is not None


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
    if rows and load_kernel().sample_temperature_f32(
        x.data_ptr(), temps.data_ptr(), u.data_ptr(), out.data_ptr(), rows, vocab, torch.get_num_threads()
    ):
        raise MemoryError("the sampling kernel could not allocate its scratch buffer")
    return out


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> bool:
    """logits[rows[j], t] = -inf where bit t of bitmask row j is 0 (float32 CPU logits [n, vocab], in place;
    rows int64, bitmask int32 [len(rows), words]). False (nothing done) where the library is unavailable."""
    lib = load_kernel() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    if lib is None or logits.stride(1) != 1 or not bitmask.is_contiguous() or not rows.is_contiguous():
        return False
    lib.apply_token_bitmask_f32(
        logits.data_ptr(), logits.stride(0), bitmask.data_ptr(), bitmask.shape[1], rows.data_ptr(), rows.numel(), logits.shape[1]
    )
    return True
