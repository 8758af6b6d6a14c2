"""The fused elementwise ops of a bf16 layer, or of a float32 one with quantized weights (fused_ops.c):
residual add + RMSNorm, SiLU-and-multiply, and RoPE with the KV cache write."""

from __future__ import annotations

import ctypes

import torch

from lmserve.engine.modeling import kernel_loader
from lmserve.engine.modeling.attention_kernel import cache_planes


def fused_ops_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """add_rms_norm, silu_mul and rope_and_cache run for this dtype and device (bf16 or float32 on CPU, kernels
    loaded). float32 takes them with quantized weights only (forward_path.choose_forward_path)."""
    return device.type == "cpu" and dtype in kernel_loader.KERNEL_DTYPES and kernel_loader.library() is not None


def _fused(lib: ctypes.CDLL, name: str, dtype: torch.dtype):
    """fused_ops.c's `name` for this dtype: name_bf16 or name_f32."""
    if dtype not in kernel_loader.KERNEL_DTYPES:
        raise ValueError(f"{name}: no kernel for {dtype}")
    return getattr(lib, f"{name}_{kernel_loader.KERNEL_DTYPES[dtype]}")


def add_rms_norm(
    x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """residual += x in place (when x is given); returns weight * rms_norm(residual). bf16 or float32, [rows, dim]."""
    rows, dim = residual.shape
    kernel_loader.check_tensors("add_rms_norm", residual, weight, *(() if x is None else (x,)), dtype=residual.dtype)
    out = torch.empty_like(residual)
    _fused(kernel_loader.loaded_library(), "add_rms_norm", residual.dtype)(
        None if x is None else x.data_ptr(), residual.data_ptr(), weight.data_ptr(), out.data_ptr(),
        rows, dim, eps, torch.get_num_threads(),
    )  # fmt: skip
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[rows, 2 * inter] (gate | up) -> silu(gate) * up, [rows, inter]. bf16 or float32."""
    rows, width = gate_up.shape
    kernel_loader.check_tensors("silu_mul", gate_up, dtype=gate_up.dtype)
    out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
    kernel = _fused(kernel_loader.loaded_library(), "silu_mul", gate_up.dtype)
    kernel(gate_up.data_ptr(), out.data_ptr(), rows, width // 2, torch.get_num_threads())
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
    k_plane, v_plane = cache_planes(kv_cache)
    kernel_loader.check_tensors("rope_and_cache", qkv, cos, sin, dtype=qkv.dtype)
    kernel_loader.check_tensors("rope_and_cache", kv_cache)
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (rows,) or not slot_mapping.is_contiguous():
        raise ValueError("rope_and_cache: slot_mapping must be a contiguous int64 tensor, one slot per row")
    q = torch.empty(rows, num_heads, head_dim, dtype=qkv.dtype)
    k = torch.empty(rows, num_kv_heads, head_dim, dtype=qkv.dtype)
    _fused(kernel_loader.loaded_library(), "rope_cache", qkv.dtype)(
        qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), q.data_ptr(), k.data_ptr(),
        k_plane, v_plane, slot_mapping.data_ptr(),
        rows, num_heads, num_kv_heads, head_dim, num_blocks * block_size, torch.get_num_threads(),
    )  # fmt: skip
    return q, k
