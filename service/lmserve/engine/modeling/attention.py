"""Attention over the paged KV cache, batched per step.

A step's tokens are laid out flat ([num_tokens, ...]); each sequence owns a contiguous run of rows.
Two kinds of sequences need different attention:
- a fresh prefill (nothing cached before its first token) attends only over its own new tokens:
  plain causal SDPA, which is also exactly what transformers does for a single prompt;
- everything else (decodes, later prefill chunks, prefix-cache hits) attends over its cached context,
  read in place by the C kernel (attention_kernel.py) where it is available (in bf16, fresh prefills too:
  their K/V are in the cache before attention runs); otherwise
  one batched matmul-softmax-matmul per group over blocks gathered from the head-major cache, with a
  padding/causal bias; each KV head serves all its query heads in one matmul (no GQA expansion).
Decodes (one query each) form one group, chunk continuations another, so a big chunk never pads
dozens of one-token decodes up to its length.

Two per-layer features: a sliding window (a query at position p sees keys p - window + 1 .. p, as
transformers' sliding-window mask) and attention-logit soft-capping (scores -> cap * tanh(scores / cap)
before the mask, as Gemma 2's eager attention). The C kernel has them (paged_attention.c's windowed
kernels); on the torch ops a fresh prefill then takes transformers' eager order instead of SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmserve.engine.modeling.attention_kernel import paged_attention_kernel


@dataclass
class PagedGroup:
    """Sequences that attend over cached context, padded to a common query and context length."""

    num_seqs: int
    max_query_len: int
    q_index: torch.Tensor  # [num_seqs * max_query_len] token row per padded query slot (padding -> row 0)
    out_rows: torch.Tensor  # [num_valid] token rows that receive output
    valid_index: torch.Tensor | None  # [num_valid] padded slots holding real queries; None when all are
    block_ids: torch.Tensor  # [num_seqs * max_blocks] each sequence's blocks, padded with block 0
    bias: torch.Tensor  # [1, num_seqs, 1, max_query_len, max_blocks * block_size] float: 0 attend, -inf not
    q_pos: torch.Tensor  # [num_seqs, max_query_len] each query's position (padding slots: 0)
    _windowed: dict[int, torch.Tensor] = field(default_factory=dict)

    def bias_for(self, window: int | None) -> torch.Tensor:
        """`bias`, with keys before a query's sliding window masked too (built once per step and window)."""
        if window is None:
            return self.bias
        if window not in self._windowed:
            key_pos = torch.arange(self.bias.shape[-1], device=self.bias.device)
            outside = key_pos[None, None, :] <= self.q_pos[:, :, None] - window  # [num_seqs, max_query_len, ctx]
            self._windowed[window] = self.bias.masked_fill(outside[None, :, None], float("-inf"))
        return self._windowed[window]


@dataclass
class KernelPlan:
    """Every query row that attends over cached context, for the C kernel (no padding)."""

    q_rows: torch.Tensor  # [num_queries] token row of each query
    seq_of_query: torch.Tensor  # [num_queries] index into block_table
    ctx_lens: torch.Tensor  # [num_queries] keys each query sees (its position + 1)
    block_table: torch.Tensor  # [num_seqs, max_blocks]
    max_ctx: int


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot for each new token's K/V
    fresh_prefills: list[tuple[int, int]] = field(default_factory=list)  # (start_row, end_row)
    groups: list[PagedGroup] = field(default_factory=list)  # torch path
    kernel: KernelPlan | None = None  # C kernel path, instead of groups
    # [num_tokens] the sequence length transformers' generate would see for each token: the prompt's for a prompt
    # token (it prefills the prompt whole), position + 1 for a generated one (for longrope); or None
    seq_lengths: torch.Tensor | None = None


@dataclass(frozen=True)
class SeqLayout:
    """Where one scheduled sequence's new tokens sit, as the runner builds the step."""

    start_row: int
    num_new_tokens: int
    num_computed_tokens: int  # context already in the cache before this step
    block_ids: list[int]
    num_prompt_tokens: int = 0  # the request's prompt length (for length-dependent RoPE)


def build_metadata(
    seqs: list[SeqLayout],
    block_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    use_kernel: bool = False,
    seq_lengths: bool = False,
) -> AttentionMetadata:
    slots: list[int] = []
    for s in seqs:
        first, last = s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens
        for b in range(first // block_size, (last - 1) // block_size + 1):
            base = s.block_ids[b] * block_size
            slots.extend(range(base + max(first - b * block_size, 0), base + min(last - b * block_size, block_size)))
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=device))
    if seq_lengths:
        lengths = [
            max(s.num_prompt_tokens, pos + 1)
            for s in seqs
            for pos in range(s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens)
        ]
        meta.seq_lengths = torch.tensor(lengths, dtype=torch.long, device=device)
    # In bf16 the C kernel serves fresh prefills too (2.5x faster than SDPA on 128-token prompts here);
    # in float32 they stay on SDPA, the computation transformers does, which the exactness suite holds.
    kernel_takes_all = use_kernel and dtype != torch.float32
    for s in seqs:
        if s.num_computed_tokens == 0 and not kernel_takes_all:
            meta.fresh_prefills.append((s.start_row, s.start_row + s.num_new_tokens))
    if use_kernel:
        planned = seqs if kernel_takes_all else [s for s in seqs if s.num_computed_tokens > 0]
        if planned:
            meta.kernel = _build_kernel_plan(planned, block_size, device)
        return meta
    decodes = [s for s in seqs if s.num_new_tokens == 1 and s.num_computed_tokens > 0]
    chunks = [s for s in seqs if s.num_new_tokens > 1 and s.num_computed_tokens > 0]
    for group in (decodes, chunks):
        if group:
            meta.groups.append(_build_group(group, block_size, device, dtype))
    return meta


def _readable(block_ids: list[int]) -> list[int]:
    """A sequence's blocks for a gather: blocks released behind a sliding window (negative ids) read block 0,
    whose keys the window masks (the windowed kernel does not read them at all). Released blocks are always a
    sequence's leading ones, so one look at the first tells whether there are any."""
    if not block_ids or block_ids[0] >= 0:
        return block_ids
    return [b if b >= 0 else 0 for b in block_ids]


def _build_kernel_plan(seqs: list[SeqLayout], block_size: int, device: torch.device) -> KernelPlan:
    max_ctx = max(s.num_computed_tokens + s.num_new_tokens for s in seqs)
    max_blocks = (max_ctx + block_size - 1) // block_size
    q_rows: list[int] = []
    seq_of_query: list[int] = []
    ctx_lens: list[int] = []
    table: list[int] = []
    for i, s in enumerate(seqs):
        q_rows.extend(range(s.start_row, s.start_row + s.num_new_tokens))
        seq_of_query.extend([i] * s.num_new_tokens)
        # Causal: query j of this step sits at position num_computed + j and sees keys 0..that position.
        ctx_lens.extend(range(s.num_computed_tokens + 1, s.num_computed_tokens + s.num_new_tokens + 1))
        n_blocks = (s.num_computed_tokens + s.num_new_tokens + block_size - 1) // block_size
        table.extend(_readable(s.block_ids[:n_blocks]))
        table.extend([0] * (max_blocks - n_blocks))
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return KernelPlan(
        q_rows=as_tensor(q_rows),
        seq_of_query=as_tensor(seq_of_query),
        ctx_lens=as_tensor(ctx_lens),
        block_table=as_tensor(table).view(len(seqs), max_blocks),
        max_ctx=max_ctx,
    )


def _build_group(seqs: list[SeqLayout], block_size: int, device: torch.device, dtype: torch.dtype) -> PagedGroup:
    num_seqs = len(seqs)
    max_query_len = max(s.num_new_tokens for s in seqs)
    ctx_lens = [s.num_computed_tokens + s.num_new_tokens for s in seqs]
    max_blocks = max((n + block_size - 1) // block_size for n in ctx_lens)
    block_ids: list[int] = []
    q_rows: list[int] = []
    for s, n in zip(seqs, ctx_lens, strict=True):
        n_blocks = (n + block_size - 1) // block_size
        block_ids.extend(_readable(s.block_ids[:n_blocks]))
        block_ids.extend([0] * (max_blocks - n_blocks))
        q_rows.extend(range(s.start_row, s.start_row + s.num_new_tokens))
        q_rows.extend([0] * (max_query_len - s.num_new_tokens))
    q_index = torch.tensor(q_rows, dtype=torch.long)
    query_lens = torch.tensor([s.num_new_tokens for s in seqs])
    starts = torch.tensor([s.num_computed_tokens for s in seqs])
    q_pos = torch.arange(max_query_len)
    is_real_query = q_pos[None, :] < query_lens[:, None]  # [num_seqs, max_query_len]
    key_pos = torch.arange(max_blocks * block_size)
    # Query i of a sequence sits at position start + i and sees keys 0..start+i (causal, within context).
    causal = key_pos[None, None, :] <= (starts[:, None, None] + q_pos[None, :, None])
    # Padded query slots look at key 0 only, so their softmax stays finite; their output is dropped.
    mask = torch.where(is_real_query[:, :, None], causal, key_pos[None, None, :] == 0)
    bias = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))
    flat_real = is_real_query.reshape(-1)
    all_real = bool(flat_real.all())
    return PagedGroup(
        num_seqs=num_seqs,
        max_query_len=max_query_len,
        q_index=q_index.to(device),
        out_rows=q_index[flat_real].to(device),
        valid_index=None if all_real else flat_real.nonzero().squeeze(1).to(device),
        block_ids=torch.tensor(block_ids, dtype=torch.long, device=device),
        bias=bias[None, :, None].to(device),
        q_pos=torch.where(is_real_query, starts[:, None] + q_pos[None, :], 0).to(device),
    )


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], RoPE applied
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], RoPE applied
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_kv_heads, num_blocks, block_size, head_dim]
    meta: AttentionMetadata,
    scale: float,
    cache_written: bool = False,  # k and v already stored at meta.slot_mapping (fused_ops.rope_and_cache)
    window: int | None = None,  # sliding window: keys more than window - 1 positions back are not seen
    softcap: float | None = None,  # attention-logit soft-capping
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, num_blocks, block_size, _ = kv_cache.shape
    # Head-major cache: a gather of whole blocks along dim 2 lands as [kv_heads, seqs, context, head_dim],
    # contiguous per (head, sequence), which is the batched matmul's layout: no copy after the gather.
    if not cache_written:
        flat = kv_cache.view(2, num_kv_heads, num_blocks * block_size, head_dim)
        flat[0].index_copy_(1, meta.slot_mapping, k.transpose(0, 1).to(kv_cache.dtype))
        flat[1].index_copy_(1, meta.slot_mapping, v.transpose(0, 1).to(kv_cache.dtype))

    out = torch.empty_like(q)
    if meta.fresh_prefills and kv_cache.dtype != q.dtype:
        # The quantized path's bf16 cache under float32 q: a fresh prefill attends the K and V that later steps
        # read back, so a prompt's result does not depend on whether it was prefilled whole, in chunks or
        # from the prefix cache.
        k, v = k.to(kv_cache.dtype).to(q.dtype), v.to(kv_cache.dtype).to(q.dtype)
    eager = window is not None or softcap is not None
    for start, end in meta.fresh_prefills:
        if eager:
            out[start:end] = _eager_prefill(q[start:end], k[start:end], v[start:end], scale, window, softcap)
            continue
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1)[None],  # [1, num_heads, len, head_dim]
            k[start:end].transpose(0, 1)[None],
            v[start:end].transpose(0, 1)[None],
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )
        out[start:end] = o[0].transpose(0, 1)
    if meta.kernel is not None:
        plan = meta.kernel
        paged_attention_kernel(
            q, kv_cache, out, plan.block_table, plan.seq_of_query, plan.ctx_lens,
            plan.q_rows, plan.max_ctx, scale, window, softcap,
        )  # fmt: skip
    group_size = num_heads // num_kv_heads
    for g in meta.groups:
        b, lq = g.num_seqs, g.max_query_len
        ctx_len = g.bias.shape[-1]
        kv = kv_cache.index_select(2, g.block_ids).view(2, num_kv_heads, b, ctx_len, head_dim).to(q.dtype)
        # [b * lq, heads, hd] -> [kv_heads, b, group * lq, hd]: each KV head serves its query heads at once.
        qg = q[g.q_index].view(b, lq, num_kv_heads, group_size, head_dim).permute(2, 0, 3, 1, 4)
        qg = qg.reshape(num_kv_heads, b, group_size * lq, head_dim)
        scores = torch.matmul(qg, kv[0].transpose(-1, -2)).mul_(scale)  # [kv_heads, b, group * lq, ctx]
        if softcap is not None:
            scores = torch.tanh(scores / softcap).mul_(softcap)
        scores = scores.view(num_kv_heads, b, group_size, lq, ctx_len).add_(g.bias_for(window))
        # Softmax in float32 whatever the model dtype, as SDPA does internally.
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = probs.view(num_kv_heads, b, group_size * lq, ctx_len)
        o = torch.matmul(probs, kv[1])  # [kv_heads, b, group * lq, hd]
        o = o.view(num_kv_heads, b, group_size, lq, head_dim).permute(1, 3, 0, 2, 4).reshape(b * lq, num_heads, head_dim)
        out[g.out_rows] = o if g.valid_index is None else o[g.valid_index]
    return out.view(num_tokens, num_heads * head_dim)


def _eager_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None, softcap: float | None
) -> torch.Tensor:
    """A fresh prefill's causal attention with a sliding window and/or soft-capping, in the order of
    transformers' eager attention (scores, cap, mask, float32 softmax, values). q: [len, heads, head_dim]."""
    length, num_heads, head_dim = q.shape
    group_size = num_heads // k.shape[1]
    qh = q.transpose(0, 1)  # [heads, len, head_dim]
    kh = k.transpose(0, 1).repeat_interleave(group_size, dim=0)
    vh = v.transpose(0, 1).repeat_interleave(group_size, dim=0)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    pos = torch.arange(length, device=q.device)
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= pos[None, :] > pos[:, None] - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, vh).transpose(0, 1)  # [len, heads, head_dim]
