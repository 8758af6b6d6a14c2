"""The C paged-attention kernel against the torch-ops path, and both against plain causal attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from service.engine.modeling import native_kernels
from service.engine.modeling.attention import SeqLayout, build_metadata, paged_attention

NUM_KV_HEADS, NUM_HEADS, NUM_BLOCKS, BLOCK_SIZE = 2, 6, 48, 4

# One step: a decode at position 9, a 5-token chunk after 6 cached tokens, a fresh 3-token prefill,
# and a 2-token chunk right after a block boundary. Blocks are scattered on purpose.
LAYOUT = [
    SeqLayout(0, 1, 9, [7, 3, 40]),
    SeqLayout(1, 5, 6, [11, 2, 30]),
    SeqLayout(6, 3, 0, [5]),
    SeqLayout(9, 2, 8, [44, 1, 19]),
]
NUM_TOKENS = 11


def reference(q, k_all, v_all, seqs, head_dim):
    """Plain causal SDPA over each sequence's whole history (cached + new), row by row."""
    out = torch.empty_like(q)
    for s, (k_hist, v_hist) in zip(seqs, zip(k_all, v_all, strict=True), strict=True):
        for j in range(s.num_new_tokens):
            row, ctx = s.start_row + j, s.num_computed_tokens + j + 1
            o = F.scaled_dot_product_attention(
                q[row].float()[:, None], k_hist[:ctx].float().transpose(0, 1), v_hist[:ctx].float().transpose(0, 1),
                scale=head_dim**-0.5, enable_gqa=True,
            )  # fmt: skip
            out[row] = o[:, 0].to(q.dtype)
    return out


def check_paged_attention(layout, num_heads, num_kv_heads, head_dim, block_size, num_blocks, dtype, use_kernel):
    """Fill each sequence's cached history into its blocks, run one step, compare with plain attention."""
    num_tokens = sum(s.num_new_tokens for s in layout)
    gen = torch.Generator().manual_seed(0)
    cache = torch.zeros(2, num_kv_heads, num_blocks, block_size, head_dim, dtype=dtype)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    k_new = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_new = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    k_hist, v_hist = [], []
    for s in layout:
        # Write each sequence's cached history into its blocks, as earlier steps would have.
        k_old = torch.randn(s.num_computed_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
        v_old = torch.randn(s.num_computed_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
        for pos in range(s.num_computed_tokens):
            block, off = s.block_ids[pos // block_size], pos % block_size
            cache[0, :, block, off] = k_old[pos]
            cache[1, :, block, off] = v_old[pos]
        rows = slice(s.start_row, s.start_row + s.num_new_tokens)
        k_hist.append(torch.cat([k_old, k_new[rows]]))
        v_hist.append(torch.cat([v_old, v_new[rows]]))
    meta = build_metadata(layout, block_size, torch.device("cpu"), dtype, use_kernel)
    assert (meta.kernel is not None) == use_kernel
    got = paged_attention(q, k_new, v_new, cache, meta, head_dim**-0.5).view(num_tokens, num_heads, head_dim)
    want = reference(q, k_hist, v_hist, layout, head_dim)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    # The new tokens' K/V landed in their slots.
    s = layout[-1]
    pos = s.num_computed_tokens + s.num_new_tokens - 1
    block, off = s.block_ids[pos // block_size], pos % block_size
    assert torch.equal(cache[0, :, block, off], k_new[s.start_row + s.num_new_tokens - 1])


# 32: the kernels' generic loops; 64 and 128: the bf16 kernel's register-blocked paths.
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernels", ["none", "native", "portable"], indirect=True)  # none: torch ops
def test_paged_attention_matches_causal_attention(dtype: torch.dtype, kernels: str, head_dim: int) -> None:
    use_kernel = kernels != "none"
    assert native_kernels.paged_attention_supported(dtype, torch.device("cpu")) == use_kernel
    check_paged_attention(LAYOUT, NUM_HEADS, NUM_KV_HEADS, head_dim, BLOCK_SIZE, NUM_BLOCKS, dtype, use_kernel)


# Blocks of 16 (the engine's default) with contexts past several blocks: the bf16 kernel's sixteen-key
# chunks and their remainders; groups of 1 to 8 query heads per KV head: its value pass in sub-groups.
LONG_LAYOUT = [
    SeqLayout(0, 1, 49, [9, 2, 30, 17]),  # decode: three full chunks and a remainder of 2
    SeqLayout(1, 5, 33, [4, 25, 11, 6]),  # a chunk straddling a block boundary
    SeqLayout(6, 1, 15, [20]),  # 16 keys, exactly one chunk
    SeqLayout(7, 1, 63, [1, 3, 5, 7]),  # 64 keys: every block full
]


@pytest.mark.usefixtures("kernels")  # native and portable builds
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_long_contexts_and_groups(dtype: torch.dtype, head_dim: int, group: int) -> None:
    check_paged_attention(LONG_LAYOUT, 2 * group, 2, head_dim, 16, 32, dtype, use_kernel=True)
