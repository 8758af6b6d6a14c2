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


# 32: the kernels' generic loops; 64 and 128: the bf16 kernel's register-blocked paths.
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_kernel", [False, True])
def test_paged_attention_matches_causal_attention(dtype: torch.dtype, use_kernel: bool, head_dim: int) -> None:
    HEAD_DIM = head_dim  # noqa: N806
    if use_kernel and not native_kernels.supports(dtype, torch.device("cpu")):
        pytest.skip("no C compiler: the kernel is unavailable on this machine")
    gen = torch.Generator().manual_seed(0)
    cache = torch.zeros(2, NUM_KV_HEADS, NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM, dtype=dtype)
    q = torch.randn(NUM_TOKENS, NUM_HEADS, HEAD_DIM, generator=gen).to(dtype)
    k_new = torch.randn(NUM_TOKENS, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    v_new = torch.randn(NUM_TOKENS, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    k_hist, v_hist = [], []
    for s in LAYOUT:
        # Write each sequence's cached history into its blocks, as earlier steps would have.
        k_old = torch.randn(s.num_computed_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
        v_old = torch.randn(s.num_computed_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
        for pos in range(s.num_computed_tokens):
            block, off = s.block_ids[pos // BLOCK_SIZE], pos % BLOCK_SIZE
            cache[0, :, block, off] = k_old[pos]
            cache[1, :, block, off] = v_old[pos]
        rows = slice(s.start_row, s.start_row + s.num_new_tokens)
        k_hist.append(torch.cat([k_old, k_new[rows]]))
        v_hist.append(torch.cat([v_old, v_new[rows]]))
    meta = build_metadata(LAYOUT, BLOCK_SIZE, torch.device("cpu"), dtype, use_kernel)
    assert (meta.kernel is not None) == use_kernel
    got = paged_attention(q, k_new, v_new, cache, meta, HEAD_DIM**-0.5).view(NUM_TOKENS, NUM_HEADS, HEAD_DIM)
    want = reference(q, k_hist, v_hist, LAYOUT, HEAD_DIM)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    # The new tokens' K/V landed in their slots.
    s = LAYOUT[1]
    block, off = s.block_ids[(s.num_computed_tokens + 2) // BLOCK_SIZE], (s.num_computed_tokens + 2) % BLOCK_SIZE
    assert torch.equal(cache[0, :, block, off], k_new[s.start_row + 2])
