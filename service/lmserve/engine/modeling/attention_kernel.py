"""Attention over the paged KV cache in C (paged_attention.c), in place of torch ops.

Why C: a decode step's attention is thousands of tiny (query heads x context) products; as torch ops it
needs a gather of every block the batch touches plus batched matmuls of tiny matrices, which cost more
than the model's own matmuls at 64 sequences. The kernel reads blocks in place.
"""

from __future__ import annotations

import torch

from lmserve.engine.modeling import kernel_loader


def paged_attention_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """paged_attention_kernel runs for this dtype and device (float32 or bf16 on CPU, kernels loaded)."""
    return device.type == "cpu" and dtype in kernel_loader.KERNEL_DTYPES and kernel_loader.library() is not None


def _threads_for(work: int) -> int:
    """One thread for a tiny call (waking a second costs more than it saves), else every intra-op thread."""
    return 1 if work < 16384 else torch.get_num_threads()


def cache_planes(kv_cache: torch.Tensor) -> tuple[int, int]:
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
    fn = getattr(kernel_loader.loaded_library(), name)
    for t in (q, out, kv_cache, block_table, seq_of_query, ctx_lens, q_rows):
        if not t.is_contiguous():
            raise ValueError("paged_attention_kernel: every tensor must be contiguous")
    _, num_kv_heads, num_blocks, block_size, head_dim = kv_cache.shape
    num_queries, num_heads = q_rows.shape[0], q.shape[1]
    k_plane, v_plane = cache_planes(kv_cache)
    failed = fn(
        q.data_ptr(), k_plane, v_plane, out.data_ptr(), block_table.data_ptr(),
        seq_of_query.data_ptr(), ctx_lens.data_ptr(), q_rows.data_ptr(),
        num_queries, num_heads, num_kv_heads, head_dim, num_blocks, block_size, block_table.shape[1],
        max_ctx, scale, *((window or 0, softcap or 0.0) if windowed else ()),
        _threads_for(num_queries * num_heads * max_ctx),
    )  # fmt: skip
    if failed:
        raise MemoryError("paged attention kernel could not allocate its scratch buffers")
