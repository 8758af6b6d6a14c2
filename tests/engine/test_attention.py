"""The C paged-attention kernel against the torch-ops path, and both against plain causal attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmserve.engine.modeling import attention_kernel
from lmserve.engine.modeling.attention import SeqLayout, build_metadata, paged_attention

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


def reference(q, k_all, v_all, seqs, head_dim, window=None, softcap=None):
    """Plain causal attention over each sequence's whole history (cached + new), row by row: SDPA, or with a
    sliding window (the last `window` keys) and soft-capped scores written out."""
    out = torch.empty_like(q)
    for s, (k_hist, v_hist) in zip(seqs, zip(k_all, v_all, strict=True), strict=True):
        for j in range(s.num_new_tokens):
            row, ctx = s.start_row + j, s.num_computed_tokens + j + 1
            first = max(ctx - window, 0) if window else 0
            qr, kr, vr = q[row].float(), k_hist[first:ctx].float(), v_hist[first:ctx].float()
            if window is None and softcap is None:
                o = F.scaled_dot_product_attention(
                    qr[:, None], kr.transpose(0, 1), vr.transpose(0, 1), scale=head_dim**-0.5, enable_gqa=True
                )[:, 0]
            else:
                group = q.shape[1] // kr.shape[1]
                scores = torch.einsum("hd,khd->hk", qr, kr.repeat_interleave(group, dim=1)) * head_dim**-0.5
                if softcap:
                    scores = torch.tanh(scores / softcap) * softcap
                o = torch.einsum("hk,khd->hd", scores.softmax(-1), vr.repeat_interleave(group, dim=1))
            out[row] = o.to(q.dtype)
    return out


def check_paged_attention(
    layout, num_heads, num_kv_heads, head_dim, block_size, num_blocks, dtypes, use_kernel, window=None, softcap=None
):
    """Fill each sequence's cached history into its blocks, run one step, compare with plain attention.
    dtypes: (q's, the cache's); K and V hold values both represent, so the reference sees what the cache does."""
    dtype, kv_dtype = dtypes
    num_tokens = sum(s.num_new_tokens for s in layout)
    gen = torch.Generator().manual_seed(0)
    cache = torch.zeros(2, num_kv_heads, num_blocks, block_size, head_dim, dtype=kv_dtype)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)

    def kv_values(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(kv_dtype).to(dtype)

    k_new = kv_values(num_tokens, num_kv_heads, head_dim)
    v_new = kv_values(num_tokens, num_kv_heads, head_dim)
    k_hist, v_hist = [], []
    for s in layout:
        # Write each sequence's cached history into its blocks, as earlier steps would have.
        k_old = kv_values(s.num_computed_tokens, num_kv_heads, head_dim)
        v_old = kv_values(s.num_computed_tokens, num_kv_heads, head_dim)
        for pos in range(s.num_computed_tokens):
            block, off = s.block_ids[pos // block_size], pos % block_size
            if block < 0:
                continue  # released behind the window: nothing of it is read
            cache[0, :, block, off] = k_old[pos].to(kv_dtype)
            cache[1, :, block, off] = v_old[pos].to(kv_dtype)
        rows = slice(s.start_row, s.start_row + s.num_new_tokens)
        k_hist.append(torch.cat([k_old, k_new[rows]]))
        v_hist.append(torch.cat([v_old, v_new[rows]]))
    meta = build_metadata(layout, block_size, torch.device("cpu"), dtype, use_kernel)
    assert (meta.kernel is not None) == use_kernel
    got = paged_attention(q, k_new, v_new, cache, meta, head_dim**-0.5, window=window, softcap=softcap)
    got = got.view(num_tokens, num_heads, head_dim)
    want = reference(q, k_hist, v_hist, layout, head_dim, window, softcap)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    # The new tokens' K/V landed in their slots.
    s = layout[-1]
    pos = s.num_computed_tokens + s.num_new_tokens - 1
    block, off = s.block_ids[pos // block_size], pos % block_size
    assert torch.equal(cache[0, :, block, off].to(dtype), k_new[s.start_row + s.num_new_tokens - 1])


F32, BF16 = torch.float32, torch.bfloat16
# (q, cache): float32 throughout, bf16 throughout, and float32 over a bf16 cache (the quantized-weight path's).
DTYPES = pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, BF16), (F32, BF16)], ids=["f32", "bf16", "f32-bf16kv"])


# 32: the kernels' generic loops; 64 and 128: the bf16 kernel's register-blocked paths and the float32-over-
# bf16 kernel's AVX2 tiles.
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@DTYPES
@pytest.mark.parametrize("kernels", ["none", "native", "portable"], indirect=True)  # none: torch ops
def test_paged_attention_matches_causal_attention(dtypes: tuple, kernels: str, head_dim: int) -> None:
    use_kernel = kernels != "none"
    assert attention_kernel.paged_attention_supported(dtypes[0], torch.device("cpu")) == use_kernel
    check_paged_attention(LAYOUT, NUM_HEADS, NUM_KV_HEADS, head_dim, BLOCK_SIZE, NUM_BLOCKS, dtypes, use_kernel)


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
@DTYPES
def test_kernel_long_contexts_and_groups(dtypes: tuple, head_dim: int, group: int) -> None:
    check_paged_attention(LONG_LAYOUT, 2 * group, 2, head_dim, 16, 32, dtypes, use_kernel=True)


# Twelve decodes of 100-250 keys (blocks shuffled over the pool): enough work that paged_attention_kernel
# splits it over every thread (attention_kernel._threads_for), so the items' dynamic chunks and the next-item
# prefetch run as a many-sequence decode step does.
MANY_DECODES = [SeqLayout(i, 1, 99 + 13 * i, []) for i in range(12)]


@pytest.mark.usefixtures("kernels")
@DTYPES
def test_kernel_many_sequences_on_every_thread(dtypes: tuple) -> None:
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randperm(12 * 16, generator=gen).tolist()
    layout = [SeqLayout(s.start_row, 1, s.num_computed_tokens, blocks[16 * i : 16 * i + 16]) for i, s in enumerate(MANY_DECODES)]
    assert attention_kernel._threads_for(12 * 6 * 250) == torch.get_num_threads()
    check_paged_attention(layout, 6, 2, 64, 16, 12 * 16, dtypes, use_kernel=True)


# A sliding window of 4 over blocks of 4: the decode's first block was released (-1) behind its window.
WINDOW_LAYOUT = [
    SeqLayout(0, 1, 9, [-1, 3, 40]),
    SeqLayout(1, 5, 6, [11, 2, 30]),
    SeqLayout(6, 3, 0, [5]),
    SeqLayout(9, 2, 8, [44, 1, 19]),
]


@pytest.mark.parametrize("window, softcap", [(4, None), (None, 3.0), (5, 2.5)])
@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, BF16)], ids=["f32", "bf16"])
@pytest.mark.parametrize("kernels", ["none", "native", "portable"], indirect=True)
def test_sliding_window_and_softcap_match_attention_written_out(
    dtypes: tuple, kernels: str, window: int | None, softcap: float | None
) -> None:
    """paged_attention.c's windowed kernels and the torch ops (a fresh prefill in transformers' eager order,
    the groups with the window in their bias) against the window and the cap written out row by row."""
    layout = WINDOW_LAYOUT if window is not None else LAYOUT
    check_paged_attention(
        layout, NUM_HEADS, NUM_KV_HEADS, 32, BLOCK_SIZE, NUM_BLOCKS, dtypes, kernels != "none", window, softcap
    )
