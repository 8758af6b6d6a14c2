"""The bf16 matrix multiply of the projections on AVX-512 BF16 CPUs (gemm.c), and its LoRA update
(lora_bf16): weights packed once at load (pack_weight), multiplied by gemm_bf16."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lmserve.engine.modeling import kernel_abi, kernel_cache, kernel_loader

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
    lib = kernel_loader.library()
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
        kernel_loader.loaded_library().gemm_bf16(
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
    kernel_loader.check_tensors("lora_bf16", x, y)
    rows, out_features = y.shape
    scratch = torch.empty(rows, width, dtype=torch.bfloat16)
    kernel_loader.loaded_library().lora_bf16(
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
    kernel_loader.check_tensors(kind, x2, *(() if bias is None else (bias,)))
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
